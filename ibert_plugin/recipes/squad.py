"""SQuAD recipe: every stage from one entry point, with TernaryBERT ``quant_task_squad.py``'s flags.

Usage (``python -m ibert_plugin.squad`` is an alias of ``python run.py`` for the SQuAD tasks)::

    python run.py --task SQUAD1 [--arch minilm] [--stages fp,ternary,ibert,export,engine]
        [--version-2-with-negative] [--weight-bits 2] [--input-bits 8] [--pred-distill] [--intermediate-distill]
        [--save-fp-model] [--save-quantized-model] [--max-seq-length 384] [--doc-stride 128]
        [--max-query-length 64] [--n-best-size 20] [--max-answer-length 30] [--null-score-diff-threshold 0.0] ...

Stages (each a ``fairseq-train --user-dir <abs ibert_plugin> --task squad`` sub-process, then an in-process
evaluation of ``checkpoint_best.pt``, chosen on the selection file (``--dev-file``, default the task folder's
``dev.json``), which writes ``predictions.json`` (official format) and ``eval.json`` into the stage folder
``<output_dir>/<stage>/``; the report files (``REPORT_FILES``: the task folder's ``test_subset.json`` or, with
``--full``, ``test.json`` for SQUAD1; ``test.json`` and ``test_disfluent.json`` for SQUAD2; ``--test-file`` replaces
``test``) are scored once with that checkpoint, ``<report>_predictions.json``):

* ``fp``: full-precision finetuning from the pretrained encoder (``--restore-file``, default ``data/minilm/model.pt``
  for ``--arch minilm``, ``<model_dir>/roberta.base/model.pt`` for ``roberta_base``; ``tiny`` trains from scratch),
  ``--criterion squad_span``.
* ``ternary``: TernaryBERT W``weight_bits``A``input_bits`` (``--quant-mode ternarybert``, TWN by default) distilled
  from the FP model (``--criterion squad_span_distill`` with ``--pred-distill`` / ``--intermediate-distill``;
  student initialised from the teacher).
* ``ibert``: I-BERT integer-only QAT (``--quant-mode symmetric``, ``--ibert-weight-bits`` 8) from the FP model,
  on the span CE (I-BERT) or, with ``--ibert-distill pred|all``, distilled from the FP model like the ternary stage.
* ``export``: the packed file of the ternary model (``python -m ibert_plugin.export --omit-lm-head``), reloaded and
  scored; with ``--save-quantized-model`` and without ``--save-fp-model`` the ternary stage's float checkpoints are
  deleted afterwards (TernaryBERT's save flags).
* ``engine``: the integer engine on the I-BERT checkpoint (integer encoder + float span head), scored and compared
  question by question with the QAT model's predictions.
* ``int_ternary`` / ``int_ternary_engine`` (not in the default list): the integer-only ternary model
  (``--quant-mode symmetric --weight-bits 2``) finetuned from the ternary stage's checkpoint, and the engine on it.

Validation runs every ``--validate-every-epochs`` (0.5) of the training windows: each prints the selection F1 and
rewrites ``<stage>/curve.json``; ``eval.json`` and ``summary.json`` carry the curve and FP's convergence verdict
(:func:`convergence`). Resumable: a stage whose ``eval.json`` exists is reused, and an interrupted stage resumes from
its ``checkpoint_last.pt`` (saved at every validation; :func:`_train_stage`).

Validation inside fairseq-train scores the whole selection file (best checkpoint on F1). ``--fresh`` redoes a
stage; ``--rescore`` scores its existing checkpoint again without training, e.g. with another
``--null-score-diff-threshold``. v2.0: ``--null-score-diff-threshold select`` scores the selection file at its
F1-best threshold and applies that threshold to the report files (validation inside fairseq-train then uses 0).
``--task SQUAD1|SQUAD2`` picks ``<data_dir>/<TASK>/{train,dev}.json`` (``python -m ibert_plugin.assets build --only
squad --squad-dir DIR``); SQUAD2 implies ``--version-2-with-negative``. A summary JSON
(``<output_dir>/summary.json``) gathers the stages' scores. Bad input prints one ``error:`` line, exit 2.

In Python: :func:`run_squad` ``(argv) -> exit status`` (what ``run.py --task SQUAD1|SQUAD2`` calls) and
:func:`main` ``(argv) -> summary dict`` (raises :class:`RecipeError`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..catalog import ARCHS, SQUAD_TASKS
from ..quant.config import (
    IBERT_W8A8,
    INT_TERNARY_W2,
    TERNARY_GRANULARITIES,
    TERNARY_METHODS,
    TERNARYBERT_W2A8,
    WEIGHT_METHODS,
    ConfigError,
    QuantConfig,
)
from ..squad.data import SquadError
from ..wiring.lifetime import LIFETIME_ENV, RunLock, RunLockedError, child_preexec
from .allocator import allocator_env
from .allocator import describe as describe_allocator
from .options import ErrorParser, RunError
from .plan import fairseq_train_cmd, optimizer_flags
from .schedules import TERNARY, TERNARY_OPTIMIZER

REPO = Path(__file__).resolve().parents[2]
USER_DIR = Path(__file__).resolve().parents[1]
#: every stage, in the order they run (a stage needs only stages before it)
STAGES = ("fp", "ternary", "int_ternary", "ibert", "export", "engine", "int_ternary_engine")
DEFAULT_STAGES = ("fp", "ternary", "ibert", "export", "engine")
TRAIN_STAGES = ("fp", "ternary", "int_ternary", "ibert")
#: engine stage -> the integer-only (symmetric-mode) stage whose checkpoint it runs
ENGINE_SOURCES = {"engine": "ibert", "int_ternary_engine": "int_ternary"}
QUANT_MODE_STAGES = {"none": ("fp",), "symmetric": ("ibert", "engine"), "ternarybert": ("ternary",)}
#: each task's report files (name -> (file by default, file with ``--full``)): a view of the task table
REPORT_FILES = {name: dict(spec.report_files) for name, spec in SQUAD_TASKS.items()}
#: FP counts as converged when its last half epoch adds less than this much selection F1 (points)
CONVERGED_GAIN_F1 = 0.5
IBERT_DISTILL = ("none", "pred", "all")  # --ibert-distill: the QAT stage's loss (see build_parser)


#: Usage or input error, printed as one ``error:`` line: the drivers' one error class (``run.py``'s), so that a
#: caller of either catches one class.
RecipeError = RunError


def _flag(p, name: str, *aliases: str, **kw):
    """``--name-with-dashes`` (the fairseq / ``run.py`` spelling, in ``--help``) and, kept as a hidden alias,
    ``--name_with_underscores`` (the spelling of TernaryBERT's scripts); ``aliases``: other spellings shown in help."""
    p.add_argument(f"--{name.replace('_', '-')}", *aliases, dest=name, **kw)
    if "_" in name:
        p.add_argument(f"--{name}", dest=name, **{k: v for k, v in kw.items() if k not in ("required", "help")},
                       help=argparse.SUPPRESS)


def _threshold(text: str):
    """``--null-score-diff-threshold``: a finite number, or ``select``."""
    if text == "select":
        return text
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a number or 'select', got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = ErrorParser(prog="python -m ibert_plugin.squad", description=__doc__.split("\n\n")[0],
                    epilog="Flags are spelled with dashes, as in run.py and fairseq; the underscore spellings of "
                           "TernaryBERT's scripts (--pred_distill, --weight_bits, ...) are accepted too.")
    _flag(p, "task", required=True, help="SQUAD1 (v1.1) or SQUAD2 (v2.0-style, Disfl-QA)")
    _flag(p, "stages", default=None,
          help=f"comma list of {','.join(STAGES)} (default {','.join(DEFAULT_STAGES)})")
    _flag(p, "quant_mode", default=None, choices=sorted(QUANT_MODE_STAGES),
          help="run.py spelling of the stage: none = fp, symmetric = ibert + engine, ternarybert = ternary "
               "(+ export with --save-quantized-model); --restore-file is then the FP checkpoint for the last two")
    _flag(p, "arch", default="minilm", help=f"one of {', '.join(ARCHS)}")
    _flag(p, "data_dir", default=None, help="folder holding <TASK>/train.json, dev.json (default <data>/squad)")
    _flag(p, "train_file", default=None, help="training JSON (default <data_dir>/<TASK>/train.json)")
    _flag(p, "dev_file", "--select-file", default=None,
          help="selection JSON: validation inside training and the checkpoint choice (default "
                        "<data_dir>/<TASK>/dev.json, the task folder's selection split)")
    _flag(p, "test_file", default=None,
          help="report JSON scored once with each stage's selected checkpoint (test_predictions.json, eval.json "
               "'test'; default the task folder's test_subset.json (SQUAD1) or test.json, with --full test.json)")
    p.add_argument("--no-test", dest="no_test", action="store_true",
                   help="score no report file (selection only)")
    p.add_argument("--full", action="store_true",
                   help="report on the whole test file (SQUAD1: the whole official v1.1 dev set, not its subset); "
                        "the GPU schedule of docs/squad.md")
    _flag(p, "tokenizer_dir", default=None, help="BPE folder with dict.txt (default per arch)")
    _flag(p, "model_dir", default="models", help="where roberta.base/ lives")
    _flag(p, "restore_file", default=None,
          help="pretrained model.pt for the fp stage; with --quant-mode symmetric|ternarybert the FP checkpoint")
    _flag(p, "output_dir", default=None, help="default outputs/squad/<TASK>-<arch>")
    _flag(p, "version_2_with_negative", action="store_true", help="SQuAD v2.0 (implied by --task SQUAD2)")
    _flag(p, "max_seq_length", type=int, default=384)
    _flag(p, "doc_stride", type=int, default=128)
    _flag(p, "max_query_length", type=int, default=64)
    _flag(p, "n_best_size", type=int, default=20)
    _flag(p, "max_answer_length", type=int, default=30)
    _flag(p, "null_score_diff_threshold", type=_threshold, default=0.0,
          help="v2.0: abstain when null - best_non_null exceeds this (0 = upstream), or 'select': the F1-best "
               "threshold on the dev (selection) file, applied to --test-file")
    _flag(p, "per_gpu_batch_size", "--bs", type=int, default=16, help="windows per update (TernaryBERT's batch size)")
    _flag(p, "learning_rate", type=float, default=5e-5, help="fp stage learning rate")
    _flag(p, "num_train_epochs", type=float, default=2.0, help="fp stage epochs")
    _flag(p, "ternary_learning_rate", type=float, default=2e-5, help="TernaryBERT learning rate (upstream 2e-5)")
    _flag(p, "ternary_epochs", type=float, default=3.0, help="TernaryBERT epochs (upstream 3)")
    _flag(p, "ibert_learning_rate", type=float, default=1e-6, help="I-BERT QAT learning rate (I-BERT: 1e-6)")
    _flag(p, "ibert_epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=None, help="run.py spelling: learning rate of every stage run")
    _flag(p, "max_epochs", type=float, default=None,
          help="run.py spelling: epochs of every stage run")
    _flag(p, "max_updates", "--max-update", default=None,
          help="cap the updates per stage: one number, or fp=N,ternary=N,int_ternary=N,ibert=N (LR schedule "
               "follows the cap)")
    _flag(p, "eval_step", type=int, default=0,
          help="validate (and save checkpoint_last.pt) every N updates (0: every --validate-every-epochs)")
    p.add_argument("--validate-every-epochs", dest="validate_every_epochs", type=float, default=0.5,
                   help="with --eval-step 0: validate on the selection file and save every this many epochs of the "
                        "training windows (default 0.5: the selection-F1 curve, curve.json, has a point every half "
                        "epoch)")
    p.add_argument("--int-ternary-learning-rate", dest="int_ternary_learning_rate", type=float, default=2e-5,
                   help="integer-only ternary stage (symmetric mode, 2-bit weights, from the ternary checkpoint)")
    p.add_argument("--int-ternary-epochs", dest="int_ternary_epochs", type=float, default=1.0)
    _flag(p, "weight_bits", type=int, default=TERNARYBERT_W2A8.weight_bits,
          choices=[TERNARYBERT_W2A8.weight_bits, IBERT_W8A8.weight_bits], help="TernaryBERT weight bits")
    _flag(p, "input_bits", type=int, default=TERNARYBERT_W2A8.act_bits, help="TernaryBERT activation bits")
    _flag(p, "weight_quant_method", default=TERNARYBERT_W2A8.weight_method, choices=list(WEIGHT_METHODS),
          help="TernaryBERT weight quantizer with --weight-bits 2 (8-bit weights use sym); the integer-only ternary "
               "stage uses it when it is a ternary method, else twn")
    _flag(p, "clip_val", type=float, default=TERNARYBERT_W2A8.clip_val, help="TernaryBERT activation clipping range")
    _flag(p, "ternary_linear", default=TERNARYBERT_W2A8.ternary_linear, choices=list(TERNARY_GRANULARITIES),
          help="ternary Linear weights: one alpha per matrix (tensor, TernaryBERT) or per output row (row)")
    _flag(p, "ibert_weight_bits", type=int, default=IBERT_W8A8.weight_bits,
          help="I-BERT weight bits (8, or 7 for the fast engine routes)")
    _flag(p, "ibert_distill", default="none", choices=IBERT_DISTILL,
          help="I-BERT QAT loss: none = the span CE on the labels (I-BERT), pred = distil the FP model's start/end "
               "logits (soft CE, times --pred-distill-weight), all = pred plus the hidden-state and attention MSEs")
    _flag(p, "pred_distill", action="store_true")
    _flag(p, "intermediate_distill", action="store_true")
    _flag(p, "pred_distill_weight", type=float, default=1.0,
          help="weight of the start/end soft CE in the ternary stage's loss (1 = upstream, where it is a mean over "
               "the window's positions and is dwarfed by the attention-score MSE; ~T, e.g. 256, makes it a "
               "per-window soft CE)")
    _flag(p, "save_fp_model", action="store_true", help="keep the ternary stage's float fairseq checkpoints")
    _flag(p, "save_quantized_model", action="store_true", help="export the packed ternary model (export stage)")
    _flag(p, "seed", type=int, default=42)
    _flag(p, "threads", type=int, default=None, help="engine threads (default: torch's)")
    _flag(p, "eval_batch_size", type=int, default=32)
    p.add_argument("--cpu", action="store_true", help="force CPU (default: GPU when available)")
    p.add_argument("--fresh", action="store_true",
                   help="redo stages that already have eval.json (their checkpoints and logs are deleted first)")
    p.add_argument("--rescore", action="store_true",
                   help="score the stages' existing checkpoints again (new evaluation flags), without training")
    _flag(p, "dry_run", action="store_true",
          help="print the fairseq-train commands and exit")
    return p


def _data_root() -> Path:
    return Path(os.environ.get("IBERT_DATA_DIR") or REPO / "data")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    a = build_parser().parse_args(list(argv))
    if a.task not in SQUAD_TASKS:
        raise RecipeError(f"unknown task {a.task!r}; choose {' or '.join(SQUAD_TASKS)}")
    if a.arch not in ARCHS:
        raise RecipeError(f"unknown arch {a.arch!r}; choose {', '.join(ARCHS)}")
    a.version_2_with_negative = a.version_2_with_negative or SQUAD_TASKS[a.task].version_2_with_negative
    if a.quant_mode and a.stages:
        raise RecipeError("give --stages or --quant-mode, not both")
    if a.quant_mode:
        a.stage_list = list(QUANT_MODE_STAGES[a.quant_mode])
        if a.quant_mode == "ternarybert" and a.save_quantized_model:
            a.stage_list.append("export")
    else:
        a.stage_list = [s.strip() for s in (a.stages or ",".join(DEFAULT_STAGES)).split(",") if s.strip()]
    bad = [s for s in a.stage_list if s not in STAGES]
    if bad or not a.stage_list:
        raise RecipeError(f"--stages: unknown stage(s) {bad or [a.stages]}; choose from {','.join(STAGES)}")
    a.stage_list = sorted(set(a.stage_list), key=STAGES.index)  # export deletes what int_ternary starts from
    if not (a.validate_every_epochs > 0 and math.isfinite(a.validate_every_epochs)):
        raise RecipeError("--validate-every-epochs must be a finite number > 0")
    if "ternary" in a.stage_list and not (a.pred_distill or a.intermediate_distill):
        raise RecipeError("the ternary stage needs --pred-distill and/or --intermediate-distill")
    for name in ("per_gpu_batch_size", "max_seq_length", "doc_stride", "max_query_length", "n_best_size",
                 "max_answer_length", "eval_batch_size"):
        if getattr(a, name) < 1:
            raise RecipeError(f"--{name.replace('_', '-')} must be >= 1")
    if not (a.pred_distill_weight >= 0 and math.isfinite(a.pred_distill_weight)):
        raise RecipeError("--pred-distill-weight must be a finite number >= 0")
    if not 2 <= a.input_bits <= 8 or not 2 <= a.ibert_weight_bits <= 8:
        raise RecipeError("--input-bits and --ibert-weight-bits must be in 2..8")
    a.caps = _parse_caps(a.max_updates)
    try:
        a.stage_quant = stage_configs(a)
    except ConfigError as e:
        raise RecipeError(str(e)) from None
    if a.lr is not None:
        a.learning_rate = a.ternary_learning_rate = a.ibert_learning_rate = a.int_ternary_learning_rate = a.lr
    if a.max_epochs is not None:
        a.num_train_epochs = a.ternary_epochs = a.ibert_epochs = a.int_ternary_epochs = a.max_epochs
    if min(a.learning_rate, a.ternary_learning_rate, a.ibert_learning_rate, a.int_ternary_learning_rate) <= 0 or \
            min(a.num_train_epochs, a.ternary_epochs, a.ibert_epochs, a.int_ternary_epochs) <= 0:
        raise RecipeError("learning rates and epochs must be > 0")
    data_dir = Path(a.data_dir) if a.data_dir else _data_root() / "squad"
    a.train_path = Path(a.train_file or data_dir / a.task / "train.json").resolve()
    a.dev_path = Path(a.dev_file or data_dir / a.task / "dev.json").resolve()
    a.reports = {}  # report name -> file, scored once with each stage's selected checkpoint
    if not a.no_test:
        for name, (cpu_file, full_file) in SQUAD_TASKS[a.task].report_files.items():
            path = data_dir / a.task / (full_file if a.full else cpu_file)
            if name == "test" and a.test_file:
                path = Path(a.test_file)
            elif not path.is_file():
                continue  # a task folder of an older layout (train.json + dev.json only)
            a.reports[name] = path.resolve()
    a.test_path = a.reports.get("test")
    a.tok_dir = (Path(a.tokenizer_dir) if a.tokenizer_dir else ARCHS[a.arch].tokenizer_path()).resolve()
    if not (a.tok_dir / "dict.txt").is_file():
        raise RecipeError(f"{a.tok_dir}/dict.txt not found (build it with python -m ibert_plugin.assets build, or "
                          "pass --tokenizer-dir)")
    a.out = Path(a.output_dir or REPO / "outputs" / "squad" / f"{a.task}-{a.arch}").resolve()
    a.eval_device = "cpu"
    if not a.cpu:
        import torch

        a.eval_device = "cuda" if torch.cuda.is_available() else "cpu"
    return a


def stage_configs(a) -> Dict[str, QuantConfig]:
    """The quantization of each training stage: the presets of :mod:`ibert_plugin.quant.config` with the stage flags.

    ``fp``: float. ``ternary``: :data:`TERNARYBERT_W2A8` with ``--weight-bits``, ``--weight-quant-method`` (k-bit
    weights use I-BERT's symmetric quantizer), ``--input-bits``, ``--clip-val`` and ``--ternary-linear``.
    ``int_ternary``: :data:`INT_TERNARY_W2` with the ternary stage's method when that is a ternary one. ``ibert``:
    :data:`IBERT_W8A8` with ``--ibert-weight-bits``.

    Raises:
        ConfigError: a flag value the configuration rejects.
    """
    ternary_method = a.weight_quant_method if a.weight_bits == TERNARYBERT_W2A8.weight_bits else \
        IBERT_W8A8.weight_method
    int_method = a.weight_quant_method if a.weight_quant_method in TERNARY_METHODS else INT_TERNARY_W2.weight_method
    return {"fp": QuantConfig(),
            "ternary": TERNARYBERT_W2A8.replace(weight_bits=a.weight_bits, weight_method=ternary_method,
                                                act_bits=a.input_bits, clip_val=a.clip_val,
                                                ternary_linear=a.ternary_linear),
            "int_ternary": INT_TERNARY_W2.replace(weight_method=int_method),
            "ibert": IBERT_W8A8.replace(weight_bits=a.ibert_weight_bits)}


def _parse_caps(text: Optional[str]) -> Dict[str, int]:
    if not text:
        return {}
    caps = {}
    try:
        if "=" not in text:
            return {s: int(text) for s in TRAIN_STAGES}
        for part in text.split(","):
            k, v = part.split("=")
            if k.strip() not in TRAIN_STAGES:
                raise ValueError
            caps[k.strip()] = int(v)
    except ValueError:
        raise RecipeError(f"--max-updates {text!r}: expected N or fp=N,ternary=N,int_ternary=N,ibert=N") from None
    if any(v < 1 for v in caps.values()):
        raise RecipeError("--max-updates must be >= 1")
    return caps


def _pretrained(a) -> Optional[Path]:
    if a.restore_file:
        p = Path(a.restore_file).resolve()
        if not p.is_file():
            raise RecipeError(f"restore file not found: {a.restore_file}")
        return p
    cands = ARCHS[a.arch].pretrained_paths(Path(a.model_dir))
    for c in cands:
        if c.is_file():
            return c.resolve()
    if cands:
        raise RecipeError(f"pretrained model not found: {cands[0]} (pass --restore-file)")
    return None


def _train_windows(a) -> int:
    from ..squad.data import read_squad
    from ..squad.features import OffsetTokenizer, build_features
    from ..tasks.squad import load_dictionary

    cfg = argparse.Namespace(dict_path="", tokenizer_dir=str(a.tok_dir))
    d = load_dictionary(cfg)
    examples = read_squad(a.train_path, version_2=a.version_2_with_negative)
    for held_out in (a.dev_path, *a.reports.values()):  # fail before training, not after
        read_squad(held_out, version_2=a.version_2_with_negative)
    return len(build_features(examples, OffsetTokenizer(a.tok_dir, d), a.max_seq_length, a.doc_stride,
                              a.max_query_length))


def validate_interval(a, n_windows: int) -> int:
    """Updates between validations (selection F1) and checkpoint saves: ``--eval-step``, else
    ``--validate-every-epochs`` (default half an epoch) of ``n_windows`` training windows at
    ``--per-gpu-batch-size``."""
    if a.eval_step:
        return a.eval_step
    return max(1, round(n_windows / a.per_gpu_batch_size * a.validate_every_epochs))


def train_command(a, stage: str, save_dir: Path, restore: Optional[Path], n_windows: int,
                  teacher: Optional[Path] = None) -> List[str]:
    """The ``fairseq-train`` argv of one training stage (fp, ternary, int_ternary or ibert); ``restore`` is the
    checkpoint it starts from, ``teacher`` the FP model of a distillation loss (default ``restore``)."""
    teacher = teacher or restore
    lr, epochs = {"fp": (a.learning_rate, a.num_train_epochs), "ternary": (a.ternary_learning_rate, a.ternary_epochs),
                  "int_ternary": (a.int_ternary_learning_rate, a.int_ternary_epochs),
                  "ibert": (a.ibert_learning_rate, a.ibert_epochs)}[stage]
    total = max(1, math.ceil(n_windows / a.per_gpu_batch_size * epochs))
    total = min(total, a.caps.get(stage, total))
    interval = validate_interval(a, n_windows)
    cmd = fairseq_train_cmd() + [
        str(a.train_path.parent), "--user-dir", str(USER_DIR), "--task", "squad",
        "--tokenizer-dir", str(a.tok_dir), "--train-file", str(a.train_path), "--valid-file", str(a.dev_path),
        "--max-seq-length", str(a.max_seq_length), "--doc-stride", str(a.doc_stride),
        "--max-query-length", str(a.max_query_length), "--n-best-size", str(a.n_best_size),
        "--max-answer-length", str(a.max_answer_length),
        "--null-score-diff-threshold", f"{_fixed_threshold(a):g}",
        "--arch", ARCHS[a.arch].fairseq_arch, "--max-positions", "512",
        "--batch-size", str(a.per_gpu_batch_size), "--max-tokens", str(a.per_gpu_batch_size * a.max_seq_length),
        "--required-batch-size-multiple", "1", "--batch-size-valid", str(a.eval_batch_size),
        # every stage trains with TernaryBERT's Adam (quant_task_squad.py); fp and ternary warm up like it
        *optimizer_flags(TERNARY_OPTIMIZER, TERNARY_OPTIMIZER["weight_decay"], lr),
        "--warmup-updates", str(int(TERNARY.warmup_fraction * total) if stage in ("fp", "ternary") else 0),
        "--total-num-update", str(total), "--max-update", str(total),
        "--dropout", "0.1", "--attention-dropout", "0.1", "--seed", str(a.seed),
        "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--valid-subset", "valid",
        "--best-checkpoint-metric", SQUAD_TASKS[a.task].metric, "--maximize-best-checkpoint-metric",
        "--log-format", "simple", "--log-interval", "10", "--num-workers", "0",
        "--distributed-world-size", "1",
    ]
    if a.version_2_with_negative:
        cmd.append("--version-2-with-negative")
    # checkpoint_best.pt (selection F1) and checkpoint_last.pt (what a relaunch resumes from) at every validation;
    # one interval checkpoint kept on disk
    cmd += ["--validate-interval-updates", str(interval), "--save-interval-updates", str(interval),
            "--keep-interval-updates", "1"]
    quant = a.stage_quant[stage]
    if stage == "fp":
        cmd += quant.to_flags(["quant_mode"]) + ["--criterion", "squad_span"]
    elif stage in ("ibert", "int_ternary"):
        # I-BERT: the weight bits (its quantizer is the default); integer-only ternary: the ternary stage's weights
        # with I-BERT's integer-only activations
        cmd += quant.to_flags(["quant_mode", "weight_bits"] + (["weight_method"] if stage == "int_ternary" else []))
        if a.ibert_distill == "none":
            cmd += ["--criterion", "squad_span"]
        else:
            cmd += _distill_flags(a, teacher, pred=True, intermediate=a.ibert_distill == "all")
    else:
        cmd += quant.to_flags(["quant_mode", "weight_bits", "weight_method", "act_bits", "clip_val"])
        cmd += _distill_flags(a, teacher, pred=a.pred_distill, intermediate=a.intermediate_distill)
        if quant.linear_rowwise:
            cmd += quant.to_flags(["ternary_linear"])
    if restore is not None:
        cmd += ["--finetune-from-model", str(restore)]
    if a.eval_device == "cpu":
        cmd.append("--cpu")
    return cmd


def _distill_flags(a, teacher: Optional[Path], pred: bool, intermediate: bool) -> List[str]:
    """``--criterion squad_span_distill`` from the FP ``teacher`` with the given terms (``--pred-distill-weight``
    scales the start/end soft CE)."""
    flags = ["--criterion", "squad_span_distill", "--teacher-path", str(teacher)]
    flags += ["--pred-distill"] * pred + ["--intermediate-distill"] * intermediate
    if pred and a.pred_distill_weight != 1.0:
        flags += ["--pred-distill-weight", f"{a.pred_distill_weight:g}"]
    return flags


_VALID_LINE = re.compile(r"valid on 'valid' subset")
_VALID_FIELD = re.compile(r"\| (epoch|f1|exact|num_updates) ([0-9.]+)")


def parse_curve(log_text: str) -> List[dict]:
    """The selection-F1 curve of a ``fairseq-train`` log: one ``{"update", "epoch", "f1", "exact"}`` per validation,
    by update (a resumed run appends to the same log; a repeated update keeps its last line)."""
    points = {}
    for line in log_text.splitlines():
        if not _VALID_LINE.search(line):
            continue
        f = dict(_VALID_FIELD.findall(line))
        if "f1" in f and "num_updates" in f:
            u = int(float(f["num_updates"]))
            points[u] = {"update": u, "epoch": int(float(f.get("epoch", 0))), "f1": float(f["f1"]),
                         "exact": float(f.get("exact", "nan"))}
    return [points[u] for u in sorted(points)]


def convergence(curve: List[dict], interval: int, min_gain: float = CONVERGED_GAIN_F1) -> dict:
    """Convergence verdict of a selection curve: the F1 the last ``interval`` updates (half an epoch) added;
    ``converged`` when that gain is below ``min_gain`` points (``None`` with fewer than two points that far apart)."""
    if not curve:
        return {"converged": None, "reason": "no validation in the log"}
    last = curve[-1]
    before = [c for c in curve if c["update"] <= last["update"] - interval]
    if not before:
        return {"converged": None, "reason": f"no validation {interval} updates before the last ({last['update']})",
                "last_update": last["update"], "last_f1": last["f1"]}
    prev = before[-1]
    gain = round(last["f1"] - prev["f1"], 2)
    return {"converged": gain < min_gain, "last_half_epoch_gain_f1": gain, "threshold_f1": min_gain,
            "from_update": prev["update"], "from_f1": prev["f1"], "last_update": last["update"], "last_f1": last["f1"],
            "best_f1": max(c["f1"] for c in curve)}


def _run_logged(cmd: List[str], log_path: Path, alloc: Optional[Dict[str, str]] = None, on_line=None) -> int:
    """Run ``cmd``, tee its merged output to stdout and ``log_path``; ``alloc``: extra environment (the memory
    allocator of a training process, :func:`ibert_plugin.recipes.allocator.allocator_env`); ``on_line(text)`` is
    called after each line is logged. The child dies with this process and holds the lock of ``log_path``'s folder
    (the stage's save dir) with it (:mod:`ibert_plugin.wiring.lifetime`): a second recipe on the same folder fails
    instead of training into it."""
    try:
        lock = RunLock(log_path.parent).acquire()
    except RunLockedError as e:
        raise RecipeError(str(e)) from None
    with lock, open(log_path, "a", encoding="utf-8") as log:
        log.write(f"[squad] {shlex.join(cmd)}\n")
        if alloc is not None:
            log.write(f"[squad] memory allocator: {describe_allocator(alloc)}\n")
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(alloc or {}), **{LIFETIME_ENV: "1"})
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                preexec_fn=child_preexec(), pass_fds=(lock.fd,))
        for line in iter(proc.stdout.readline, b""):
            text = line.decode("utf-8", "replace")
            sys.stdout.write(text)
            log.write(text)
            log.flush()  # the log is what a user tails during a long stage
            if on_line is not None:
                on_line(text)
        return proc.wait()


