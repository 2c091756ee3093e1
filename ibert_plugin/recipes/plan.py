"""Planning one ``run.py`` stage: every path and flag of the fairseq-train command(s), nothing executed.

Each function does one thing: :func:`resolve_restore` (the starting checkpoint), :func:`hyper_parameters`,
:func:`training_command` (data, optimizer, schedule), :func:`quantization_flags`, :func:`criterion_flags`,
:func:`distributed_commands`, :func:`output_layout` and the resume records (:func:`resume_key`,
:func:`find_resumable`); :func:`make_plan` strings them together.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import re
import socket
import struct
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..catalog import ARCHS, GLUE_TASKS, TaskSpec
from ..quant.config import IBERT_W8A8, TERNARYBERT_W2A8, ConfigError, QuantConfig
from ..wiring.checkpoint_file import CheckpointError, check_fairseq_checkpoint
from .options import RunError
from .schedules import FP_OPTIMIZER, TERNARY, TERNARY_OPTIMIZER

PLUGIN_DIR = Path(__file__).resolve().parents[1]
REPO = PLUGIN_DIR.parent


def user_dir() -> Path:
    """The plugin fairseq imports with ``--user-dir`` (absolute; ``$IBERT_USER_DIR`` points at another checkout)."""
    return Path(os.environ.get("IBERT_USER_DIR") or PLUGIN_DIR).resolve()


@dataclasses.dataclass
class Plan:
    """Everything one stage needs to run: commands, their environments, output locations, resume key."""

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


@dataclasses.dataclass(frozen=True)
class HyperParameters:
    """Schedule and quantization choices of a stage (after defaults)."""

    bs: int
    lr: float
    epochs: int
    weight_decay: float
    total_updates: int
    warmup: int
    weight_bits: Optional[int]
    method: Optional[str]
    mode: str  # output folder name: none, symmetric, ternary_[int_]w<bits>_<method>
    optimizer: Dict[str, object]


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


def data_dir(a: argparse.Namespace) -> Path:
    """``<data-dir>/<TASK>-bin``, checked to hold a binarised dataset."""
    root = Path(a.data_dir or os.environ.get("IBERT_DATA_DIR") or "data/glue-bin").resolve()
    bin_dir = root / f"{a.task}-bin"
    if not (bin_dir / "input0" / "dict.txt").is_file():
        raise RunError(f"data folder not found or incomplete: {bin_dir} (expected input0/dict.txt; build it with "
                       f"scripts/preprocess_GLUE_tasks.sh or pass --data-dir)")
    # fairseq-train loads train and validates on valid: a missing split would only fail after the model is built
    missing = [f"input0/{split}.{ext}" for split in ("train", "valid") for ext in ("bin", "idx")
               if not (bin_dir / "input0" / f"{split}.{ext}").is_file()]
    if missing:
        raise RunError(f"data folder {bin_dir} has no {', '.join(missing)} (the train and valid splits fairseq-train "
                       f"needs; re-run scripts/preprocess_GLUE_tasks.sh)")
    return bin_dir


def resolve_restore(a: argparse.Namespace) -> Optional[Path]:
    """The checkpoint the stage starts from (``None``: the tiny arch from scratch), checked to be a readable fairseq
    or plugin checkpoint so that a corrupt or foreign file fails here, not inside fairseq-train."""
    if a.restore_file:
        restore = Path(a.restore_file).resolve()
        if not restore.is_file():
            raise RunError(f"restore file not found: {a.restore_file}")
    elif a.quant_mode == "symmetric":
        raise RunError("--quant-mode symmetric (the default, I-BERT QAT) needs --restore-file <FP fine-tuned "
                       "checkpoint_best.pt>; use --quant-mode none for the FP stage")
    elif a.quant_mode == "ternarybert":
        raise RunError("--quant-mode ternarybert needs --restore-file <FP fine-tuned checkpoint_best.pt> "
                       "(teacher and student initialisation)")
    else:
        cands = ARCHS[a.arch].pretrained_paths(Path(a.model_dir))
        found = [c for c in cands if c.is_file()]
        if not found:
            if cands:
                raise RunError(f"pretrained model not found: {cands[0]} (pass --restore-file or --model-dir)")
            return None
        restore = found[0].resolve()
    try:
        check_fairseq_checkpoint(str(restore))
    except CheckpointError as e:
        raise RunError(f"--restore-file: {e}") from None
    return restore


def hyper_parameters(a: argparse.Namespace, spec: TaskSpec, bin_dir: Path) -> HyperParameters:
    """Batch, lr, epochs, weight decay, schedule length/warmup and weight quantization of the stage.

    FP: the task table. I-BERT QAT: the same with 0 warmup. TernaryBERT: :data:`~.schedules.TERNARY` with the schedule
    counted from the training set (``ceil(n / (bs * world)) * epochs`` updates, 10 % warmup).
    """
    if a.quant_mode == "ternarybert":
        bs = a.bs or spec.ternary_bs
        epochs = a.max_epochs or TERNARY.epochs
        total = max(1, math.ceil(count_examples(bin_dir) / (bs * a.distributed_world_size)) * epochs)
        wbits = a.weight_bits or TERNARYBERT_W2A8.weight_bits
        method = a.weight_quant_method or (TERNARYBERT_W2A8.weight_method if wbits == 2 else IBERT_W8A8.weight_method)
        return HyperParameters(
            bs=bs, lr=a.lr if a.lr is not None else TERNARY.lr, epochs=epochs,
            weight_decay=a.weight_decay if a.weight_decay is not None else TERNARY.weight_decay,
            total_updates=total, warmup=int(TERNARY.warmup_fraction * total), weight_bits=wbits, method=method,
            mode=f"ternary_{'int_' if a.integer_only else ''}w{wbits}_{method}", optimizer=TERNARY_OPTIMIZER)
    return HyperParameters(
        bs=a.bs or spec.bs, lr=a.lr if a.lr is not None else spec.lr, epochs=a.max_epochs or spec.max_epoch,
        weight_decay=a.weight_decay if a.weight_decay is not None else FP_OPTIMIZER["weight_decay"],
        total_updates=spec.total_updates, warmup=0 if a.quant_mode == "symmetric" else spec.warmup,
        weight_bits=a.weight_bits, method=a.weight_quant_method, mode=a.quant_mode, optimizer=FP_OPTIMIZER)


def quantization_flags(a: argparse.Namespace, hp: HyperParameters) -> List[str]:
    """The ``ibert_roberta`` model flags (``--quant-mode`` ... ``--ternary-linear``): the settings the stage fixes
    (TernaryBERT: mode, weight bits and method, activation bits from :data:`TERNARYBERT_W2A8`; the others: what was
    given), spelled by :meth:`QuantConfig.to_flags` from the configuration fairseq will build
    (:meth:`QuantConfig.from_namespace`, so that a bad combination fails here).
    """
    ternary = a.quant_mode == "ternarybert"
    given = {"quant_mode": "symmetric" if ternary and a.integer_only else a.quant_mode,
             "force_dequant": a.force_dequant, "weight_bits": hp.weight_bits, "weight_quant_method": hp.method,
             "input_bits": (a.input_bits or TERNARYBERT_W2A8.act_bits) if ternary else a.input_bits,
             "clip_val": a.clip_val, "act_range": a.act_range, "ternary_linear": getattr(a, "ternary_linear", None)}
    try:
        cfg = QuantConfig.from_namespace(argparse.Namespace(**given))
    except ConfigError as e:
        raise RunError(str(e)) from None
    if ternary:
        fields = ["quant_mode", "weight_bits", "weight_method", "act_bits"]
        fields += ["force_dequant"] if a.integer_only or a.force_dequant != "none" else []
    else:
        fields = ["quant_mode", "force_dequant"] + [field for field, flag in (
            ("weight_bits", "weight_bits"), ("weight_method", "weight_quant_method"), ("act_bits", "input_bits"))
            if given[flag] is not None]
    fields += [f for f in ("clip_val", "act_range", "ternary_linear") if given[f] is not None]
    return cfg.to_flags(fields)


def criterion_flags(a: argparse.Namespace, spec: TaskSpec, restore: Optional[Path]) -> List[str]:
    """Criterion (``ternary_distill`` with the teacher, or ``sentence_prediction``) and best-checkpoint metric."""
    if a.quant_mode == "ternarybert":
        flags = ["--criterion", "ternary_distill", "--teacher-path", str(restore)]
        flags += ["--pred-distill"] if a.pred_distill else []
        flags += ["--intermediate-distill"] if a.intermediate_distill else []
    else:
        flags = ["--criterion", "sentence_prediction"]
    if spec.regression:
        flags.append("--regression-target")
    return flags + list(spec.metric_flags) + ["--best-checkpoint-metric", spec.metric,
                                               "--maximize-best-checkpoint-metric"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_commands(argv: List[str], world: int, cpu: bool,
                         extra: List[str]) -> Tuple[List[List[str]], List[Dict[str, str]]]:
    """One command per process: CPU data parallelism launches ``world`` gloo ranks itself (each with its share of
    the cores), GPU leaves spawning to fairseq. ``extra`` (the flags after ``--``) goes last: fairseq keeps the last
    occurrence of a flag."""
    if world > 1 and cpu:
        port = _free_port()
        threads = str(max(1, (os.cpu_count() or 1) // world))
        # torch DDP rejects device_ids=[0] for CPU modules; fairseq's legacy_ddp all-reduces gradients itself
        rank_flags = ["--distributed-world-size", str(world), "--distributed-init-method", f"tcp://127.0.0.1:{port}",
                      "--distributed-no-spawn", "--distributed-backend", "gloo", "--device-id", "0",
                      "--ddp-backend", "legacy_ddp"]
        argvs = [argv + rank_flags + ["--distributed-rank", str(r)] + list(extra) for r in range(world)]
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
        return argvs, [dict(env) for _ in range(world)]
    if world > 1:
        argv = argv + ["--distributed-world-size", str(world)]
    return [argv + list(extra)], [{}]


def output_layout(a: argparse.Namespace, hp: HyperParameters) -> Path:
    """``<output-dir>/<mode>/<TASK>-<size>/wd<wd>_ad<ad>_d<d>_lr<lr>`` (the seed's naming)."""
    size = ARCHS[a.arch].size
    return Path(a.output_dir).resolve() / hp.mode / f"{a.task}-{size}" / \
        f"wd{fmt_num(hp.weight_decay)}_ad{fmt_num(a.attn_dropout)}_d{fmt_num(a.dropout)}_lr{fmt_num(hp.lr)}"


def resume_key(a: argparse.Namespace) -> dict:
    """The arguments that identify a run for resuming (paths made absolute; launch-only flags left out)."""
    skip = {"dry_run", "fresh", "cpu", "output_dir"}
    key = {k: v for k, v in sorted(vars(a).items()) if k not in skip}
    for k in ("restore_file", "data_dir", "model_dir"):
        if key.get(k):
            key[k] = str(Path(key[k]).resolve())
    return key


def find_resumable(config_dir: Path, key: dict) -> Optional[str]:
    """Stamp of the newest unfinished run of ``key`` in ``config_dir`` (its ``<stamp>.json`` record), if any."""
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


def new_stamp(config_dir: Path) -> str:
    """A fresh GMT ``MMDD-HHMMSS`` stamp (suffixed ``-N`` if taken)."""
    base = _dt.datetime.now(_dt.timezone.utc).strftime("%m%d-%H%M%S")
    stamp, n = base, 1
    while any((config_dir / f"{stamp}{s}").exists() for s in (".log", ".json", "_ckpt")):
        stamp, n = f"{base}-{n}", n + 1
    return stamp


def fairseq_train_cmd() -> List[str]:
    """``fairseq-train`` next to this interpreter (or in the repo's .venv), else ``python -m fairseq_cli.train``."""
    for cand in (Path(sys.executable).parent / "fairseq-train", REPO / ".venv" / "bin" / "fairseq-train"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return [str(cand)]
    return [sys.executable, "-m", "fairseq_cli.train"]


def use_cpu(a: argparse.Namespace) -> bool:
    if a.cpu:
        return True
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:  # torch missing from this interpreter: fairseq-train will use its own
        return True


def optimizer_flags(opt: Dict[str, object], weight_decay: float, lr: float) -> List[str]:
    """Adam with the settings ``opt`` (:data:`~.schedules.FP_OPTIMIZER` or :data:`~.schedules.TERNARY_OPTIMIZER`),
    ``weight_decay`` and the polynomial-decay schedule peaking at ``lr`` (both recipes' fairseq-train flags)."""
    return ["--optimizer", "adam", "--adam-betas", str(opt["adam_betas"]), "--adam-eps", f"{opt['adam_eps']:.0e}",
            "--weight-decay", f"{weight_decay:g}", "--clip-norm", f"{opt['clip_norm']:.1f}",
            "--lr-scheduler", "polynomial_decay", "--lr", f"{lr:g}"]


def training_command(a: argparse.Namespace, spec: TaskSpec, hp: HyperParameters, bin_dir: Path,
                     save_dir: Path) -> List[str]:
    """fairseq-train with the data, task, architecture, batching, optimizer, schedule and checkpointing flags."""
    opt = hp.optimizer
    argv = fairseq_train_cmd() + [
        str(bin_dir), "--user-dir", str(user_dir()),
        "--task", spec.fairseq_task, "--arch", ARCHS[a.arch].fairseq_arch, "--num-classes", str(spec.num_classes),
        "--init-token", "0", "--separator-token", "2", "--max-positions", str(spec.max_positions),
        "--valid-subset", spec.valid_subset,
        "--batch-size", str(hp.bs), "--max-tokens", str(spec.max_tokens), "--required-batch-size-multiple", "1",
        *optimizer_flags(opt, hp.weight_decay, hp.lr),
        "--total-num-update", str(hp.total_updates), "--warmup-updates", str(hp.warmup), "--max-epoch", str(hp.epochs),
        "--dropout", f"{a.dropout:g}", "--attention-dropout", f"{a.attn_dropout:g}", "--seed", str(a.seed),
        "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--find-unused-parameters",
        "--log-format", "tqdm" if sys.stdout.isatty() else "simple",
    ]
    argv += ["--truncate-sequence"] if spec.truncate else []
    argv += ["--max-update", str(a.max_update)] if a.max_update else []
    interval = spec.validate_interval_updates(hp.bs)
    argv += ["--validate-interval-updates", str(interval)] if interval else []
    return argv + (["--no-save"] if a.no_save else [])


def make_plan(a: argparse.Namespace) -> Plan:
    """The full plan of a validated ``run.py`` invocation (raises :class:`RunError` on missing inputs)."""
    spec = GLUE_TASKS[a.task]
    bin_dir = data_dir(a)
    restore = resolve_restore(a)
    hp = hyper_parameters(a, spec, bin_dir)
    config_dir = output_layout(a, hp)
    key = resume_key(a)
    stamp = None if (a.fresh or a.no_save) else find_resumable(config_dir, key)
    resumed = stamp is not None
    stamp = stamp or new_stamp(config_dir)
    cpu = use_cpu(a)
    argv = training_command(a, spec, hp, bin_dir, config_dir / f"{stamp}_ckpt")
    argv += quantization_flags(a, hp) + criterion_flags(a, spec, restore)
    # first launch: weights only, everything else reset; relaunch: resumes from <save-dir>/checkpoint_last.pt
    argv += ["--finetune-from-model", str(restore)] if restore is not None else []
    argv += ["--cpu"] if cpu else []
    argvs, envs = distributed_commands(argv, a.distributed_world_size, cpu, a.extra)
    ternary = a.quant_mode == "ternarybert"
    return Plan(task=a.task, mode=hp.mode, metric=spec.metric, config_dir=config_dir, stamp=stamp, resumed=resumed,
                key=key, argvs=argvs, env_per_rank=envs, ternary=ternary, export=ternary and a.save_quantized_model,
                keep_fp=(not ternary) or a.save_fp_model or not a.save_quantized_model, no_save=a.no_save)
