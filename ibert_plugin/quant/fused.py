"""Fused CPU kernels of the symmetric-mode QAT forward (``qat_kernels.cpp``): dyadic requantization with clamp and
i-GELU, one pass each over the float64 carriers instead of PyTorch's chain of elementwise kernels.

They compute the same numbers as the PyTorch reference in :mod:`.primitives` / :mod:`.nonlinear` (which stays the
path on any other device, for non-contiguous inputs, and wherever the extension cannot be built), bit for bit
(``tests/test_qat_kernels.py``). Built on first use (``-O3 -march=native -ffp-contract=off``, vectorised; about a
minute, then cached; :mod:`ibert_plugin._cext`). ``IBERT_QAT_KERNELS=0`` turns them off.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from .. import _cext

_LOCK = threading.Lock()
_MOD = None
_ERR: Optional[str] = None
_SRC = Path(__file__).with_name("qat_kernels.cpp")


def enabled() -> bool:
    """Whether the fused kernels may be used (``IBERT_QAT_KERNELS`` is not ``0``)."""
    return os.environ.get("IBERT_QAT_KERNELS", "1") != "0"


def load():
    """The compiled kernels, or ``None`` when disabled or when they cannot be built here (warned once)."""
    global _MOD, _ERR
    if not enabled():
        return None
    if _MOD is not None or _ERR is not None:
        return _MOD
    with _LOCK:
        if _MOD is None and _ERR is None:
            try:
                # no -ffast-math: every operation stays IEEE; -fno-trapping-math lets GCC vectorise floor/round
                _MOD = _cext.load("ibert_qat_kernels", _SRC, ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off",
                                                              "-fno-math-errno", "-fno-trapping-math"])
            except Exception as e:  # noqa: BLE001  (no compiler, no headers: the PyTorch path computes the same)
                _ERR = _cext.failure(e)
                warnings.warn(f"ibert_plugin: fused QAT kernels unavailable ({_ERR}); using the PyTorch path "
                              f"(same results, slower training on CPU)")
    return _MOD


def error() -> Optional[str]:
    """Why :func:`load` returned ``None`` after trying (``None`` when it loaded, was disabled or was not tried)."""
    return _ERR


def usable(*tensors: Optional[torch.Tensor]):
    """The kernels when every given tensor is a contiguous CPU float32/float64 tensor, else ``None``."""
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or not t.is_contiguous()
                              or t.dtype not in (torch.float32, torch.float64)):
            return None
    return load()


def _per_channel_of(x: torch.Tensor, *consts: Optional[torch.Tensor]) -> bool:
    """Every constant is ``(1,)`` or ``(C,)`` for the last dim ``C`` of ``x`` (the kernels' broadcasting)."""
    c = x.shape[-1] if x.dim() else -1
    return all(t is None or (t.dim() == 1 and t.numel() in (1, c)) for t in consts)


def for_requant(z, m, e, z_id=None, m_id=None, e_id=None):
    """The kernels when :func:`requant_clamp`'s operands fit them (CPU, contiguous, per-channel constants over the
    last dim, a residual of the same shape), else ``None`` (the reference broadcasts anything else)."""
    if not (_per_channel_of(z, m, e) and m.shape == e.shape):
        return None
    if z_id is not None and not (z_id.shape == z.shape and m_id is not None and e_id is not None
                                 and _per_channel_of(z, m_id, e_id) and m_id.shape == e_id.shape):
        return None
    return usable(z, m, e, z_id, m_id, e_id)


def for_gelu(q, *consts):
    """The kernels when i-GELU's operands fit them (see :func:`for_requant`), else ``None``."""
    return usable(q, *consts) if _per_channel_of(q, *consts) else None