def _curve_writer(stage: str, d: Path):
    """``on_line`` of a training stage: at each validation, rewrite ``curve.json`` from the whole log (earlier
    sittings included) and print the selection F1."""
    def on_line(text):
        if not _VALID_LINE.search(text):
            return
        curve = parse_curve((d / "train.log").read_text(encoding="utf-8", errors="replace"))
        (d / "curve.json").write_text(json.dumps(curve, indent=1) + "\n")
        if curve:
            c = curve[-1]
            print(f"[squad] {stage}: selection F1 {c['f1']:.2f} EM {c['exact']:.2f} at update {c['update']} "
                  f"(epoch {c['epoch']})", flush=True)
    return on_line


def tokenizer(a):
    """``(OffsetTokenizer, fairseq dictionary)`` of the run's ``--tokenizer-dir``."""
    from ..squad.features import OffsetTokenizer
    from ..tasks.squad import load_dictionary

    d = load_dictionary(argparse.Namespace(dict_path="", tokenizer_dir=str(a.tok_dir)))
    return OffsetTokenizer(a.tok_dir, d), d


def _fixed_threshold(a) -> float:
    """The threshold fairseq's validation applies (``select`` is chosen after training: validation uses 0)."""
    return 0.0 if a.null_score_diff_threshold == "select" else a.null_score_diff_threshold


