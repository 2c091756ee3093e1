"""SQuAD recipe: every stage from one entry point, with TernaryBERT ``quant_task_squad.py``'s flags.

Usage::

    python -m ibert_plugin.squad --task SQUAD1 [--arch minilm] [--stages fp,ternary,ibert,export,engine]
        [--version_2_with_negative] [--weight_bits 2] [--input_bits 8] [--pred_distill] [--intermediate_distill]
        [--save_fp_model] [--save_quantized_model] [--max_seq_length 384] [--doc_stride 128]
        [--max_query_length 64] [--n_best_size 20] [--max_answer_length 30] [--null_score_diff_threshold 0.0] ...

Stages (each a ``fairseq-train --user-dir <abs ibert_plugin> --task squad`` sub-process, then an in-process
evaluation of ``checkpoint_best.pt`` on the whole dev file, which writes ``predictions.json`` (official format) and
``eval.json`` into the stage folder ``<output_dir>/<stage>/``; ``--test_file`` adds a held-out file scored with the
same checkpoint, for reporting on data the checkpoint was not selected on):

* ``fp``: full-precision finetuning from the pretrained encoder (``--restore_file``, default ``data/minilm/model.pt``
  for ``--arch minilm``, ``<model_dir>/roberta.base/model.pt`` for ``roberta_base``; ``tiny`` trains from scratch),
  ``--criterion squad_span``.
* ``ternary``: TernaryBERT W``weight_bits``A``input_bits`` (``--quant-mode ternarybert``, TWN by default) distilled
  from the FP model (``--criterion squad_span_distill`` with ``--pred_distill`` / ``--intermediate_distill``;
  student initialised from the teacher).
* ``ibert``: I-BERT integer-only QAT (``--quant-mode symmetric``, ``--ibert_weight_bits`` 8) from the FP model,
  on the span CE (I-BERT) or, with ``--ibert_distill pred|all``, distilled from the FP model like the ternary stage.
* ``export``: the packed file of the ternary model (``python -m ibert_plugin.export --omit-lm-head``), reloaded and
  scored; with ``--save_quantized_model`` and without ``--save_fp_model`` the ternary stage's float checkpoints are
  deleted afterwards (TernaryBERT's save flags).
* ``engine``: the integer engine on the I-BERT checkpoint (integer encoder + float span head), scored and compared
  question by question with the QAT model's predictions.

Validation inside fairseq-train scores the whole dev file (best checkpoint on F1). A stage whose ``eval.json``
exists is skipped (``--fresh`` redoes it; ``--rescore`` scores its existing checkpoint again without training, e.g.
with another ``--null_score_diff_threshold``). v2.0: ``--null_score_diff_threshold select`` scores the dev
(selection) file at its F1-best threshold and applies that threshold to ``--test_file`` (validation inside
fairseq-train then uses 0). ``--task SQUAD1|SQUAD2`` picks ``<data_dir>/<TASK>/{train,dev}.json``
(``python -m ibert_plugin.assets build --only squad``); SQUAD2 implies ``--version_2_with_negative``. A summary
JSON (``<output_dir>/summary.json``) gathers the stages' scores. Bad input prints one ``error:`` line, exit 2.

In Python: :func:`run_squad` ``(argv) -> exit status`` (what ``run.py --task SQUAD1|SQUAD2`` calls) and
:func:`main` ``(argv) -> summary dict`` (raises :class:`RecipeError`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..quant.config import ConfigError
from ..recipes.allocator import allocator_env
from ..recipes.allocator import describe as describe_allocator
from ..recipes.plan import fairseq_train_cmd
from ..wiring.lifetime import LIFETIME_ENV, RunLock, RunLockedError, child_preexec
from .data import SquadError

REPO = Path(__file__).resolve().parents[2]
USER_DIR = Path(__file__).resolve().parents[1]
STAGES = ("fp", "ternary", "ibert", "export", "engine")
QUANT_MODE_STAGES = {"none": ("fp",), "symmetric": ("ibert", "engine"), "ternarybert": ("ternary",)}
TASKS = {"SQUAD1": False, "SQUAD2": True}  # task -> version_2_with_negative
IBERT_DISTILL = ("none", "pred", "all")  # --ibert_distill: the QAT stage's loss (see build_parser)
#: --arch -> (fairseq arch, default tokenizer dir, default pretrained checkpoints)
ARCHS = {
    "minilm": ("ibert_roberta_minilm", "@data/minilm", ("@data/minilm/model.pt", "minilm/model.pt")),
    "roberta_base": ("ibert_roberta_base", "@data/gpt2_bpe", ("roberta.base/model.pt",)),
    "roberta_large": ("ibert_roberta_large", "@data/gpt2_bpe", ("roberta.large/model.pt",)),
    "tiny": ("ibert_roberta_tiny", "@data/minilm", ()),
}


class RecipeError(Exception):
    """Usage or input error: printed as one ``error:`` line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise RecipeError(message)


