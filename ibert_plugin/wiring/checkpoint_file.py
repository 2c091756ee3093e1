"""Open and validate checkpoint files with torch alone (no fairseq import: ``run.py`` checks files before launching).

fairseq checkpoints pickle their arguments as ``argparse.Namespace`` and best-checkpoint metrics such as ``mcc`` or
``acc_and_f1`` as numpy scalars; :func:`allow_fairseq_pickles` allow-lists exactly those types for torch's
``weights_only=True`` loader instead of switching that safety off.
"""
from __future__ import annotations

import argparse
import os
import warnings
import zipfile
from typing import Any, Dict

__all__ = ["CheckpointError", "allow_fairseq_pickles", "read_checkpoint", "check_fairseq_checkpoint"]

PACKED_FORMAT = "ibert_plugin.packed"  # quant.packing.FORMAT_NAME (kept literal: no torch-heavy import here)


class CheckpointError(ValueError):
    """A file that is missing, unreadable or not the kind of checkpoint asked for (message: one sentence)."""


def allow_fairseq_pickles() -> None:
    """Allow-list ``argparse.Namespace`` and numpy scalars / dtypes for ``torch.load(weights_only=True)``."""
    import numpy as np
    import torch

    torch.serialization.add_safe_globals(
        [argparse.Namespace, np._core.multiarray.scalar, np.dtype, type(np.dtype(np.float64))]
    )


def read_checkpoint(path: str) -> Any:
    """``torch.load`` a checkpoint on the CPU with ``weights_only=True`` (memory-mapped when possible).

    Raises:
        CheckpointError: missing file, or a file torch cannot read ("not a valid checkpoint").
    """
    import pickle

    import torch

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    allow_fairseq_pickles()
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        with open(path, "rb") as f:
            head = f.read(64)
        if head[:1] != b"\x80":  # neither torch's zip archive nor a (legacy torch) pickle: say what it is instead
            raise CheckpointError(f"{path} is not a valid checkpoint ({_describe(head)}; a torch checkpoint is a "
                                  "zip archive written by torch.save)")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol N": torch's aside, not the explanation
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:  # torch's weights_only essay: keep only what it says about the file
        text = str(e)
        reason = text.split("WeightsUnpickler error:", 1)[1].strip() if "WeightsUnpickler error:" in text else text
        reason = _first_line(reason)
        if reason.startswith("Unsupported global"):  # a pickled object outside the allow-list
            name = reason.split("GLOBAL", 1)[-1].split(" was not", 1)[0].strip()
            raise CheckpointError(f"{path} is not a valid checkpoint (it pickles {name}, which no fairseq or "
                                  "plugin checkpoint holds)") from None
        raise _unreadable(path, is_zip, reason) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError,
            zipfile.BadZipFile) as e:
        raise _unreadable(path, is_zip, _first_line(e)) from None


def _unreadable(path: str, is_zip: bool, reason: str) -> CheckpointError:
    kind = "a torch zip archive" if is_zip else "a Python pickle (not a torch.save zip archive)"
    return CheckpointError(f"{path} is not a valid checkpoint ({kind} that torch.load cannot read: {reason})")


def _describe(head: bytes) -> str:
    """What a non-checkpoint file looks like, from its first bytes (for the error message)."""
    if not head:
        return "an empty file"
    if head.startswith(b"PK"):
        return "a truncated or corrupt zip archive"
    try:
        text = head.decode("utf-8")
        if text.isprintable() or all(c.isprintable() or c in "\t\r\n" for c in text):
            return f"a text file starting {text.split(chr(10))[0][:40]!r}"
    except UnicodeDecodeError:
        pass
    return f"a binary file starting with bytes {head[:8].hex(' ')}, not a zip archive"


def _first_line(e) -> str:
    """The first sentence of an exception's message (torch appends paragraphs of advice)."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    return text.splitlines()[0].split(". ")[0].rstrip(".")[:160]


def check_fairseq_checkpoint(path: str) -> Dict[str, Any]:
    """Read ``path`` and check it is a fairseq (or plugin) training checkpoint.

    Returns:
        The loaded state (``{"model": state dict, "cfg" or "args": ...}``; tensors memory-mapped).

    Raises:
        CheckpointError: unreadable file, a packed export, or a file without fairseq's ``model`` state and
            ``cfg`` / ``args`` configuration.
    """
    state = read_checkpoint(path)
    if isinstance(state, dict) and state.get("format") == PACKED_FORMAT:
        raise CheckpointError(f"{path} is a packed model (python -m ibert_plugin.export output), not a fairseq "
                              "checkpoint; use the checkpoint_best.pt it was exported from")
    if not (isinstance(state, dict) and isinstance(state.get("model"), dict)
            and (state.get("cfg") is not None or state.get("args") is not None)):
        raise CheckpointError(f"{path} is not a valid checkpoint (no fairseq 'model' state with 'cfg' or 'args')")
    return state