def score_model(a, logits_fn, tok, out_dir: Path, extra: Optional[dict] = None) -> dict:
    """Scores on the selection (dev) file (``predictions.json``) and on every report file (``test``:
    ``test_predictions.json`` under ``"test"``; ``test_disfluent``: ``test_disfluent_predictions.json``); written
    to ``eval.json``. v2.0 with ``--null-score-diff-threshold select``: the selection file's F1-best threshold,
    applied to the report files."""
    from ..squad.evaluate import evaluate_file

    def run(path, name, threshold):
        return evaluate_file(path, tok, logits_fn, a.version_2_with_negative, a.max_seq_length, a.doc_stride,
                             a.max_query_length, a.n_best_size, a.max_answer_length, threshold,
                             a.eval_batch_size, out_dir / name)

    t0 = time.time()
    select = a.null_score_diff_threshold == "select"
    scores = run(a.dev_path, "predictions.json", None if select else a.null_score_diff_threshold)
    rec = {"dev_file": str(a.dev_path), **scores}
    for name, path in a.reports.items():
        rec[name] = {"file": str(path), **run(path, f"{name}_predictions.json",
                                               scores.get("null_score_diff_threshold", 0.0))}
    rec.update(eval_seconds=round(time.time() - t0, 1), **(extra or {}))
    (out_dir / "eval.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(f"[squad] {out_dir.name}: EM {scores['exact']:.2f} F1 {scores['f1']:.2f} ({scores['total']} questions)",
          flush=True)
    for name in a.reports:
        r = rec[name]
        print(f"[squad] {out_dir.name} {name}: EM {r['exact']:.2f} F1 {r['f1']:.2f} ({r['total']} questions)",
              flush=True)
    return rec