def _flag(p, name: str, **kw):
    """``--name_with_underscores`` (TernaryBERT spelling) and ``--name-with-dashes`` (fairseq / run.py spelling)."""
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    p.add_argument(*names, dest=name, **kw)


def _threshold(text: str):
    """``--null_score_diff_threshold``: a finite number, or ``select``."""
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
    p = _Parser(prog="python -m ibert_plugin.squad", description=__doc__.split("\n\n")[0])
    _flag(p, "task", required=True, help="SQUAD1 (v1.1) or SQUAD2 (v2.0-style, Disfl-QA)")
    _flag(p, "stages", default=None, help=f"comma list of {','.join(STAGES)} (default all)")
    _flag(p, "quant_mode", default=None, choices=sorted(QUANT_MODE_STAGES),
          help="run.py spelling of the stage: none = fp, symmetric = ibert + engine, ternarybert = ternary "
               "(+ export with --save_quantized_model); --restore_file is then the FP checkpoint for the last two")
    _flag(p, "arch", default="minilm", help=f"one of {', '.join(ARCHS)}")
    _flag(p, "data_dir", default=None, help="folder holding <TASK>/train.json, dev.json (default <data>/squad)")
    _flag(p, "train_file", default=None, help="training JSON (default <data_dir>/<TASK>/train.json)")
    _flag(p, "dev_file", default=None, help="dev JSON (default <data_dir>/<TASK>/dev.json)")
    _flag(p, "test_file", default=None,
          help="held-out JSON also scored with each stage's best checkpoint (test_predictions.json, eval.json 'test')")
    _flag(p, "tokenizer_dir", default=None, help="BPE folder with dict.txt (default per arch)")
    _flag(p, "model_dir", default="models", help="where roberta.base/ lives")
    _flag(p, "restore_file", default=None,
          help="pretrained model.pt for the fp stage; with --quant_mode symmetric|ternarybert the FP checkpoint")
    _flag(p, "output_dir", default=None, help="default outputs/squad/<TASK>-<arch>")
    _flag(p, "version_2_with_negative", action="store_true", help="SQuAD v2.0 (implied by --task SQUAD2)")
    _flag(p, "max_seq_length", type=int, default=384)
    _flag(p, "doc_stride", type=int, default=128)
    _flag(p, "max_query_length", type=int, default=64)
    _flag(p, "n_best_size", type=int, default=20)
    _flag(p, "max_answer_length", type=int, default=30)
    _flag(p, "null_score_diff_threshold", type=_threshold, default=0.0,
          help="v2.0: abstain when null - best_non_null exceeds this (0 = upstream), or 'select': the F1-best "
               "threshold on the dev (selection) file, applied to --test_file")
    p.add_argument("--per_gpu_batch_size", "--per-gpu-batch-size", "--bs", dest="per_gpu_batch_size", type=int,
                   default=16, help="windows per update (TernaryBERT's batch size)")
    _flag(p, "learning_rate", type=float, default=5e-5, help="fp stage learning rate")
    _flag(p, "num_train_epochs", type=float, default=2.0, help="fp stage epochs")
    _flag(p, "ternary_learning_rate", type=float, default=2e-5, help="TernaryBERT learning rate (upstream 2e-5)")
    _flag(p, "ternary_epochs", type=float, default=3.0, help="TernaryBERT epochs (upstream 3)")
    _flag(p, "ibert_learning_rate", type=float, default=1e-6, help="I-BERT QAT learning rate (I-BERT: 1e-6)")
    _flag(p, "ibert_epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=None, help="run.py spelling: learning rate of every stage run")
    p.add_argument("--max-epochs", "--max_epochs", dest="max_epochs", type=float, default=None,
                   help="run.py spelling: epochs of every stage run")
    p.add_argument("--max_updates", "--max-updates", "--max-update", dest="max_updates", default=None,
          help="cap the updates per stage: one number, or fp=N,ternary=N,ibert=N (LR schedule follows the cap)")
    _flag(p, "eval_step", type=int, default=0, help="validate every N updates (0: at each epoch end)")
    _flag(p, "weight_bits", type=int, default=2, choices=[2, 8], help="TernaryBERT weight bits")
    _flag(p, "input_bits", type=int, default=8, help="TernaryBERT activation bits")
    _flag(p, "weight_quant_method", default="twn", choices=["twn", "lat", "sym"])
    _flag(p, "clip_val", type=float, default=2.5)
    _flag(p, "ternary_linear", default="tensor", choices=["tensor", "row"],
          help="ternary Linear weights: one alpha per matrix (tensor, TernaryBERT) or per output row (row)")
    _flag(p, "ibert_weight_bits", type=int, default=8, help="I-BERT weight bits (8, or 7 for the fast engine routes)")
    _flag(p, "ibert_distill", default="none", choices=IBERT_DISTILL,
          help="I-BERT QAT loss: none = the span CE on the labels (I-BERT), pred = distil the FP model's start/end "
               "logits (soft CE, times --pred_distill_weight), all = pred plus the hidden-state and attention MSEs")
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
    p.add_argument("--fresh", action="store_true", help="redo stages that already have eval.json")
    p.add_argument("--rescore", action="store_true",
                   help="score the stages' existing checkpoints again (new evaluation flags), without training")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the fairseq-train commands and exit")
    return p


def _resolve(spec: str, base: Path) -> Path:
    return REPO / spec[1:] if spec.startswith("@") else base / spec


def _data_root() -> Path:
    return Path(os.environ.get("IBERT_DATA_DIR") or REPO / "data")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    a = build_parser().parse_args(list(argv))
    if a.task not in TASKS:
        raise RecipeError(f"unknown task {a.task!r}; choose SQUAD1 or SQUAD2")
    if a.arch not in ARCHS:
        raise RecipeError(f"unknown arch {a.arch!r}; choose {', '.join(ARCHS)}")
    a.version_2_with_negative = a.version_2_with_negative or TASKS[a.task]
    if a.quant_mode and a.stages:
        raise RecipeError("give --stages or --quant_mode, not both")
    if a.quant_mode:
        a.stage_list = list(QUANT_MODE_STAGES[a.quant_mode])
        if a.quant_mode == "ternarybert" and a.save_quantized_model:
            a.stage_list.append("export")
    else:
        a.stage_list = [s.strip() for s in (a.stages or ",".join(STAGES)).split(",") if s.strip()]
    bad = [s for s in a.stage_list if s not in STAGES]
    if bad or not a.stage_list:
        raise RecipeError(f"--stages: unknown stage(s) {bad or [a.stages]}; choose from {','.join(STAGES)}")
    if "ternary" in a.stage_list and not (a.pred_distill or a.intermediate_distill):
        raise RecipeError("the ternary stage needs --pred_distill and/or --intermediate_distill")
    for name in ("per_gpu_batch_size", "max_seq_length", "doc_stride", "max_query_length", "n_best_size",
                 "max_answer_length", "eval_batch_size"):
        if getattr(a, name) < 1:
            raise RecipeError(f"--{name} must be >= 1")
    if not (a.pred_distill_weight >= 0 and math.isfinite(a.pred_distill_weight)):
        raise RecipeError("--pred_distill_weight must be a finite number >= 0")
    if not 2 <= a.input_bits <= 8 or not 2 <= a.ibert_weight_bits <= 8:
        raise RecipeError("--input_bits and --ibert_weight_bits must be in 2..8")
    a.caps = _parse_caps(a.max_updates)
    if a.lr is not None:
        a.learning_rate = a.ternary_learning_rate = a.ibert_learning_rate = a.lr
    if a.max_epochs is not None:
        a.num_train_epochs = a.ternary_epochs = a.ibert_epochs = a.max_epochs
    if min(a.learning_rate, a.ternary_learning_rate, a.ibert_learning_rate) <= 0 or \
            min(a.num_train_epochs, a.ternary_epochs, a.ibert_epochs) <= 0:
        raise RecipeError("learning rates and epochs must be > 0")
    data_dir = Path(a.data_dir) if a.data_dir else _data_root() / "squad"
    a.train_path = Path(a.train_file or data_dir / a.task / "train.json").resolve()
    a.dev_path = Path(a.dev_file or data_dir / a.task / "dev.json").resolve()
    a.test_path = Path(a.test_file).resolve() if a.test_file else None
    a.tok_dir = (Path(a.tokenizer_dir) if a.tokenizer_dir else _resolve(ARCHS[a.arch][1], Path("."))).resolve()
    if not (a.tok_dir / "dict.txt").is_file():
        raise RecipeError(f"{a.tok_dir}/dict.txt not found (build it with python -m ibert_plugin.assets build, or "
                          "pass --tokenizer_dir)")
    a.out = Path(a.output_dir or REPO / "outputs" / "squad" / f"{a.task}-{a.arch}").resolve()
    a.eval_device = "cpu"
    if not a.cpu:
        import torch

        a.eval_device = "cuda" if torch.cuda.is_available() else "cpu"
    return a


def _parse_caps(text: Optional[str]) -> Dict[str, int]:
    if not text:
        return {}
    caps = {}
    try:
        if "=" not in text:
            return {s: int(text) for s in ("fp", "ternary", "ibert")}
        for part in text.split(","):
            k, v = part.split("=")
            if k.strip() not in ("fp", "ternary", "ibert"):
                raise ValueError
            caps[k.strip()] = int(v)
    except ValueError:
        raise RecipeError(f"--max_updates {text!r}: expected N or fp=N,ternary=N,ibert=N") from None
    if any(v < 1 for v in caps.values()):
        raise RecipeError("--max_updates must be >= 1")
    return caps


def _pretrained(a) -> Optional[Path]:
    if a.restore_file:
        p = Path(a.restore_file).resolve()
        if not p.is_file():
            raise RecipeError(f"restore file not found: {a.restore_file}")
        return p
    cands = [_resolve(c, Path(a.model_dir)) for c in ARCHS[a.arch][2]]
    for c in cands:
        if c.is_file():
            return c.resolve()
    if cands:
        raise RecipeError(f"pretrained model not found: {cands[0]} (pass --restore_file)")
    return None


def _train_windows(a) -> int:
    from ..tasks.squad import load_dictionary
    from .data import read_squad
    from .features import OffsetTokenizer, build_features

    cfg = argparse.Namespace(dict_path="", tokenizer_dir=str(a.tok_dir))
    d = load_dictionary(cfg)
    examples = read_squad(a.train_path, version_2=a.version_2_with_negative)
    for held_out in (a.dev_path, a.test_path):  # fail before training, not after
        if held_out is not None:
            read_squad(held_out, version_2=a.version_2_with_negative)
    return len(build_features(examples, OffsetTokenizer(a.tok_dir, d), a.max_seq_length, a.doc_stride,
                              a.max_query_length))


def train_command(a, stage: str, save_dir: Path, restore: Optional[Path], n_windows: int) -> List[str]:
    """The ``fairseq-train`` argv of one training stage (fp, ternary or ibert)."""
    lr, epochs = {"fp": (a.learning_rate, a.num_train_epochs), "ternary": (a.ternary_learning_rate, a.ternary_epochs),
                  "ibert": (a.ibert_learning_rate, a.ibert_epochs)}[stage]
    total = max(1, math.ceil(n_windows / a.per_gpu_batch_size * epochs))
    total = min(total, a.caps.get(stage, total))
    cmd = fairseq_train_cmd() + [
        str(a.train_path.parent), "--user-dir", str(USER_DIR), "--task", "squad",
        "--tokenizer-dir", str(a.tok_dir), "--train-file", str(a.train_path), "--valid-file", str(a.dev_path),
        "--max-seq-length", str(a.max_seq_length), "--doc-stride", str(a.doc_stride),
        "--max-query-length", str(a.max_query_length), "--n-best-size", str(a.n_best_size),
        "--max-answer-length", str(a.max_answer_length),
        "--null-score-diff-threshold", f"{_fixed_threshold(a):g}",
        "--arch", ARCHS[a.arch][0], "--max-positions", "512",
        "--batch-size", str(a.per_gpu_batch_size), "--max-tokens", str(a.per_gpu_batch_size * a.max_seq_length),
        "--required-batch-size-multiple", "1", "--batch-size-valid", str(a.eval_batch_size),
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.999)", "--adam-eps", "1e-06", "--weight-decay", "0.01",
        "--clip-norm", "1.0", "--lr-scheduler", "polynomial_decay", "--lr", f"{lr:g}",
        "--warmup-updates", str(int(0.1 * total) if stage != "ibert" else 0),
        "--total-num-update", str(total), "--max-update", str(total),
        "--dropout", "0.1", "--attention-dropout", "0.1", "--seed", str(a.seed),
        "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--valid-subset", "valid",
        "--best-checkpoint-metric", "f1", "--maximize-best-checkpoint-metric",
        "--log-format", "simple", "--log-interval", "10", "--num-workers", "0",
        "--distributed-world-size", "1",
    ]
    if a.version_2_with_negative:
        cmd.append("--version-2-with-negative")
    if a.eval_step:
        # checkpoint (best selection) at every validation; keep one interval checkpoint on disk
        cmd += ["--validate-interval-updates", str(a.eval_step), "--save-interval-updates", str(a.eval_step),
                "--keep-interval-updates", "1"]
    if stage == "fp":
        cmd += ["--quant-mode", "none", "--criterion", "squad_span"]
    elif stage == "ibert":
        cmd += ["--quant-mode", "symmetric", "--weight-bits", str(a.ibert_weight_bits)]
        if a.ibert_distill == "none":
            cmd += ["--criterion", "squad_span"]
        else:
            cmd += _distill_flags(a, restore, pred=True, intermediate=a.ibert_distill == "all")
    else:
        method = a.weight_quant_method if a.weight_bits == 2 else "sym"
        cmd += ["--quant-mode", "ternarybert", "--weight-bits", str(a.weight_bits), "--weight-quant-method", method,
                "--input-bits", str(a.input_bits), "--clip-val", f"{a.clip_val:g}"]
        cmd += _distill_flags(a, restore, pred=a.pred_distill, intermediate=a.intermediate_distill)
        if a.ternary_linear != "tensor" and method in ("twn", "lat"):
            cmd += ["--ternary-linear", a.ternary_linear]
    if restore is not None:
        cmd += ["--finetune-from-model", str(restore)]
    if a.eval_device == "cpu":
        cmd.append("--cpu")
    return cmd


