#!/usr/bin/env python3
"""GLUE-style fine-tuning driver for the ``ibert_plugin`` fairseq plugin (I-BERT seed interface, fixed).

Three stages, all launched as ``fairseq-train --user-dir <abs path of ibert_plugin>`` sub-processes:

* **FP fine-tuning** (``--quant-mode none``): from a pretrained ``model.pt`` (``--restore-file``, default
  ``<model-dir>/roberta.{base,large}/model.pt``, ``<model-dir>/minilm/model.pt`` or ``data/minilm/model.pt``; the
  ``tiny`` arch trains from scratch when none is given). Warmup per the task table.
* **I-BERT QAT** (``--quant-mode symmetric``, the seed's default): needs ``--restore-file`` = the FP stage's
  ``checkpoint_best.pt``. The FP weights load into the quantized arch (the model initialises the missing
  quantization buffers), optimizer / LR scheduler / meters / dataloader are reset, warmup is 0. The learning rate
  defaults to the task table like the seed; the I-BERT README uses ``--lr 1e-6``.
* **TernaryBERT** (``--quant-mode ternarybert``): 2- or 8-bit weights, 8-bit activations, distillation from the
  ``--restore-file`` model (criterion ``ternary_distill``), student initialised from the same checkpoint.
  ``--integer-only`` runs the I-BERT integer dataflow with ternary weights (model ``--quant-mode symmetric
  --weight-bits 2``). Defaults: lr 2e-5, 3 epochs, batch 32 (16 for CoLA/BOOLQ), 10 % linear warmup then linear decay,
  Adam (0.9, 0.999), weight decay 0.01, clip-norm 1.0 (global, not TernaryBERT's per-tensor clip).
  ``--save-quantized-model`` runs ``python -m ibert_plugin.export --omit-lm-head`` on ``checkpoint_best.pt``
  afterwards (``<ckpt>/model_packed.pt``; the masked-LM head is unused by sentence classification); unless ``--save-fp-model`` is also given, the float fairseq checkpoints are then
  deleted. Without ``--save-quantized-model`` the fairseq checkpoints are always kept.

Every stage loads its ``--restore-file`` through fairseq's ``--finetune-from-model``, so relaunching the same command
**resumes** from ``checkpoint_last.pt`` of the most recent unfinished run of the same configuration (``--fresh``
starts a new run instead). Output layout::

    <output-dir>/<mode>/<TASK>-<size>/wd<wd>_ad<ad>_d<d>_lr<lr>/<MMDD-HHMMSS>.log    (tee of fairseq's output)
                                                              /<MMDD-HHMMSS>_ckpt/   (checkpoint_best.pt ...)
                                                              /<MMDD-HHMMSS>.json    (run record, resume key)

``mode`` is ``none``, ``symmetric`` or ``ternary_w<bits>_<method>`` (``ternary_int_...`` with ``--integer-only``).
Timestamps are GMT. Extra fairseq flags can follow ``--`` (e.g. ``-- --log-interval 10 --num-workers 0``); fairseq
keeps the last occurrence of a flag, so they override the generated ones.

Deviations from the seed (ibert_spec.md §6, §10 rows 20-22): exact task-name validation, integer ``--bs``,
``--max-epochs`` honoured, STS-B trained as regression, per-task GLUE metrics for best-checkpoint selection
(CoLA ``mcc``, MRPC/QQP ``acc_and_f1``, STS-B ``pearson_and_spearman``, accuracy elsewhere), mid-epoch validation
counted in updates (fairseq semantics), ``--no-epoch-checkpoints`` (only best/last are kept), no separate
``--log-file`` (the driver tees the whole output, tracebacks included).

Usage::

    python run.py --arch roberta_base --task MRPC --quant-mode none            # FP fine-tuning from models/roberta.base
    python run.py --arch roberta_base --task MRPC --restore-file <fp checkpoint_best.pt> --lr 1e-6   # I-BERT QAT
    python run.py --arch minilm --task SST-2 --quant-mode none --restore-file data/minilm/model.pt
    python run.py --arch roberta_base --task RTE --quant-mode ternarybert --restore-file <fp ckpt> \\
        --pred-distill --intermediate-distill --save-quantized-model
    python run.py ... --dry-run        # print the fairseq-train command and exit

In Python: ``run.main(argv) -> RunResult`` (raises ``RunError`` for usage errors); ``run.cli(argv) -> exit code``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent
# The plugin fairseq imports with --user-dir (absolute path). IBERT_USER_DIR points at another checkout of it.
USER_DIR = Path(os.environ.get("IBERT_USER_DIR") or REPO / "ibert_plugin").resolve()


# --------------------------------------------------------------------------------------------------------------------
# Task table
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TaskSpec:
    num_classes: int
    lr: float
    bs: int
    total_updates: int
    warmup: int
    max_epoch: int
    metric: str = "accuracy"  # best-checkpoint metric (all GLUE metrics here are higher-is-better)
    metric_flags: Tuple[str, ...] = ()
    valid_interval_sentences: Optional[int] = None  # mid-epoch validation every N training sentences
    valid_subset: str = "valid"
    regression: bool = False
    max_positions: int = 512
    max_tokens: int = 4400
    extra: Tuple[str, ...] = ()
    ternary_bs: int = 32  # TernaryBERT per-task batch size (quant_task_glue.py default_params)


# I-BERT / fairseq README.glue.md numbers (ibert_spec.md §6). RT-SENT (Rotten Tomatoes, ~8.5k train sentences):
# single-sentence like SST-2, 10 epochs at batch 32 = 2670 updates, 6 % warmup (160), lr 1e-5 as SST-2.
# BOOLQ (~9.4k question/passage pairs): RTE's lr/batch, 10 epochs at batch 16 = 5900 updates, 6 % warmup (354),
# passages truncated to 512 positions, max-tokens raised to 16 x 512 so long passages keep the batch size.
TASKS: Dict[str, TaskSpec] = {
    "RTE": TaskSpec(2, 2e-5, 16, 2036, 122, 12),
    "SST-2": TaskSpec(2, 1e-5, 32, 20935, 1256, 12),
    "MNLI": TaskSpec(3, 1e-5, 32, 123873, 7432, 6, valid_interval_sentences=100000, valid_subset="valid,valid1"),
    "QNLI": TaskSpec(2, 1e-5, 32, 33112, 1986, 12, valid_interval_sentences=55000),
    "CoLA": TaskSpec(2, 1e-5, 16, 5336, 320, 12, metric="mcc", metric_flags=("--report-mcc",), ternary_bs=16),
    "QQP": TaskSpec(2, 1e-5, 32, 113272, 28318, 6, metric="acc_and_f1", metric_flags=("--report-acc-and-f1",),
                    valid_interval_sentences=950000),
    "MRPC": TaskSpec(2, 1e-5, 16, 2296, 137, 12, metric="acc_and_f1", metric_flags=("--report-acc-and-f1",)),
    "STS-B": TaskSpec(1, 2e-5, 16, 3598, 214, 12, metric="pearson_and_spearman",
                      metric_flags=("--report-pearson-and-spearman",), regression=True),
    "RT-SENT": TaskSpec(2, 1e-5, 32, 2670, 160, 10),
    "BOOLQ": TaskSpec(2, 2e-5, 16, 5900, 354, 10, max_tokens=8192, extra=("--truncate-sequence",), ternary_bs=16),
}

# --arch -> (fairseq arch, size tag used in output paths, default pretrained checkpoints relative to --model-dir)
ARCHS: Dict[str, Tuple[str, str, Tuple[str, ...]]] = {
    "roberta_base": ("ibert_roberta_base", "base", ("roberta.base/model.pt",)),
    "roberta_large": ("ibert_roberta_large", "large", ("roberta.large/model.pt",)),
    "minilm": ("ibert_roberta_minilm", "minilm", ("minilm/model.pt", "@data/minilm/model.pt")),
    "tiny": ("ibert_roberta_tiny", "tiny", ()),
}

QUANT_MODES = ("none", "symmetric", "ternarybert")
FORCE_DEQUANT = ("none", "gelu", "softmax", "layernorm", "nonlinear")


class RunError(Exception):
    """A usage or environment error: ``cli`` prints ``error: <message>`` (one line) and exits with ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass
