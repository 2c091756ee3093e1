"""Ternary (2-bit) weight quantizers: TWN and LAT, as used by TernaryBERT.

TernaryBERT (Zhang et al., EMNLP 2020, arXiv:2009.12812) ternarizes every weight matrix to ``alpha * b`` with
``b in {-1, 0, +1}``:

* ``twn`` -- Ternary Weight Networks (Li et al., 2016), the approximation used by the released TernaryBERT code:
  ``Delta = 0.7 * mean|w|``, ``b = sign(w) * [|w| > Delta]``, ``alpha = mean(|w| over |w| > Delta)``.
* ``lat`` -- loss-aware ternarization (Hou & Kwok, ICLR 2018, "Loss-aware weight quantization of deep networks"),
  described in the TernaryBERT paper but not in its released code: ``min_{alpha, b} (w - alpha b)^T D (w - alpha b)``
  with ``D = diag(sqrt(v) + eps)`` from Adam's second moment ``v``, solved by the alternating closed form
  ``b = sign(w) * [|w| > alpha / 2]``, ``alpha = sum(d |w| |b|) / sum(d |b|)``, started from the TWN solution.

Granularity: layer-wise (one ``alpha`` for the whole matrix, broadcast to every output row) for Linear weights,
row-wise (one ``alpha`` per row) for the word embedding (``rowwise=True``). Both return the carrier of
``docs/integer_spec.md``: ``w_int`` (float tensor of exact integers in ``{-1, 0, 1}``, same shape as the weight) and
``scale`` (float32, shape ``(out_features,)``, i.e. one entry per weight row).

Upstream parity: weights are clipped to ``[-clip_val, clip_val]`` (2.5) before ternarization; the straight-through
estimator passes the gradient of ``w_int * scale`` unchanged to the latent float weight inside the clip range and
zeroes it where ``|w| >= clip_val`` (``utils_quant.py`` semantics). No gradient flows through ``alpha``.
Deviation: a row with nothing above ``Delta`` (only possible for an all-zero row) gets ``alpha = 0`` and an all-zero
``w_int`` instead of upstream's NaN; its latent weights receive no gradient (``w_int * 0`` carries none).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .config import QuantConfig
from .distributed import all_reduce_sum
from .weight import WeightQuantizer, register_weight_quantizer

__all__ = [
    "twn_ternarize",
    "lat_ternarize",
    "TernarySTE",
    "TWNWeightQuantizer",
    "LATWeightQuantizer",
]

TWN_DELTA_FACTOR = 0.7


def _rows(w: torch.Tensor) -> torch.Tensor:
    """View ``w`` as ``(rows, -1)`` (rows = dim 0 = output features / embedding rows)."""
    return w.reshape(w.shape[0], -1)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den > 0``, else 0 (guards empty masks: no NaN)."""
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(num.dtype).tiny), torch.zeros_like(num))


