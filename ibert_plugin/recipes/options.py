"""``run.py``'s command line: the parser and the up-front checks (one ``error:`` line per impossible request)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

from ..catalog import ARCHS, GLUE_TASKS, TASKS
from ..quant.config import (
    ACT_RANGES,
    FORCE_DEQUANT,
    IBERT_W8A8,
    QUANT_MODES,
    TERNARY_GRANULARITIES,
    TERNARY_METHODS,
    TERNARYBERT_W2A8,
    WEIGHT_METHODS,
    QuantConfig,
)

__all__ = ["RunError", "ErrorParser", "build_parser", "parse_args", "validate", "TERNARY_ONLY_FLAGS"]

#: Flags that only mean something for ``--quant-mode ternarybert``.
TERNARY_ONLY_FLAGS = ("integer_only", "pred_distill", "intermediate_distill", "save_fp_model", "save_quantized_model")


class RunError(Exception):
    """A usage or environment error of either driver (``run.py`` and the SQuAD recipe, whose ``RecipeError`` is this
    class): ``cli`` / ``run_squad`` print ``error: <message>`` (one line) and exit with ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class ErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors raise :class:`RunError` (one clear line instead of usage + message)."""

    def error(self, message):
        raise RunError(message, 2)


def build_parser() -> argparse.ArgumentParser:
    """The ``run.py`` argument parser (the I-BERT seed's flags plus the TernaryBERT and resume ones)."""
    p = ErrorParser(prog="run.py", description="Fine-tune / quantize RoBERTa-style encoders on GLUE-style tasks "
                "with the ibert_plugin fairseq plugin. Extra fairseq-train flags may follow '--'.")
    p.add_argument("--arch", default="roberta_base", help=f"one of {', '.join(ARCHS)} (default roberta_base)")
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)} (case-sensitive; SQuAD "
                   "tasks take the SQuAD driver's flags: run.py --task SQUAD1 --help)")
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
    p.add_argument("--input-bits", type=int, default=None, help="activation bits, 2..8 (default 8)")
    p.add_argument("--clip-val", type=float, default=None,
                   help="TernaryBERT clipping value of activations and ternary weights, > 0 (model default 2.5)")
    p.add_argument("--act-range", choices=list(ACT_RANGES), default=None,
                   help="TernaryBERT activation quantizer (ternarybert without --integer-only)")
    p.add_argument("--weight-quant-method", choices=list(WEIGHT_METHODS), default=None,
                   help="sym (any bits), twn or lat (ternary: --weight-bits 2)")
    p.add_argument("--ternary-linear", choices=list(TERNARY_GRANULARITIES), default=None,
                   help="ternary Linear weights: one alpha per matrix (tensor, TernaryBERT; default) or per output "
                        "row (row)")
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
    """Parse and validate; everything after ``--`` goes to fairseq-train verbatim (``args.extra``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    args.extra = extra
    validate(args)
    return args


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(a: argparse.Namespace) -> None:
    """Refuse impossible or meaningless combinations before anything runs.

    Raises:
        RunError: one sentence naming the flag(s).
    """
    if a.task not in GLUE_TASKS:
        valid = ", ".join(TASKS)
        raise RunError(f"unknown task {a.task!r}; valid tasks (case-sensitive): {valid}")
    if a.arch not in ARCHS:
        raise RunError(f"unknown arch {a.arch!r}; valid archs: {', '.join(ARCHS)}")
    if a.quant_mode not in QUANT_MODES:
        raise RunError(f"unknown --quant-mode {a.quant_mode!r}; valid: {', '.join(QUANT_MODES)}")
    if a.force_dequant not in FORCE_DEQUANT:
        raise RunError(f"unknown --force-dequant {a.force_dequant!r}; valid: {', '.join(FORCE_DEQUANT)}")
    for name in ("bs", "max_epochs", "max_update", "distributed_world_size"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise RunError(f"{_flag(name)} must be >= 1 (got {v})")
    if a.lr is not None and not a.lr > 0:
        raise RunError(f"--lr must be > 0 (got {a.lr:g})")
    if a.weight_decay is not None and not a.weight_decay >= 0:
        raise RunError(f"--weight-decay must be >= 0 (got {a.weight_decay:g})")
    for name in ("dropout", "attn_dropout"):
        if not 0.0 <= getattr(a, name) < 1.0:
            raise RunError(f"{_flag(name)} must be in [0, 1)")
    _validate_quantization(a)


def _validate_quantization(a: argparse.Namespace) -> None:
    ternary = a.quant_mode == "ternarybert"
    if not ternary:
        for name in TERNARY_ONLY_FLAGS:
            if getattr(a, name):
                raise RunError(f"{_flag(name)} needs --quant-mode ternarybert")
    if a.quant_mode == "none":
        for name in ("weight_bits", "input_bits", "clip_val", "act_range", "weight_quant_method"):
            if getattr(a, name) is not None:
                raise RunError(f"{_flag(name)} has no effect with --quant-mode none (full precision)")
        if a.force_dequant != "none":
            raise RunError("--force-dequant has no effect with --quant-mode none (full precision)")
    integer = a.quant_mode == "symmetric" or (ternary and a.integer_only)
    if not integer and a.force_dequant != "none":
        raise RunError("--force-dequant only applies to the integer dataflow (--quant-mode symmetric or "
                       "ternarybert --integer-only)")
    if integer and a.act_range is not None:
        raise RunError("--act-range selects TernaryBERT's float activation quantizer; the integer dataflow "
                       "(symmetric, --integer-only) always uses symmetric 8-bit activations")
    if a.weight_bits is not None:
        if ternary and a.weight_bits not in (2, 8):
            raise RunError(f"--weight-bits {a.weight_bits} out of range for ternarybert: use 2 or 8")
        if not 2 <= a.weight_bits <= 8:
            raise RunError(f"--weight-bits {a.weight_bits} out of range: use 2..8")
    if a.input_bits is not None and not 2 <= a.input_bits <= 8:
        raise RunError(f"--input-bits {a.input_bits} out of range: use 2..8")
    if a.clip_val is not None and not a.clip_val > 0:
        raise RunError(f"--clip-val must be > 0 (got {a.clip_val:g})")
    wbits = a.weight_bits or (TERNARYBERT_W2A8 if ternary else IBERT_W8A8).weight_bits
    if a.weight_quant_method in TERNARY_METHODS and wbits != 2:
        raise RunError(f"--weight-quant-method {a.weight_quant_method} ternarizes weights: it needs --weight-bits 2 "
                       f"(got {wbits})")
    if a.ternary_linear is not None and not (wbits == 2 and a.weight_quant_method in (None, *TERNARY_METHODS)
                                             and a.quant_mode != "none"):
        raise RunError("--ternary-linear sets the granularity of ternary weights: it needs --weight-bits 2 with "
                       "--weight-quant-method twn or lat")
    if a.quant_mode != "none":  # whatever else the one QuantConfig refuses, refused here with its sentence
        try:
            QuantConfig.from_namespace(argparse.Namespace(
                quant_mode="symmetric" if integer else a.quant_mode, force_dequant=a.force_dequant,
                weight_bits=wbits, weight_quant_method=a.weight_quant_method, input_bits=a.input_bits,
                clip_val=a.clip_val, act_range=a.act_range, ternary_linear=a.ternary_linear))
        except ValueError as e:
            raise RunError(f"invalid quantization flags: {e}") from None