def _distill_flags(a, teacher: Optional[Path], pred: bool, intermediate: bool) -> List[str]:
    """``--criterion squad_span_distill`` from the FP ``teacher`` with the given terms (``--pred_distill_weight``
    scales the start/end soft CE)."""
    flags = ["--criterion", "squad_span_distill", "--teacher-path", str(teacher)]
    flags += ["--pred-distill"] * pred + ["--intermediate-distill"] * intermediate
    if pred and a.pred_distill_weight != 1.0:
        flags += ["--pred-distill-weight", f"{a.pred_distill_weight:g}"]
    return flags


def _run_logged(cmd: List[str], log_path: Path, alloc: Optional[Dict[str, str]] = None) -> int:
    """Run ``cmd``, tee its merged output to stdout and ``log_path``; ``alloc``: extra environment (the memory
    allocator of a training process, :func:`ibert_plugin.recipes.allocator.allocator_env`). The child dies with this
    process and holds the lock of ``log_path``'s folder (the stage's save dir) with it
    (:mod:`ibert_plugin.wiring.lifetime`): a second recipe on the same folder fails instead of training into it."""
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
        return proc.wait()


def _tokenizer(a):
    from ..tasks.squad import load_dictionary
    from .features import OffsetTokenizer

    d = load_dictionary(argparse.Namespace(dict_path="", tokenizer_dir=str(a.tok_dir)))
    return OffsetTokenizer(a.tok_dir, d), d