def load_model(path: Path, dict_size: int, device: str = "cpu"):
    """Checkpoint or packed file -> eval-mode model on ``device`` (the engine needs ``cpu``)."""
    from ..wiring.checkpoint import load_checkpoint_model, load_packed_model

    model = load_packed_model(path) if path.name.endswith("packed.pt") else load_checkpoint_model(str(path))[0]
    rows = model.encoder.sentence_encoder.embed_tokens.weight.shape[0]
    if rows != dict_size:
        raise RecipeError(f"{path}: embedding table has {rows} rows, the dictionary {dict_size}")
    return model.to(device).eval()


def main(argv: Sequence[str]) -> dict:
    """Run the requested stages; returns the summary (also written to ``<output_dir>/summary.json``)."""
    a = parse_args(argv)
    try:
        alloc = allocator_env()
    except ConfigError as e:
        raise RecipeError(str(e)) from None
    t_start = time.time()
    q = a.stage_quant  # the ternary folder names the method flag as given (ternary_w8a8_twn holds sym weights)
    dirs = {"fp": a.out / "fp",
            "ternary": a.out / f"ternary_w{q['ternary'].weight_bits}a{q['ternary'].act_bits}_{a.weight_quant_method}",
            "int_ternary": a.out / f"int_ternary_w{q['int_ternary'].weight_bits}_{q['int_ternary'].weight_method}",
            "ibert": a.out / f"ibert_w{q['ibert'].weight_bits}",
            "export": a.out / "export", "engine": a.out / "engine", "int_ternary_engine": a.out / "int_ternary_engine"}
    summary_path = a.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update(task=a.task, arch=a.arch, version_2_with_negative=a.version_2_with_negative,
                   train_file=str(a.train_path), dev_file=str(a.dev_path),
                   report_files={k: str(v) for k, v in a.reports.items()})
    stages = summary.setdefault("stages", {})
    train_stages = [s for s in a.stage_list if s in TRAIN_STAGES]
    n_windows = _train_windows(a) if train_stages else 0
    interval = validate_interval(a, n_windows) if train_stages else 0
    if train_stages:
        summary.update(train_windows=n_windows, validate_interval_updates=interval)
    pretrained = _pretrained(a) if "fp" in a.stage_list else None
    fp_best = dirs["fp"] / "checkpoint_best.pt"
    if a.restore_file and "fp" not in a.stage_list:
        fp_best = _pretrained(a)  # an FP checkpoint given explicitly (run.py's --restore-file for QAT/ternary)
    tok = dict_ = None
    for stage in a.stage_list:
        d = dirs[stage]
        if (d / "eval.json").is_file() and not (a.fresh or a.rescore or a.dry_run):
            print(f"[squad] {stage}: done before ({d / 'eval.json'}); --fresh redoes it", flush=True)
            stages[stage] = json.loads((d / "eval.json").read_text())
            continue
        if stage in TRAIN_STAGES:
            restore = {"fp": pretrained, "int_ternary": dirs["ternary"] / "checkpoint_best.pt"}.get(stage, fp_best)
            for need in {fp_best, restore} - {pretrained}:
                if stage != "fp" and not need.is_file() and not a.dry_run:
                    raise RecipeError(f"stage {stage} needs {need} (run the stage that writes it first)")
            best = d / "checkpoint_best.pt"
            if a.rescore and not a.dry_run:
                if not best.is_file():
                    raise RecipeError(f"--rescore: stage {stage} has no {best} to score; train it first")
                prev = json.loads((d / "eval.json").read_text()) if (d / "eval.json").is_file() else {}
                train_seconds = prev.get("train_seconds")
            else:
                cmd = train_command(a, stage, d, restore, n_windows, teacher=fp_best)
                if a.dry_run:
                    print(shlex.join(cmd))
                    continue
                train_seconds = _train_stage(a, stage, d, cmd, alloc)
            if tok is None:
                tok, dict_ = tokenizer(a)
            from ..squad.evaluate import model_logits

            model = load_model(best, len(dict_), a.eval_device)
            curve = parse_curve((d / "train.log").read_text(encoding="utf-8", errors="replace")) \
                if (d / "train.log").is_file() else []
            stages[stage] = score_model(a, model_logits(model, dict_.pad()), tok, d,
                                   {"checkpoint": str(best), "train_seconds": train_seconds,
                                    "selection_curve": curve, "convergence": convergence(curve, interval)})
            if stage == "fp":
                summary["fp_convergence"] = stages[stage]["convergence"]
        elif a.dry_run:
            continue
        elif stage == "export":
            src = dirs["ternary"] / "checkpoint_best.pt"
            packed = d / "model_packed.pt"
            reuse = a.rescore and packed.is_file()  # the ternary checkpoints may be gone (--save-quantized-model)
            if not src.is_file() and not reuse:
                raise RecipeError(f"export needs the ternary stage's {src}")
            d.mkdir(parents=True, exist_ok=True)
            if not reuse:
                rc = _run_logged([sys.executable, "-m", "ibert_plugin.export", "--checkpoint", str(src),
                                  "--output", str(packed), "--omit-lm-head"], d / "export.log")
                if rc != 0:
                    raise RecipeError(f"export failed with exit code {rc}; see {d / 'export.log'}")
            if tok is None:
                tok, dict_ = tokenizer(a)
            from ..squad.evaluate import model_logits

            model = load_model(packed, len(dict_), a.eval_device)
            prev = json.loads((d / "eval.json").read_text()) if reuse and (d / "eval.json").is_file() else {}
            stages[stage] = score_model(a, model_logits(model, dict_.pad()), tok, d,
                                   {"packed_model": str(packed), "packed_bytes": packed.stat().st_size,
                                    "checkpoint_bytes": src.stat().st_size if src.is_file()
                                    else prev.get("checkpoint_bytes")})
            if a.save_quantized_model and not a.save_fp_model:
                for ck in dirs["ternary"].glob("checkpoint*.pt"):
                    ck.unlink()
        elif stage in ENGINE_SOURCES:
            qat_dir = dirs[ENGINE_SOURCES[stage]]
            src = qat_dir / "checkpoint_best.pt"
            if not src.is_file():
                raise RecipeError(f"{stage} needs the {ENGINE_SOURCES[stage]} stage's {src}")
            d.mkdir(parents=True, exist_ok=True)
            if tok is None:
                tok, dict_ = tokenizer(a)
            from ..squad.evaluate import build_engine, engine_logits

            engine = build_engine(load_model(src, len(dict_)), threads=a.threads)
            rec = score_model(a, engine_logits(engine, dict_.pad()), tok, d, {"checkpoint": str(src)})
            for report in (None, *a.reports):
                name = f"{report}_predictions.json" if report else "predictions.json"
                qat = json.loads((qat_dir / name).read_text())
                eng = json.loads((d / name).read_text())
                sub = rec[report] if report else rec
                sub["same_predictions_as_qat"] = sum(eng.get(k) == v for k, v in qat.items())
                sub["questions"] = len(qat)
            (d / "eval.json").write_text(json.dumps(rec, indent=1) + "\n")
            stages[stage] = rec
    if a.dry_run:
        return summary
    summary["wall_seconds_last_run"] = round(time.time() - t_start, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _train_stage(a, stage: str, d: Path, cmd: List[str], alloc) -> float:
    """Train one stage in ``d``; returns its training seconds over every sitting.

    Resumable: ``fairseq-train`` loads ``d/checkpoint_last.pt`` when it exists (its ``--restore-file`` default;
    ``--finetune-from-model`` only applies to a first launch), with the optimizer, LR scheduler, update count and
    data-iterator position, so a relaunch continues an interrupted stage where its last save (every validation
    interval) left it. ``train_done.json`` marks a finished run, so scoring that failed does not retrain; ``--fresh``
    deletes the stage's checkpoints and logs first."""
    done, runs_file = d / "train_done.json", d / "train_runs.json"
    if a.fresh and d.is_dir():
        for f in [*d.glob("checkpoint*.pt"), done, runs_file, d / "train.log", d / "curve.json"]:
            f.unlink(missing_ok=True)
    if done.is_file():
        print(f"[squad] {stage}: training finished before ({done}); scoring its checkpoint", flush=True)
        return json.loads(done.read_text())["train_seconds"]
    d.mkdir(parents=True, exist_ok=True)
    if (d / "checkpoint_last.pt").is_file():
        print(f"[squad] {stage}: resuming from {d / 'checkpoint_last.pt'}", flush=True)
    runs = json.loads(runs_file.read_text()) if runs_file.is_file() else []
    t0 = time.time()
    try:
        rc = _run_logged(cmd, d / "train.log", alloc, on_line=_curve_writer(stage, d))
    finally:  # an interrupted sitting still counts towards the stage's training time
        runs.append(round(time.time() - t0, 1))
        runs_file.write_text(json.dumps(runs) + "\n")
    if rc != 0:
        raise RecipeError(f"stage {stage}: fairseq-train failed with exit code {rc}; see {d / 'train.log'} "
                          "(a relaunch resumes from checkpoint_last.pt)")
    seconds = round(sum(runs), 1)
    done.write_text(json.dumps({"train_seconds": seconds, "sittings": len(runs)}) + "\n")
    return seconds


def run_squad(argv: Sequence[str]) -> int:
    """Entry point for ``run.py --task SQUAD1|SQUAD2 ...`` and ``python -m ibert_plugin.squad``: exit status."""
    try:
        summary = main(argv)
    except (RecipeError, SquadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if summary.get("stages"):
        print(json.dumps({k: {m: v[m] for m in ("exact", "f1") if m in v} for k, v in summary["stages"].items()}))
    return 0