class RunResult:
    returncode: int
    task: str
    mode: str
    log_path: Optional[str]
    ckpt_dir: Optional[str]
    checkpoint: Optional[str]  # checkpoint_best.pt when it exists
    metric: str
    best: Optional[float]
    wall_time: float
    argv: List[List[str]]  # the fairseq-train command(s), one per launched process
    resumed: bool = False
    packed_model: Optional[str] = None
    dry_run: bool = False
    failed_step: Optional[str] = None  # "fairseq-train" or "export" when returncode != 0

    def summary(self) -> str:
        best = "n/a" if self.best is None else f"{self.best:g}"
        ckpt = self.packed_model or self.checkpoint or "none"
        return (f"summary: {self.task} [{self.mode}] best dev {self.metric} = {best} | checkpoint: {ckpt} | "
                f"log: {self.log_path} | wall time {self.wall_time:.1f}s")


# --------------------------------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of usage + message
        raise RunError(message, 2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="run.py", description="Fine-tune / quantize RoBERTa-style encoders on GLUE-style tasks "
                "with the ibert_plugin fairseq plugin. Extra fairseq-train flags may follow '--'.")
    p.add_argument("--arch", default="roberta_base", help=f"one of {', '.join(ARCHS)} (default roberta_base)")
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)} (case-sensitive)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: task table; 2e-5 for ternarybert)")
    p.add_argument("--bs", type=int, default=None, help="batch size in sentences (default: task table)")
    p.add_argument("--max-epochs", type=int, default=None, help="max epochs (default: task table; 3 for ternarybert)")
    p.add_argument("--max-update", type=int, default=None, help="stop after N updates (LR schedule unchanged)")
    p.add_argument("--restore-file", default=None,
                   help="checkpoint to start from: pretrained model.pt (none), FP checkpoint_best.pt (symmetric, "
                        "ternarybert; also the ternarybert teacher)")
    p.add_argument("--model-dir", default="models", help="where roberta.base/ etc. live (default models)")
    p.add_argument("--data-dir", default=None,
                   help="folder holding <TASK>-bin (default $IBERT_DATA_DIR or data/glue-bin)")
    p.add_argument("--output-dir", default="outputs", help="root of logs and checkpoints (default outputs)")
    p.add_argument("--no-save", action="store_true", help="do not write checkpoints")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--attn-dropout", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=None, help="default 0.1 (0.01 for ternarybert)")
    p.add_argument("--quant-mode", default="symmetric",
                   help="none (FP), symmetric (I-BERT QAT, default, needs --restore-file) or ternarybert")
    p.add_argument("--force-dequant", default="none", help=f"one of {', '.join(FORCE_DEQUANT)}")
    p.add_argument("--weight-bits", type=int, default=None,
                   help="weight bits: 2..8 for symmetric (default 8); 2 or 8 for ternarybert (default 2)")
    p.add_argument("--input-bits", type=int, default=None, help="activation bits for ternarybert (default 8)")
    p.add_argument("--clip-val", type=float, default=None, help="TernaryBERT clipping value (model default 2.5)")
    p.add_argument("--act-range", choices=["symmetric", "minmax"], default=None)
    p.add_argument("--weight-quant-method", choices=["sym", "twn", "lat"], default=None)
    p.add_argument("--integer-only", action="store_true",
                   help="ternarybert: I-BERT integer dataflow with ternary weights")
    p.add_argument("--pred-distill", action="store_true", help="ternarybert: distil the teacher's logits")
    p.add_argument("--intermediate-distill", action="store_true",
                   help="ternarybert: distil hidden states and attention scores")
    p.add_argument("--save-fp-model", action="store_true", help="ternarybert: keep the float fairseq checkpoints")
    p.add_argument("--save-quantized-model", action="store_true",
                   help="ternarybert: export <ckpt>/model_packed.pt with python -m ibert_plugin.export")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cpu", action="store_true", help="force CPU (default: GPU when available)")
    p.add_argument("--distributed-world-size", type=int, default=1,
                   help="fairseq data-parallel workers (CPU: N gloo processes launched by this driver)")
    p.add_argument("--dry-run", action="store_true", help="print the fairseq-train command and exit")
    p.add_argument("--fresh", action="store_true", help="start a new run instead of resuming an unfinished one")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    args.extra = extra
    _validate(args)
    return args