def _fixed_threshold(a) -> float:
    """The threshold fairseq's validation applies (``select`` is chosen after training: validation uses 0)."""
    return 0.0 if a.null_score_diff_threshold == "select" else a.null_score_diff_threshold


def _score(a, logits_fn, tok, out_dir: Path, extra: Optional[dict] = None) -> dict:
    """Scores on the dev file (``predictions.json``) and, with ``--test_file``, the test file
    (``test_predictions.json``, under ``"test"``); written to ``eval.json``. v2.0 with
    ``--null_score_diff_threshold select``: the dev file's F1-best threshold, applied to the test file."""
    from .evaluate import evaluate_file

    def run(path, name, threshold):
        return evaluate_file(path, tok, logits_fn, a.version_2_with_negative, a.max_seq_length, a.doc_stride,
                             a.max_query_length, a.n_best_size, a.max_answer_length, threshold,
                             a.eval_batch_size, out_dir / name)

    t0 = time.time()
    select = a.null_score_diff_threshold == "select"
    scores = run(a.dev_path, "predictions.json", None if select else a.null_score_diff_threshold)
    rec = {"dev_file": str(a.dev_path), **scores}
    if a.test_path is not None:
        rec["test"] = {"file": str(a.test_path),
                       **run(a.test_path, "test_predictions.json", scores.get("null_score_diff_threshold", 0.0))}
    rec.update(eval_seconds=round(time.time() - t0, 1), **(extra or {}))
    (out_dir / "eval.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(f"[squad] {out_dir.name}: EM {scores['exact']:.2f} F1 {scores['f1']:.2f} ({scores['total']} questions)",
          flush=True)
    return rec


