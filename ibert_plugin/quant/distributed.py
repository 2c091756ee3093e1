"""Quantization state that agrees on every data-parallel rank (plain ``torch.distributed``, no fairseq).

Data-parallel training gives each rank a different shard of the global batch. Gradients are all-reduced by the
trainer, but buffers are not (fairseq's ``legacy_ddp`` never broadcasts them, and ``broadcast_buffers=False`` is
fairseq's default for torch DDP): without the helpers below every rank would keep its own activation ranges,
LayerNorm shifts and LAT curvature, and only rank 0's would be saved. The modules reduce their *per-batch
statistics* over the ranks before updating their state, so every rank applies the same update, equal to the one a
single worker computes on the whole global batch:

* :func:`sync_min_max`: QuantAct's batch ``min`` (MIN over ranks) and ``max`` (MAX) before the EMA (I-BERT §3.1);
* :func:`all_reduce_max`: the IntLayerNorm shift, a monotone function of the batch's largest variance (I-BERT §3.5),
  so the MAX of the per-rank shifts is the shift of the global batch;
* :func:`all_reduce_sum`: LAT's gradient before its square enters the second moment (Hou & Kwok 2018). fairseq's
  criteria return losses summed over the sentences and normalise gradients only after the all-reduce, so the
  gradient LAT sees on a rank is a sum over its shard, and the SUM over ranks is exactly the gradient a single worker
  sees on the global batch.

Every helper returns its input unchanged (no communication, no host synchronisation) when ``torch.distributed`` is
not initialised or the world has one rank. Inputs are never modified in place.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

__all__ = ["world_size", "sync_min_max", "all_reduce_max", "all_reduce_sum"]


def world_size() -> int:
    """Number of ranks of the default process group (1 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def sync_min_max(lo: torch.Tensor, hi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Global ``(min over ranks of lo, max over ranks of hi)`` with one all-reduce.

    Args:
        lo, hi: per-rank statistics of the same shape (QuantAct: float32 ``(1,)``).

    Returns:
        New tensors of the input shapes (``lo``/``hi`` themselves on a single rank).
    """
    if world_size() == 1:
        return lo, hi
    n = lo.numel()
    both = torch.cat([lo.detach().reshape(-1).neg(), hi.detach().reshape(-1).to(lo.dtype)])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)  # min(a) = -max(-a): one collective for both
    return both[:n].neg().reshape(lo.shape), both[n:].reshape(hi.shape).to(hi.dtype)


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise MAX over ranks (IntLayerNorm shift). Returns a new tensor (``t`` itself on a single rank)."""
    return _all_reduce(t, dist.ReduceOp.MAX)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Elementwise SUM over ranks (LAT gradient). Returns a new tensor (``t`` itself on a single rank)."""
    return _all_reduce(t, dist.ReduceOp.SUM)