def _validate(a: argparse.Namespace) -> None:
    if a.task not in TASKS:
        raise RunError(f"unknown task {a.task!r}; valid tasks (case-sensitive): {', '.join(TASKS)}")
    if a.arch not in ARCHS:
        raise RunError(f"unknown arch {a.arch!r}; valid archs: {', '.join(ARCHS)}")
    if a.quant_mode not in QUANT_MODES:
        raise RunError(f"unknown --quant-mode {a.quant_mode!r}; valid: {', '.join(QUANT_MODES)}")
    if a.force_dequant not in FORCE_DEQUANT:
        raise RunError(f"unknown --force-dequant {a.force_dequant!r}; valid: {', '.join(FORCE_DEQUANT)}")
    ternary = a.quant_mode == "ternarybert"
    if a.weight_bits is not None:
        if ternary and a.weight_bits not in (2, 8):
            raise RunError(f"--weight-bits {a.weight_bits} out of range for ternarybert: use 2 or 8")
        if not ternary and not 2 <= a.weight_bits <= 8:
            raise RunError(f"--weight-bits {a.weight_bits} out of range: use 2..8")
    if a.input_bits is not None and not 2 <= a.input_bits <= 8:
        raise RunError(f"--input-bits {a.input_bits} out of range: use 2..8")
    for name in ("bs", "max_epochs", "max_update", "distributed_world_size"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise RunError(f"--{name.replace('_', '-')} must be >= 1 (got {v})")
    if a.lr is not None and not a.lr > 0:
        raise RunError(f"--lr must be > 0 (got {a.lr:g})")
    for name in ("dropout", "attn_dropout"):
        if not 0.0 <= getattr(a, name) < 1.0:
            raise RunError(f"--{name.replace('_', '-')} must be in [0, 1)")
    if not ternary:
        for flag in ("integer_only", "pred_distill", "intermediate_distill", "save_fp_model", "save_quantized_model"):
            if getattr(a, flag):
                raise RunError(f"--{flag.replace('_', '-')} needs --quant-mode ternarybert")


# --------------------------------------------------------------------------------------------------------------------
# Planning: paths and the fairseq-train command
# --------------------------------------------------------------------------------------------------------------------
def fmt_num(x: float) -> str:
    """2e-05 -> '2e-5', 0.1 -> '0.1', 1e-06 -> '1e-6' (the seed's directory names)."""
    s = f"{x:g}"
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), s)