def _load_model(path: Path, dict_size: int, device: str = "cpu"):
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
    dirs = {"fp": a.out / "fp", "ternary": a.out / f"ternary_w{a.weight_bits}a{a.input_bits}_{a.weight_quant_method}",
            "ibert": a.out / f"ibert_w{a.ibert_weight_bits}", "export": a.out / "export", "engine": a.out / "engine"}
    summary_path = a.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update(task=a.task, arch=a.arch, version_2_with_negative=a.version_2_with_negative,
                   train_file=str(a.train_path), dev_file=str(a.dev_path))
    stages = summary.setdefault("stages", {})
    train_stages = [s for s in a.stage_list if s in ("fp", "ternary", "ibert")]
    n_windows = _train_windows(a) if train_stages else 0
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
        if stage in ("fp", "ternary", "ibert"):
            restore = pretrained if stage == "fp" else fp_best
            if stage != "fp" and not fp_best.is_file() and not a.dry_run:
                raise RecipeError(f"stage {stage} needs the fp stage's {fp_best} (run --stages fp first)")
            best = d / "checkpoint_best.pt"
            if a.rescore and not a.dry_run:
                if not best.is_file():
                    raise RecipeError(f"--rescore: stage {stage} has no {best} to score; train it first")
                prev = json.loads((d / "eval.json").read_text()) if (d / "eval.json").is_file() else {}
                train_seconds = prev.get("train_seconds")
            else:
                cmd = train_command(a, stage, d, restore, n_windows)
                if a.dry_run:
                    print(shlex.join(cmd))
                    continue
                d.mkdir(parents=True, exist_ok=True)
                t0 = time.time()
                rc = _run_logged(cmd, d / "train.log", alloc)
                if rc != 0:
                    raise RecipeError(f"stage {stage}: fairseq-train failed with exit code {rc}; see "
                                      f"{d / 'train.log'}")
                train_seconds = round(time.time() - t0, 1)
            if tok is None:
                tok, dict_ = _tokenizer(a)
            from .evaluate import model_logits

            model = _load_model(best, len(dict_), a.eval_device)
            stages[stage] = _score(a, model_logits(model, dict_.pad()), tok, d,
                                   {"checkpoint": str(best), "train_seconds": train_seconds})
        elif a.dry_run:
            continue
        elif stage == "export":
            src = dirs["ternary"] / "checkpoint_best.pt"
            packed = d / "model_packed.pt"
            reuse = a.rescore and packed.is_file()  # the ternary checkpoints may be gone (--save_quantized_model)
            if not src.is_file() and not reuse:
                raise RecipeError(f"export needs the ternary stage's {src}")
            d.mkdir(parents=True, exist_ok=True)
            if not reuse:
                rc = _run_logged([sys.executable, "-m", "ibert_plugin.export", "--checkpoint", str(src),
                                  "--output", str(packed), "--omit-lm-head"], d / "export.log")
                if rc != 0:
                    raise RecipeError(f"export failed with exit code {rc}; see {d / 'export.log'}")
            if tok is None:
                tok, dict_ = _tokenizer(a)
            from .evaluate import model_logits

            model = _load_model(packed, len(dict_), a.eval_device)
            prev = json.loads((d / "eval.json").read_text()) if reuse and (d / "eval.json").is_file() else {}
            stages[stage] = _score(a, model_logits(model, dict_.pad()), tok, d,
                                   {"packed_model": str(packed), "packed_bytes": packed.stat().st_size,
                                    "checkpoint_bytes": src.stat().st_size if src.is_file()
                                    else prev.get("checkpoint_bytes")})
            if a.save_quantized_model and not a.save_fp_model:
                for ck in dirs["ternary"].glob("checkpoint*.pt"):
                    ck.unlink()
        elif stage == "engine":
            src = dirs["ibert"] / "checkpoint_best.pt"
            if not src.is_file():
                raise RecipeError(f"engine needs the ibert stage's {src}")
            d.mkdir(parents=True, exist_ok=True)
            if tok is None:
                tok, dict_ = _tokenizer(a)
            from .evaluate import build_engine, engine_logits

            engine = build_engine(_load_model(src, len(dict_)), threads=a.threads)
            rec = _score(a, engine_logits(engine, dict_.pad()), tok, d, {"checkpoint": str(src)})
            for name in ("predictions.json",) + (("test_predictions.json",) if a.test_path else ()):
                qat = json.loads((dirs["ibert"] / name).read_text())
                eng = json.loads((d / name).read_text())
                sub = rec if name == "predictions.json" else rec["test"]
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