def twn_ternarize(w: torch.Tensor, rowwise: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """TWN ternarization of an (already clipped) weight, no autograd.

    Args:
        w: float weight of shape ``(rows, ...)``.
        rowwise: one ``alpha`` per row (embeddings) instead of one per tensor.

    Returns:
        ``(b, alpha)``: ``b`` in ``{-1, 0, 1}`` (dtype of ``w``, shape of ``w``); ``alpha`` of shape ``(rows,)``
        (row-wise) or ``()`` (layer-wise), ``0`` where no entry exceeds ``Delta``.
    """
    a = _rows(w).abs()
    if rowwise:
        delta = TWN_DELTA_FACTOR * a.mean(dim=1, keepdim=True)
        mask = a > delta
        alpha = _safe_div((a * mask).sum(dim=1), mask.sum(dim=1).to(a.dtype))
    else:
        delta = TWN_DELTA_FACTOR * a.mean()
        mask = a > delta
        alpha = _safe_div((a * mask).sum(), mask.sum().to(a.dtype))
    b = torch.sign(_rows(w)) * mask + 0.0  # + 0.0 turns -0.0 into 0.0
    return b.reshape(w.shape), alpha


def lat_ternarize(
    w: torch.Tensor, d: torch.Tensor, rowwise: bool = False, iters: int = 5, start: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Loss-aware ternarization with diagonal curvature ``d`` (Hou & Kwok 2018, closed-form alternation).

    Minimises ``sum d * (w - alpha * b)^2`` over ``b in {-1,0,1}`` and ``alpha >= 0`` (per tensor or per row)
    by alternating ``alpha = sum(d |w| |b|) / sum(d |b|)`` and ``b = sign(w) [|w| > alpha / 2]``, starting
    from TWN's ``b``. The last step recomputes ``alpha`` from the final ``b`` so the pair is consistent.

    Args:
        w: clipped float weight, shape ``(rows, ...)``.
        d: positive curvature, same shape as ``w`` (``sqrt(v) + eps``).
        rowwise: per-row ``alpha`` (embedding) instead of per tensor.
        iters: number of ``(alpha, b)`` alternations after the TWN start.
        start: TWN's ``b`` for ``w`` when the caller already has it (shape of ``w``); computed otherwise.

    Returns:
        ``(b, alpha)`` as in :func:`twn_ternarize`.
    """
    b = twn_ternarize(w, rowwise)[0] if start is None else start
    a = _rows(w).abs()
    d = _rows(d).to(a.dtype)
    b = _rows(b)
    sgn = torch.sign(_rows(w))

    def solve_alpha(bb: torch.Tensor) -> torch.Tensor:
        m = bb.abs()
        if rowwise:
            return _safe_div((d * a * m).sum(dim=1), (d * m).sum(dim=1))
        return _safe_div((d * a * m).sum(), (d * m).sum())

    for _ in range(iters):
        alpha = solve_alpha(b)
        thr = (alpha.unsqueeze(1) if rowwise else alpha) / 2
        b = sgn * (a > thr) + 0.0
    alpha = solve_alpha(b)
    return b.reshape(w.shape), alpha


class TernarySTE(torch.autograd.Function):
    """Returns ``b`` (exact integers); backward ``d b / d w = 1 / alpha_row`` inside ``(-clip, clip)``, else 0.

    So ``b * alpha`` passes the incoming gradient unchanged to ``w`` inside the clip range (upstream STE).
    ``observer`` (LAT) receives the latent weight's gradient in backward: the second moment is updated from the
    gradient itself, with no tensor hook to keep track of.
    """

    @staticmethod
    def forward(ctx, w, b, inv_scale, clip_val: float, observer=None):  # noqa: D401
        ctx.save_for_backward(w, inv_scale)
        ctx.clip_val = clip_val
        ctx.observer = observer
        return b.clone()

    @staticmethod
    def backward(ctx, grad):
        w, inv_scale = ctx.saved_tensors
        c = ctx.clip_val
        inside = (w > -c) & (w < c)
        inv = inv_scale.reshape((-1,) + (1,) * (w.dim() - 1)).to(grad.dtype)
        g = torch.where(inside, grad * inv, torch.zeros_like(grad))
        if ctx.observer is not None:
            ctx.observer.update_second_moment(g)
        return g, None, None, None, None


class _TernaryBase(WeightQuantizer):
    """Shared clip / STE / output-carrier logic for the ternary quantizers.

    Args:
        cfg: the ``QuantConfig`` (``None``: its defaults); reads ``clip_val`` (2.5).
        rowwise: one ``alpha`` per row (word embedding) instead of one per matrix (Linear).
    """

    bits = 2

    def __init__(self, cfg: Optional[QuantConfig] = None, rowwise: bool = False):
        super().__init__()
        cfg = QuantConfig() if cfg is None else cfg
        self.rowwise = bool(rowwise)
        self.clip_val = float(cfg.clip_val)

    def extra_repr(self) -> str:
        return f"bits=2, rowwise={self.rowwise}, clip_val={self.clip_val}"

    def _ternarize(self, wc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _observer(self) -> Optional["LATWeightQuantizer"]:
        """The module whose ``update_second_moment`` sees the weight's gradient (LAT only)."""
        return None

    def forward(self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Ternarize ``weight``.

        Args:
            weight: latent float weight, shape ``(out_features, in_features)`` or ``(num_embeddings, dim)``.

        Returns:
            ``(w_int, scale)``: ``w_int`` in ``{-1, 0, 1}`` with the dtype and shape of ``weight`` (2-bit codes,
            STE gradient); ``scale`` float32 of shape ``(out_features,)``: ``alpha`` repeated on every row
            (layer-wise) or one ``alpha`` per row (row-wise). Not differentiable.
        """
        c = self.clip_val
        with torch.no_grad():
            wc = weight.detach().float().clamp(-c, c)
            b, alpha = self._ternarize(wc)
            rows = weight.shape[0]
            scale = alpha.reshape(-1).expand(rows).contiguous() if alpha.dim() == 0 else alpha
            scale = scale.float()
            inv = torch.where(scale > 0, 1.0 / scale.clamp(min=torch.finfo(scale.dtype).tiny), torch.zeros_like(scale))
        observer = self._observer() if weight.requires_grad and torch.is_grad_enabled() else None
        w_int = TernarySTE.apply(weight, b.to(weight.dtype), inv, c, observer)
        return w_int, scale


@register_weight_quantizer("twn")
class TWNWeightQuantizer(_TernaryBase):
    """TWN ternary weights (2 bits): ``Delta = 0.7 mean|w|``, ``alpha = mean|w|`` over ``|w| > Delta``.

    ``scale`` is float32 of shape ``(out_features,)``: one ``alpha`` broadcast (Linear) or per row (embedding).
    """

    @property
    def row_independent(self) -> bool:  # type: ignore[override]
        """Row-wise TWN looks at each row alone, so gathered embedding rows can be ternarized on their own."""
        return self.rowwise

    def _ternarize(self, wc):
        return twn_ternarize(wc, self.rowwise)


@register_weight_quantizer("lat")
class LATWeightQuantizer(_TernaryBase):
    """Loss-aware ternary weights (2 bits), Hou & Kwok 2018 with Adam's second moment as diagonal curvature.

    fairseq's optimizer state is not visible to modules, so this module keeps its own second moment: the STE's
    backward hands it the latent weight's gradient ``g`` and it updates ``lat_v <- beta2 * lat_v + (1 - beta2) g^2``
    with ``beta2 = cfg.lat_beta2``, which ``QuantConfig.from_namespace`` takes from ``--adam-betas``: exactly Adam's
    ``v_t`` (``exp_avg_sq``) *without* bias correction. Caveats: fairseq multiplies gradients by ``1/sample_size``
    (and unscales fp16) *after* backward, so ``g`` is the un-normalised gradient; ``alpha``'s closed form is
    invariant to a global scale of ``D`` (up to ``eps``), so this only matters through ``eps`` and batch-to-batch
    size changes. With ``--update-freq > 1`` the EMA is updated once per micro-batch rather than once per step.
    Curvature ``D = sqrt(lat_v) + cfg.lat_eps``; before any gradient (``lat_steps == 0``) the output is exactly
    TWN's (selected on device with ``torch.where``: no host synchronisation in forward).

    Args:
        cfg: the ``QuantConfig``; reads ``clip_val``, ``lat_beta2``, ``lat_eps``, ``lat_iters``.
        rowwise: per-row ``alpha`` (embedding).

    Buffers: ``lat_v`` (float32, shape of the weight, created at the first forward or gradient), ``lat_steps``
    (int64 ``()``, number of gradients seen).
    """

    def __init__(self, cfg: Optional[QuantConfig] = None, rowwise: bool = False):
        super().__init__(cfg, rowwise=rowwise)
        cfg = QuantConfig() if cfg is None else cfg
        self.beta2 = float(cfg.lat_beta2)
        self.eps = float(cfg.lat_eps)
        self.iters = int(cfg.lat_iters)
        self.register_buffer("lat_v", torch.zeros(0))
        self.register_buffer("lat_steps", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", beta2={self.beta2}, eps={self.eps}, iters={self.iters}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # lat_v is created lazily with the weight's shape; adopt the stored shape before the strict copy.
        v = state_dict.get(prefix + "lat_v")
        if v is not None and v.shape != self.lat_v.shape:
            self.lat_v = torch.zeros_like(v, dtype=torch.float32, device=self.lat_v.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _ensure_state(self, weight: torch.Tensor) -> None:
        if self.lat_v.shape != weight.shape:
            self.lat_v = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)

    @torch.no_grad()
    def update_second_moment(self, grad: torch.Tensor) -> None:
        """EMA of squared gradients (Adam's uncorrected ``v_t``); called from the STE's backward."""
        self._ensure_state(grad)
        # data parallel: fairseq's per-rank gradients are sums over the rank's sentences, so their SUM over ranks is
        # the global batch's gradient, as a single worker sees it (no-op on one worker)
        g = all_reduce_sum(grad.detach().float())
        self.lat_v.mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
        self.lat_steps += 1

    def _observer(self) -> "LATWeightQuantizer":
        return self

    def _ternarize(self, wc):
        self._ensure_state(wc)
        b_twn, alpha_twn = twn_ternarize(wc, self.rowwise)
        d = self.lat_v.sqrt() + self.eps
        b_lat, alpha_lat = lat_ternarize(wc, d, self.rowwise, self.iters, start=b_twn)
        seen = self.lat_steps > 0
        return torch.where(seen, b_lat, b_twn), torch.where(seen, alpha_lat, alpha_twn)