def count_examples(bin_dir: Path, split: str = "train") -> int:
    """Number of examples in a fairseq mmap dataset (reads the .idx header only)."""
    idx = bin_dir / "input0" / f"{split}.idx"
    try:
        with open(idx, "rb") as f:
            head = f.read(26)
    except OSError as e:
        raise RunError(f"cannot read {idx}: {e.strerror}") from None
    if len(head) < 26 or not head.startswith(b"MMIDIDX"):
        raise RunError(f"{idx} is not a fairseq mmap index (binarise with fairseq-preprocess --dataset-impl mmap)")
    return struct.unpack("<Q", head[18:26])[0]


def _use_cpu(a: argparse.Namespace) -> bool:
    if a.cpu:
        return True
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:  # torch missing from this interpreter: fairseq-train will use its own
        return True


def _fairseq_train_cmd() -> List[str]:
    for cand in (Path(sys.executable).parent / "fairseq-train", REPO / ".venv" / "bin" / "fairseq-train"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return [str(cand)]
    return [sys.executable, "-m", "fairseq_cli.train"]


@dataclasses.dataclass
class Plan:
    task: str
    mode: str
    metric: str
    config_dir: Path
    stamp: str
    resumed: bool
    key: dict
    argvs: List[List[str]]
    env_per_rank: List[Dict[str, str]]
    ternary: bool
    export: bool
    keep_fp: bool
    no_save: bool

    @property
    def log_path(self) -> Path:
        return self.config_dir / f"{self.stamp}.log"

    @property
    def ckpt_dir(self) -> Path:
        return self.config_dir / f"{self.stamp}_ckpt"

    @property
    def record_path(self) -> Path:
        return self.config_dir / f"{self.stamp}.json"


def _resume_key(a: argparse.Namespace) -> dict:
    skip = {"dry_run", "fresh", "cpu", "output_dir"}
    key = {k: v for k, v in sorted(vars(a).items()) if k not in skip}
    for k in ("restore_file", "data_dir", "model_dir"):
        if key.get(k):
            key[k] = str(Path(key[k]).resolve())
    return key


def _find_resumable(config_dir: Path, key: dict) -> Optional[str]:
    if not config_dir.is_dir():
        return None
    for rec in sorted(config_dir.glob("*.json"), reverse=True):  # MMDD-HHMMSS names sort chronologically
        try:
            data = json.loads(rec.read_text())
        except (OSError, ValueError):
            continue
        if data.get("key") == key and data.get("status") != "finished":
            return rec.stem
    return None


def _new_stamp(config_dir: Path) -> str:
    base = _dt.datetime.now(_dt.timezone.utc).strftime("%m%d-%H%M%S")
    stamp, n = base, 1
    while (config_dir / f"{stamp}.log").exists() or (config_dir / f"{stamp}.json").exists() \
            or (config_dir / f"{stamp}_ckpt").exists():
        stamp, n = f"{base}-{n}", n + 1
    return stamp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_plan(a: argparse.Namespace) -> Plan:
    spec = TASKS[a.task]
    fairseq_arch, size, pretrained = ARCHS[a.arch]
    ternary = a.quant_mode == "ternarybert"

    data_root = Path(a.data_dir or os.environ.get("IBERT_DATA_DIR") or "data/glue-bin").resolve()
    bin_dir = data_root / f"{a.task}-bin"
    if not (bin_dir / "input0" / "dict.txt").is_file():
        raise RunError(f"data folder not found or incomplete: {bin_dir} (expected input0/dict.txt; build it with "
                       f"scripts/preprocess_GLUE_tasks.sh or pass --data-dir)")

    # --- starting checkpoint -----------------------------------------------------------------------------------
    restore: Optional[Path] = None
    if a.restore_file:
        restore = Path(a.restore_file).resolve()
        if not restore.is_file():
            raise RunError(f"restore file not found: {a.restore_file}")
    elif a.quant_mode == "symmetric":
        raise RunError("--quant-mode symmetric (the default, I-BERT QAT) needs --restore-file <FP fine-tuned "
                       "checkpoint_best.pt>; use --quant-mode none for the FP stage")
    elif ternary:
        raise RunError("--quant-mode ternarybert needs --restore-file <FP fine-tuned checkpoint_best.pt> "
                       "(teacher and student initialisation)")
    else:
        cands = [REPO / c[1:] if c.startswith("@") else Path(a.model_dir) / c for c in pretrained]
        found = [c for c in cands if c.is_file()]
        if found:
            restore = found[0].resolve()
        elif cands:
            raise RunError(f"pretrained model not found: {cands[0]} (pass --restore-file or --model-dir)")
        # tiny: no pretrained model, trains from scratch

    # --- hyper-parameters --------------------------------------------------------------------------------------
    world = a.distributed_world_size
    if ternary:
        bs = a.bs or spec.ternary_bs
        lr = a.lr if a.lr is not None else 2e-5
        epochs = a.max_epochs or 3
        wd = a.weight_decay if a.weight_decay is not None else 0.01
        n_train = count_examples(bin_dir)
        total = max(1, math.ceil(n_train / (bs * world)) * epochs)
        warmup = int(0.1 * total)
        wbits = a.weight_bits or 2
        method = a.weight_quant_method or ("twn" if wbits == 2 else "sym")
        mode = f"ternary_{'int_' if a.integer_only else ''}w{wbits}_{method}"
    else:
        bs = a.bs or spec.bs
        lr = a.lr if a.lr is not None else spec.lr
        epochs = a.max_epochs or spec.max_epoch
        wd = a.weight_decay if a.weight_decay is not None else 0.1
        total = spec.total_updates
        warmup = 0 if a.quant_mode == "symmetric" else spec.warmup
        wbits = a.weight_bits
        method = a.weight_quant_method
        mode = a.quant_mode

    config_dir = Path(a.output_dir).resolve() / mode / f"{a.task}-{size}" / \
        f"wd{fmt_num(wd)}_ad{fmt_num(a.attn_dropout)}_d{fmt_num(a.dropout)}_lr{fmt_num(lr)}"
    key = _resume_key(a)
    stamp = None if (a.fresh or a.no_save) else _find_resumable(config_dir, key)
    resumed = stamp is not None
    if stamp is None:
        stamp = _new_stamp(config_dir)
    ckpt_dir = config_dir / f"{stamp}_ckpt"

    cpu = _use_cpu(a)
    argv: List[str] = _fairseq_train_cmd() + [
        str(bin_dir),
        "--user-dir", str(USER_DIR),
        "--task", "sentence_prediction",
        "--arch", fairseq_arch,
        "--num-classes", str(spec.num_classes),
        "--init-token", "0", "--separator-token", "2",
        "--max-positions", str(spec.max_positions),
        "--valid-subset", spec.valid_subset,
        "--batch-size", str(bs), "--max-tokens", str(spec.max_tokens),
        "--required-batch-size-multiple", "1",
        "--optimizer", "adam",
        "--adam-betas", "(0.9, 0.999)" if ternary else "(0.9, 0.98)", "--adam-eps", "1e-06",
        "--weight-decay", f"{wd:g}", "--clip-norm", "1.0" if ternary else "0.0",
        "--lr-scheduler", "polynomial_decay", "--lr", f"{lr:g}",
        "--total-num-update", str(total), "--warmup-updates", str(warmup),
        "--max-epoch", str(epochs),
        "--dropout", f"{a.dropout:g}", "--attention-dropout", f"{a.attn_dropout:g}",
        "--seed", str(a.seed),
        "--save-dir", str(ckpt_dir), "--no-epoch-checkpoints",
        "--find-unused-parameters",
        "--log-format", "tqdm" if sys.stdout.isatty() else "simple",
    ]
    argv += list(spec.extra)
    if a.max_update:
        argv += ["--max-update", str(a.max_update)]
    if spec.valid_interval_sentences:
        argv += ["--validate-interval-updates", str(max(1, spec.valid_interval_sentences // bs))]

    # quantization flags (model args of ibert_roberta)
    if ternary:
        argv += ["--quant-mode", "symmetric" if a.integer_only else "ternarybert", "--weight-bits", str(wbits),
                 "--weight-quant-method", method, "--input-bits", str(a.input_bits or 8)]
        if a.integer_only or a.force_dequant != "none":
            argv += ["--force-dequant", a.force_dequant]
    else:
        argv += ["--quant-mode", a.quant_mode, "--force-dequant", a.force_dequant]
        if wbits is not None:
            argv += ["--weight-bits", str(wbits)]
        if method is not None:
            argv += ["--weight-quant-method", method]
        if a.input_bits is not None:
            argv += ["--input-bits", str(a.input_bits)]
    if a.clip_val is not None:
        argv += ["--clip-val", f"{a.clip_val:g}"]
    if a.act_range is not None:
        argv += ["--act-range", a.act_range]

    # criterion and metric
    if ternary:
        argv += ["--criterion", "ternary_distill", "--teacher-path", str(restore)]
        if a.pred_distill:
            argv.append("--pred-distill")
        if a.intermediate_distill:
            argv.append("--intermediate-distill")
    else:
        argv += ["--criterion", "sentence_prediction"]
    if spec.regression:
        argv.append("--regression-target")
    argv += list(spec.metric_flags)
    argv += ["--best-checkpoint-metric", spec.metric, "--maximize-best-checkpoint-metric"]

    if restore is not None:
        # first launch: weights only, everything else reset; relaunch: resumes from <save-dir>/checkpoint_last.pt
        argv += ["--finetune-from-model", str(restore)]
    if a.no_save:
        argv.append("--no-save")
    if cpu:
        argv.append("--cpu")

    # distributed
    argvs: List[List[str]] = []
    envs: List[Dict[str, str]] = []
    if world > 1 and cpu:
        port = _free_port()
        threads = str(max(1, (os.cpu_count() or 1) // world))
        for rank in range(world):
            argvs.append(argv + ["--distributed-world-size", str(world), "--distributed-rank", str(rank),
                                 "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
                                 "--distributed-backend", "gloo", "--device-id", "0",
                                 # torch DDP rejects device_ids=[0] for CPU modules; fairseq's legacy_ddp all-reduces
                                 # gradients itself and works with gloo
                                 "--ddp-backend", "legacy_ddp"] + list(a.extra))
            envs.append({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)})
    else:
        if world > 1:
            argv += ["--distributed-world-size", str(world)]
        argvs.append(argv + list(a.extra))
        envs.append({})

    return Plan(task=a.task, mode=mode, metric=spec.metric, config_dir=config_dir, stamp=stamp, resumed=resumed,
                key=key, argvs=argvs, env_per_rank=envs, ternary=ternary, export=ternary and a.save_quantized_model,
                keep_fp=(not ternary) or a.save_fp_model or not a.save_quantized_model, no_save=a.no_save)


# --------------------------------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------------------------------
class _Tee:
    """Copies a child's merged stdout/stderr to our stdout verbatim (tqdm redraws included) and to the log file
    line by line, keeping only the last carriage-return segment of each line."""

    def __init__(self, log_file):
        self.log = log_file
        self.pending = ""

    def feed(self, data: bytes) -> None:
        try:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        except (AttributeError, ValueError):  # stdout replaced (e.g. captured): text only
            sys.stdout.write(data.decode("utf-8", "replace"))
        self.pending += data.decode("utf-8", "replace")
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.log.write(line.rsplit("\r", 1)[-1].rstrip("\r") + "\n")
        self.log.flush()

    def close(self) -> None:
        if self.pending:
            self.log.write(self.pending.rsplit("\r", 1)[-1] + "\n")
            self.pending = ""
        self.log.flush()


def _child_env(extra: Dict[str, str]) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _run_processes(plan: Plan) -> int:
    """Launch the fairseq-train process(es); rank 0 is tee'd to the log, other ranks go to <stamp>.rankN.log."""
    procs: List[subprocess.Popen] = []
    side_logs = []
    with open(plan.log_path, "a", encoding="utf-8") as log:
        tee = _Tee(log)
        try:
            for rank, (argv, env) in enumerate(zip(plan.argvs, plan.env_per_rank)):
                if rank == 0:
                    procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                  env=_child_env(env)))
                else:
                    f = open(plan.config_dir / f"{plan.stamp}.rank{rank}.log", "a", encoding="utf-8")
                    side_logs.append(f)
                    procs.append(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=_child_env(env)))

            def pump():
                fd = procs[0].stdout.fileno()
                while True:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    tee.feed(chunk)

            t = threading.Thread(target=pump, daemon=True)
            t.start()
            rc = 0
            while True:
                codes = [p.poll() for p in procs]
                failed = [c for c in codes if c not in (None, 0)]
                if failed:  # one worker died: the others would block in a collective
                    rc = failed[0]
                    for p in procs:
                        if p.poll() is None:
                            p.terminate()
                    for p in procs:
                        p.wait()
                    break
                if all(c == 0 for c in codes):
                    break
                time.sleep(0.2)
            t.join(timeout=10)
            tee.close()
            return rc
        except BaseException:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            tee.close()
            raise
        finally:
            for f in side_logs:
                f.close()


_FLOAT = r"(-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"


def parse_best(log_text: str, metric: str, subset: str = "valid") -> Optional[float]:
    """Best dev metric from fairseq's validation lines (``best_<metric>`` when logged, else the max seen)."""
    best_re = re.compile(rf"\|\s*best_{re.escape(metric)}\s+{_FLOAT}\s*(?:\||$)")
    val_re = re.compile(rf"\|\s*{re.escape(metric)}\s+{_FLOAT}\s*(?:\||$)")
    tag = f"valid on '{subset}' subset"
    best, seen = None, []
    for line in log_text.splitlines():
        if tag not in line:
            continue
        m = best_re.search(line)
        if m:
            best = float(m.group(1))
        m = val_re.search(line)
        if m:
            seen.append(float(m.group(1)))
    if best is None and seen:
        best = max(seen)
    return best


def _repair_last_checkpoint(ckpt_dir: Path) -> Optional[str]:
    """An interrupted run can leave a truncated checkpoint_last.pt (killed while fairseq copied it). Replace it with
    the newest readable checkpoint in the same folder, or remove it so fairseq restarts from --finetune-from-model."""
    import shutil
    import zipfile

    last = ckpt_dir / "checkpoint_last.pt"
    if not last.is_file() or zipfile.is_zipfile(last):
        return None
    others = sorted((p for p in ckpt_dir.glob("checkpoint*.pt") if p != last and zipfile.is_zipfile(p)),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    if others:
        shutil.copyfile(others[0], last)
        return f"checkpoint_last.pt was truncated; replaced by {others[0].name}"
    last.unlink()
    return "checkpoint_last.pt was truncated and no other checkpoint is readable; removed it"


def _write_record(plan: Plan, status: str, **extra) -> None:
    rec = {"key": plan.key, "status": status, "stamp": plan.stamp, "mode": plan.mode, "task": plan.task,
           "argv": plan.argvs, "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    rec.update(extra)
    tmp = plan.record_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, plan.record_path)


def _export(plan: Plan, log_path: Path) -> Tuple[int, Optional[Path]]:
    best = plan.ckpt_dir / "checkpoint_best.pt"
    if not best.is_file():
        with open(log_path, "a") as log:
            log.write(f"[run.py] export skipped: {best} not found\n")
        return 1, None
    out = plan.ckpt_dir / "model_packed.pt"
    # Every run.py task is sentence_prediction: the masked-LM head is never used, so it is left out of the packed file
    # (docs/packed_format.md, `omitted`).
    cmd = [sys.executable, "-m", "ibert_plugin.export", "--checkpoint", str(best), "--output", str(out),
           "--omit-lm-head"]
    with open(log_path, "a") as log:
        log.write(f"[run.py] {shlex.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=_child_env({})).returncode
    if rc != 0:
        return rc, None
    if not plan.keep_fp:
        for ck in plan.ckpt_dir.glob("checkpoint*.pt"):
            ck.unlink()
    return 0, out


def main(argv: Optional[Sequence[str]] = None) -> RunResult:
    t0 = time.time()
    args = parse_args(argv)
    plan = make_plan(args)

    if args.dry_run:
        for cmd in plan.argvs:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in plan.env_per_rank[0].items())
            print((env + " " if env and len(plan.argvs) > 1 else "") + shlex.join(cmd))
        return RunResult(0, plan.task, plan.mode, str(plan.log_path), str(plan.ckpt_dir), None, plan.metric, None,
                         time.time() - t0, plan.argvs, resumed=plan.resumed, dry_run=True)

    plan.config_dir.mkdir(parents=True, exist_ok=True)
    repair = _repair_last_checkpoint(plan.ckpt_dir) if plan.resumed else None
    with open(plan.log_path, "a", encoding="utf-8") as log:
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        log.write(f"[run.py] {'resume' if plan.resumed else 'start'} {now} (GMT)\n")
        if repair:
            log.write(f"[run.py] {repair}\n")
            print(f"[run.py] {repair}", flush=True)
        for cmd in plan.argvs:
            log.write(f"[run.py] {shlex.join(cmd)}\n")
    _write_record(plan, "running")
    print(f"[run.py] {'resuming' if plan.resumed else 'starting'} {plan.task} [{plan.mode}]; log: {plan.log_path}",
          flush=True)
    try:
        rc = _run_processes(plan)
    except KeyboardInterrupt:
        _write_record(plan, "interrupted")
        raise
    packed, failed_step = None, ("fairseq-train" if rc != 0 else None)
    if rc == 0 and plan.export:
        rc, packed = _export(plan, plan.log_path)
        failed_step = "export" if rc != 0 else None
    _write_record(plan, "finished" if rc == 0 else "failed", returncode=rc)

    best_ckpt = plan.ckpt_dir / "checkpoint_best.pt"
    text = plan.log_path.read_text(encoding="utf-8", errors="replace")
    result = RunResult(
        returncode=rc, task=plan.task, mode=plan.mode, log_path=str(plan.log_path),
        ckpt_dir=None if plan.no_save else str(plan.ckpt_dir),
        checkpoint=str(best_ckpt) if best_ckpt.is_file() else None, metric=plan.metric,
        best=parse_best(text, plan.metric), wall_time=time.time() - t0, argv=plan.argvs, resumed=plan.resumed,
        packed_model=str(packed) if packed else None, failed_step=failed_step)
    return result


def _sigterm(signum, frame):  # treat `kill <run.py pid>` like Ctrl-C: stop the workers, keep the run resumable
    raise KeyboardInterrupt


def cli(argv: Optional[Sequence[str]] = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)
    try:
        result = main(argv)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("error: interrupted; relaunch the same command to resume", file=sys.stderr)
        return 130
    if result.dry_run:
        return 0
    if result.returncode != 0:
        print(f"error: {result.failed_step} failed with exit code {result.returncode}; see {result.log_path}", file=sys.stderr)
        return result.returncode
    print(result.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
