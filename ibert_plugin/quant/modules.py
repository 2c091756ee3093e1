"""Quantization-aware modules used by the model wiring (I-BERT integer-only and TernaryBERT fake quantization).

Convention: every ``forward`` takes ``(x, scale)`` and returns the same kind of pair. ``scale is None`` means ``x``
holds real float values; otherwise ``x`` holds exact integers (float dtype) whose real value is ``x * scale``, with
``scale`` a detached float32 tensor of shape ``(1,)`` (per tensor) or ``(C,)`` (per channel over the last dim).
Gradients travel through ``x`` (``dL/dx = scale * dL/dreal``).

Modules and papers (``docs/integer_spec.md`` is the contract for symmetric mode):

* :class:`QuantAct`: static-range activation quantizer with EMA ranges and dyadic requantization (I-BERT §3.1,
  App. A; HAWQ-V3 dyadic arithmetic), optional integer residual add.
* :class:`QuantLinear`: 8-bit per-channel weights, 32-bit bias, exact integer accumulation (I-BERT §3.1, App. C.1);
  TernaryBERT ternary/k-bit weights with 8-bit dynamic inputs (Zhang et al. 2020, §3).
* :class:`QuantEmbedding`: 8-bit per-tensor tables (I-BERT); row-wise ternary word embedding (TernaryBERT).
* :class:`IntGELU` (I-BERT Eq. 8-9, Alg. 2), :class:`IntSoftmax` (Eq. 10-12, Alg. 3), :class:`IntLayerNorm`
  (§3.5, Alg. 4), each with its exact float twin when not in integer mode.
* :class:`DynamicActQuant`: TernaryBERT per-tensor dynamic 8-bit activation quantizer with clipping.

``quant_mode="none"`` makes every module its float ``torch.nn`` / fairseq twin.

Each symmetric-mode module exports its integer form (``int_form()``: :class:`ActIntForm`, :class:`LinearIntForm`,
:class:`SoftmaxIntForm`, :class:`LayerNormIntForm`, ``GeluConstants``), computed by the very functions its forward
calls; the inference engine's converter only collects these.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantConfig
from .distributed import all_reduce_max, sync_min_max
from .nonlinear import (
    ExpConstants,
    GeluConstants,
    exp_lut,
    gelu_constants,
    int_gelu,
    int_layernorm,
    int_softmax,
    layernorm_constants,
    layernorm_shift_update,
    softmax_constants,
    softmax_output_scale,
)
from .primitives import (
    SCALE_EPS,
    accumulator_scale,
    bias_integer,
    dequantize,
    exact_int_matmul,
    qmax,
    quantize,
    requant_clamp,
    requant_constants,
    symmetric_scale,
)
from .weight import SymWeightQuantizer, WeightQuantizer, build_weight_quantizer

__all__ = [
    "QTensor",
    "QuantAct",
    "QuantLinear",
    "QuantEmbedding",
    "IntGELU",
    "IntSoftmax",
    "IntLayerNorm",
    "DynamicActQuant",
    "QUANT_MODULE_TYPES",
    "ActIntForm",
    "LinearIntForm",
    "SoftmaxIntForm",
    "LayerNormIntForm",
]

QTensor = Tuple[torch.Tensor, Optional[torch.Tensor]]


def _cfg(cfg: Optional[QuantConfig]) -> QuantConfig:
    if cfg is None:
        return QuantConfig()
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"cfg must be a QuantConfig, got {type(cfg).__name__}")
    return cfg


def _need_quantized(module: str, scale: Optional[torch.Tensor], per_tensor: bool) -> None:
    if scale is None:
        raise ValueError(
            f"{module} in symmetric mode needs a quantized input (x, scale); got a real tensor (scale=None): "
            f"a QuantAct (or another integer op) must feed it"
        )
    if per_tensor and scale.numel() != 1:
        raise ValueError(
            f"{module} in symmetric mode needs a per-tensor input scale of shape (1,), got {tuple(scale.shape)}"
        )


# ----------------------------------------------------------------------------------------------------------------
# integer forms: what each module hands the inference engine, computed by the code its forward runs
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ActIntForm:
    """QuantAct constants: output scale ``s_out`` float32 ``(1,)``; dyadic ``(m, e)`` of the input (float64
    ``(1,)`` or ``(C,)``) and ``(m_id, e_id)`` of the residual (None without one); ``bits`` of the output."""

    s_out: torch.Tensor
    m: torch.Tensor
    e: torch.Tensor
    m_id: Optional[torch.Tensor]
    e_id: Optional[torch.Tensor]
    bits: int


@dataclass
class LinearIntForm:
    """QuantLinear constants: ``w_int`` int8 ``(C_out, C_in)``, ``s_acc`` float32 ``(C_out,)``, ``b_int`` int64
    ``(C_out,)`` (zeros without bias), ``w_bits`` the weight bit-width bound (2 = ternary)."""

    w_int: torch.Tensor
    s_acc: torch.Tensor
    b_int: torch.Tensor
    w_bits: int


@dataclass
class SoftmaxIntForm:
    """IntSoftmax constants for a score scale: the i-exp constants, the engine's table ``lut`` (int32,
    ``lut[i] = i-exp(-i)``) and the float32 ``(1,)`` probability scale ``s_out``."""

    exp: ExpConstants
    lut: torch.Tensor
    s_out: torch.Tensor


@dataclass
class LayerNormIntForm:
    """IntLayerNorm constants: ``shift`` (int), ``b_int`` int64 ``(C,)``, ``s_out`` float32 ``(C,)``."""

    shift: int
    b_int: torch.Tensor
    s_out: torch.Tensor


def _uninitialised(module: str) -> ValueError:
    return ValueError(f"{module}: uninitialised activation range (x_min = x_max = 0): calibrate or train the model "
                      f"before exporting its integer form")


# ----------------------------------------------------------------------------------------------------------------
# QuantAct
# ----------------------------------------------------------------------------------------------------------------
class QuantAct(nn.Module):
    """Requantize to a static per-tensor ``bits``-bit scale tracked by an EMA of the activation range.

    Symmetric mode: ``S_out = max(|x_min|, |x_max|) / n(bits)`` (float32 ``(1,)``).

    * quantized input ``(q_in, S_in)`` (and quantized identity): ``q = clamp(requant(q_in, dyadic(S_in/S_out))
      [+ requant(q_id, dyadic(S_id/S_out))], -n, n)``; per-channel ``S_in`` ``(C,)`` gives per-channel ratios.
    * real input (or mixed real/quantized operands): the real values are summed and ``q = quantize(x, S_out)``.

    Ranges: buffers ``x_min``, ``x_max`` (float32 ``(1,)``, zero = uninitialised, saved in checkpoints) are updated
    **only in training** from the real value of the whole (summed) input: the first call copies ``min``/``max``,
    later calls take the EMA with ``cfg.act_momentum`` (0.95; -1 = running min/max). Eval freezes them.
    In any other mode (``none``, ``ternarybert``) the module is the identity on real values (residual sums are real
    additions) and never touches its buffers.

    Args:
        bits: signed output bit-width (``cfg.act_bits``, ``cfg.embed_act_bits`` or ``cfg.residual_bits``; <= 24).
        cfg: quantization configuration.
    """

    def __init__(self, bits: int, cfg: Optional[QuantConfig] = None):
        super().__init__()
        self.cfg = _cfg(cfg)
        if not 2 <= int(bits) <= 24:
            raise ValueError(f"QuantAct bits must be between 2 and 24, got {bits}")
        self.bits = int(bits)
        self.momentum = float(self.cfg.act_momentum)
        self.register_buffer("x_min", torch.zeros(1))
        self.register_buffer("x_max", torch.zeros(1))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, mode={self.cfg.quant_mode}, momentum={self.momentum}"

    @property
    def scale(self) -> torch.Tensor:
        """Current output scale ``symmetric_scale(x_min, x_max, bits)`` (float32 ``(1,)``)."""
        return symmetric_scale(self.x_min, self.x_max, self.bits)

    @staticmethod
    def _ratios(scale, identity_scale, s_out):
        m, e = requant_constants(scale, s_out)
        m_id = e_id = None
        if identity_scale is not None:
            m_id, e_id = requant_constants(identity_scale, s_out)
        return m, e, m_id, e_id

    @torch.no_grad()
    def int_form(self, scale: torch.Tensor, identity_scale: Optional[torch.Tensor] = None) -> ActIntForm:
        """The integer constants of the symmetric-mode forward for input scale ``scale`` (``(1,)``/``(C,)``) and
        optional residual scale: output scale and dyadic ratios (``ValueError`` when never calibrated)."""
        if not (bool(self.x_min.ne(0).any()) or bool(self.x_max.ne(0).any())):
            raise _uninitialised(type(self).__name__)
        s_out = symmetric_scale(self.x_min, self.x_max, self.bits)
        m, e, m_id, e_id = self._ratios(scale, identity_scale, s_out)
        return ActIntForm(s_out, m, e, m_id, e_id, self.bits)

    @torch.no_grad()
    def _observe(self, x, scale, identity, identity_scale) -> None:
        if identity is None and scale is not None:
            # min/max of q (per channel when the scale is per channel) times the scale: no full real tensor
            xd = x.detach()
            if scale.numel() == 1:
                lo, hi = torch.aminmax(xd)
            else:  # amin/amax along dim 0 are much faster than aminmax(dim=0) on CPU
                rows = xd.reshape(-1, xd.shape[-1])
                lo, hi = rows.amin(dim=0), rows.amax(dim=0)
            a, b = lo * scale.detach(), hi * scale.detach()
            cur_min = torch.minimum(a, b).amin().reshape(1)
            cur_max = torch.maximum(a, b).amax().reshape(1)
        else:
            real = dequantize(x.detach(), scale)
            if identity is not None:
                other = dequantize(identity.detach(), identity_scale)
                real = real.add_(other) if scale is not None else real + other  # (never add into x itself)
            lo, hi = torch.aminmax(real)
            cur_min, cur_max = lo.reshape(1), hi.reshape(1)
        # data parallel: every rank takes the global batch's range (no-op on one worker)
        cur_min, cur_max = sync_min_max(cur_min.to(self.x_min.dtype), cur_max.to(self.x_max.dtype))
        uninit = (self.x_min == 0) & (self.x_max == 0)
        if self.momentum == -1:
            new_min, new_max = torch.minimum(self.x_min, cur_min), torch.maximum(self.x_max, cur_max)
        else:
            m = self.momentum
            new_min = self.x_min * m + cur_min * (1.0 - m)
            new_max = self.x_max * m + cur_max * (1.0 - m)
        self.x_min.copy_(torch.where(uninit, cur_min, new_min))
        self.x_max.copy_(torch.where(uninit, cur_max, new_max))

    def forward(
        self,
        x: torch.Tensor,
        scale: Optional[torch.Tensor] = None,
        identity: Optional[torch.Tensor] = None,
        identity_scale: Optional[torch.Tensor] = None,
    ) -> QTensor:
        """Quantize ``x`` (plus the residual ``identity``) to ``bits`` bits.

        Args:
            x: real ``(..., C)`` tensor (``scale is None``) or integers with ``scale`` ``(1,)``/``(C,)``.
            scale: scale of ``x`` or None.
            identity: optional residual operand added before quantization (real or integer).
            identity_scale: scale of ``identity`` or None.

        Returns:
            symmetric mode: ``(q, S_out)`` with ``q`` float32 integers in ``[-n(bits), n(bits)]`` and ``S_out``
            float32 ``(1,)``; other modes: ``(real sum, None)``.
        """
        if not self.cfg.symmetric:
            real = dequantize(x, scale)
            if identity is not None:
                real = real + dequantize(identity, identity_scale)
            return real, None
        if self.training:
            self._observe(x, scale, identity, identity_scale)
        s_out = symmetric_scale(self.x_min, self.x_max, self.bits)
        if scale is not None and (identity is None or identity_scale is not None):
            m, e, m_id, e_id = self._ratios(scale, identity_scale, s_out)
            q = requant_clamp(x, m, e, self.bits, identity, m_id, e_id)
            return q, s_out
        real = dequantize(x, scale)
        if identity is not None:
            real = real + dequantize(identity, identity_scale)
        return quantize(real.float(), s_out, self.bits), s_out


# ----------------------------------------------------------------------------------------------------------------
# TernaryBERT dynamic activation quantizer
# ----------------------------------------------------------------------------------------------------------------
class _SymClipFakeQuant(torch.autograd.Function):
    """TernaryBERT ``SymQuantizer`` (layer-wise): clip, max-abs scale, round; STE zeroed outside the clip."""

    @staticmethod
    def forward(ctx, x, clip_val, bits, sync):
        inside = (x > -clip_val) & (x < clip_val)
        ctx.save_for_backward(inside)
        lo, hi = torch.aminmax(x)  # max|clamp(x)| = min(max|x|, clip_val), one pass and no temporary
        m = torch.maximum(-lo, hi).clamp(max=clip_val)
        # training: the global batch's max over data-parallel ranks, as one worker on the whole batch (no-op alone)
        s = qmax(bits) / (all_reduce_max(m) if sync else m).clamp(min=SCALE_EPS)
        return x.clamp(-clip_val, clip_val).mul_(s).round_().div_(s)  # round(clamp(x) s) / s in one buffer

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None  # bool promoted in the loop: no float copy of the mask


class _MinMaxFakeQuant(torch.autograd.Function):
    """Asymmetric min-max fake quantization over the whole tensor (``2^bits - 1`` levels); identity STE."""

    @staticmethod
    def forward(ctx, x, bits, sync):
        lo, hi = torch.aminmax(x)
        if sync:  # training: the global batch's range over data-parallel ranks (no-op alone)
            lo, hi = sync_min_max(lo, hi)
        s = (hi - lo).clamp(min=SCALE_EPS) / float(2**bits - 1)
        return torch.round((x - lo) / s) * s + lo

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class DynamicActQuant(nn.Module):
    """TernaryBERT per-tensor dynamic activation fake quantizer (Q, K, probabilities, V, Linear inputs).

    ``act_range="symmetric"``: ``x_c = clamp(x, -clip_val, clip_val)``, ``s = n(bits) / max|x_c|``,
    ``x_hat = round(x_c s) / s``; gradient passed where ``-clip_val < x < clip_val`` and zeroed outside (upstream
    ``SymQuantizer``). ``act_range="minmax"``: asymmetric min-max over the tensor with ``2^bits - 1`` levels, no
    clip, identity gradient. Outside ``ternarybert`` mode the module returns its input pair unchanged.

    Args:
        bits: activation bit-width (``cfg.act_bits``).
        cfg: quantization configuration (``clip_val``, ``act_range``).
    """

    def __init__(self, bits: int, cfg: Optional[QuantConfig] = None):
        super().__init__()
        self.cfg = _cfg(cfg)
        self.bits = int(bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, range={self.cfg.act_range}, clip_val={self.cfg.clip_val}"

    def forward(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> QTensor:
        """Returns ``(x_hat, None)`` (real, fake-quantized) in ternarybert mode, else ``(x, scale)`` unchanged."""
        if self.cfg.quant_mode != "ternarybert":
            return x, scale
        real = dequantize(x, scale)
        if self.cfg.act_range == "minmax":
            return _MinMaxFakeQuant.apply(real, self.bits, self.training), None
        return _SymClipFakeQuant.apply(real, float(self.cfg.clip_val), self.bits, self.training), None


# ----------------------------------------------------------------------------------------------------------------
# QuantLinear
# ----------------------------------------------------------------------------------------------------------------
class QuantLinear(nn.Linear):
    """``nn.Linear`` (same ``weight``/``bias`` names, so fairseq checkpoints load) with quantized arithmetic.

    * ``symmetric``: input must be per-tensor quantized ``(q_x, S_x)``; weights ``(W_int, S_w)`` from the weight
      quantizer (``cfg.weight_bits`` per output channel, or ternary), ``S_acc = S_w * S_x`` (float32 ``(C_out,)``),
      ``b_int = clamp(round(double(b) / double(S_acc)), -n(32), n(32))``; returns the exact accumulator
      ``(q_x @ W_int^T + b_int, S_acc)`` in float64.
    * ``none``: ``F.linear`` on the real input (identical to ``nn.Linear``), returns ``(y, None)``.
    * ``ternarybert``: real input -> :class:`DynamicActQuant` (``cfg.act_bits``), weights ``W_int * S_w`` from the
      weight quantizer, float bias; returns ``(y, None)``.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        cfg: quantization configuration.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        cfg: Optional[QuantConfig] = None,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.cfg = _cfg(cfg)
        if self.cfg.quant_mode != "none":
            self.weight_quantizer: WeightQuantizer = build_weight_quantizer(self.cfg, rowwise=self.cfg.linear_rowwise)
        if self.cfg.quant_mode == "ternarybert":
            self.input_quant = DynamicActQuant(self.cfg.act_bits, self.cfg)

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: Optional[QuantConfig] = None) -> "QuantLinear":
        """A QuantLinear sharing ``linear``'s parameters."""
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, cfg=cfg,
                device=linear.weight.device, dtype=linear.weight.dtype)
        q.weight = linear.weight
        if linear.bias is not None:
            q.bias = linear.bias
        return q

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.cfg.quant_mode}"

    def forward(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> QTensor:
        """Args: ``x`` ``(..., in_features)`` (``cfg.act_bits`` integers with ``scale`` ``(1,)`` in symmetric mode).

        Returns: symmetric: ``(acc, S_acc)``, float64 integers of at most ``cfg.bias_bits`` (+ the GEMM) bits and
        float32 ``(out_features,)``; other modes: ``(y, None)``.
        """
        mode = self.cfg.quant_mode
        if mode == "none":
            return F.linear(dequantize(x, scale), self.weight, self.bias), None
        if mode == "ternarybert":
            xq, _ = self.input_quant(dequantize(x, scale))
            w_int, s_w = self._quantized_weight()
            w_hat = w_int * s_w.reshape(-1, 1).to(w_int.dtype)
            return F.linear(xq, w_hat, self.bias), None
        _need_quantized("QuantLinear", scale, per_tensor=True)
        w_int, w_bits, s_acc, b_int = self._integer_params(scale)
        acc = exact_int_matmul(x, w_int, a_bits=self.cfg.act_bits, b_bits=w_bits, bias=b_int)
        return acc.to(torch.float64), s_acc

    def _integer_params(self, scale: torch.Tensor):
        """``(W_int, w_bits, S_acc, b_int)`` of the symmetric forward (differentiable ``W_int``/``b_int``)."""
        w_int, s_w = self._quantized_weight()
        w_bits = int(getattr(self.weight_quantizer, "bits", self.cfg.weight_bits))
        s_w = s_w.detach().float().reshape(-1).clamp(min=SCALE_EPS / qmax(w_bits))
        s_acc = accumulator_scale(s_w, scale)
        b_int = None if self.bias is None else bias_integer(self.bias, s_acc, self.cfg.bias_bits)
        return w_int, w_bits, s_acc, b_int

    def _quantized_weight(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``weight_quantizer(weight)``. In eval without autograd the result is cached until the weight or one of
        the quantizer's buffers changes (version counters: optimizer steps, ``load_state_dict``, in-place edits),
        or the parameter is replaced; training always re-quantizes (the STE builds the graph, LAT needs it)."""
        if self.training or torch.is_grad_enabled():
            self._wq_cache = None
            return self.weight_quantizer(self.weight)
        w = self.weight
        key = (id(w), w.data_ptr(), w._version,
               tuple((b.data_ptr(), b._version) for b in self.weight_quantizer.buffers()))
        cache = getattr(self, "_wq_cache", None)
        if cache is None or cache[0] != key:
            cache = self._wq_cache = (key, self.weight_quantizer(w))
        return cache[1]

    @torch.no_grad()
    def int_form(self, scale: torch.Tensor) -> LinearIntForm:
        """Integer weights, accumulator scale and 32-bit bias of the symmetric forward for input scale ``scale``
        (float32 ``(1,)``)."""
        w_int, w_bits, s_acc, b_int = self._integer_params(scale.detach().float().reshape(1))
        n_out = w_int.shape[0]
        if b_int is None:
            b_int = torch.zeros(n_out, dtype=torch.float64, device=w_int.device)
        b_int = b_int.expand(n_out)
        return LinearIntForm(w_int.detach().round().to(torch.int8), s_acc.expand(n_out).contiguous(),
                             b_int.to(torch.int64).contiguous(), w_bits)


# ----------------------------------------------------------------------------------------------------------------
# QuantEmbedding
# ----------------------------------------------------------------------------------------------------------------
class QuantEmbedding(nn.Embedding):
    """``nn.Embedding`` (same ``weight`` name) with quantized tables.

    * ``symmetric``: ``S = max|W| / n(cfg.embed_bits)`` per tensor; returns ``(W_int[ids], S)`` (float32
      integers, ``S`` float32 ``(1,)``). Only the gathered rows are quantized.
    * ``none``: plain embedding ``(e, None)``.
    * ``ternarybert``: ``weight_bits == 2``: row-wise ternary via the registered ``"twn"`` quantizer
      (``cfg.ternary_embedding`` granularity), falling back to ``cfg.embed_bits`` symmetric row-wise with a warning
      when ``twn`` is not registered; ``weight_bits > 2``: symmetric ``weight_bits`` row-wise (TernaryBERT
      8-bit embedding). Returns the real fake-quantized rows ``(W_int[ids] * S[ids], None)``.

    Args:
        num_embeddings, embedding_dim, padding_idx: as ``nn.Embedding``.
        cfg: quantization configuration.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: Optional[int] = None,
        cfg: Optional[QuantConfig] = None,
        **kwargs,
    ):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, **kwargs)
        self.cfg = _cfg(cfg)
        mode = self.cfg.quant_mode
        if mode == "symmetric":
            self.weight_quantizer = SymWeightQuantizer(self.cfg.embed_bits, per_channel=False)
        elif mode == "ternarybert":
            rowwise = self.cfg.ternary_embedding == "row"
            if self.cfg.weight_bits == 2:
                try:
                    self.weight_quantizer = build_weight_quantizer(self.cfg, rowwise=rowwise, method="twn")
                except ValueError:
                    warnings.warn(
                        "QuantEmbedding: no 'twn' weight quantizer is registered; using "
                        f"{self.cfg.embed_bits}-bit symmetric embeddings instead of ternary"
                    )
                    self.weight_quantizer = SymWeightQuantizer(self.cfg.embed_bits, per_channel=rowwise)
            else:
                self.weight_quantizer = SymWeightQuantizer(self.cfg.weight_bits, per_channel=rowwise)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.cfg.quant_mode}"

    def forward(self, ids: torch.Tensor) -> QTensor:  # type: ignore[override]
        """Args: ``ids`` integer tensor. Returns ``(rows, scale)`` per the class docstring."""
        mode = self.cfg.quant_mode
        if mode == "none":
            return super().forward(ids), None
        wq = self.weight_quantizer
        if mode == "symmetric":
            if isinstance(wq, SymWeightQuantizer):
                rows, s = wq.lookup(self.weight, ids, self.padding_idx)
            else:  # e.g. a frozen (packed) quantizer: per-tensor scale stored per row
                w_int, s_all = wq(self.weight)
                rows, s = F.embedding(ids, w_int, self.padding_idx), s_all.reshape(-1)[:1]
            return rows.float(), s.detach().float().reshape(1)
        rows, s = wq.lookup(self.weight, ids, self.padding_idx)
        return rows * s.to(rows.dtype), None

    @torch.no_grad()
    def int_form(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Symmetric mode: the whole integer table (int8 ``(V, D)``, the forward on every id) and its float32
        ``(1,)`` scale."""
        rows, s = QuantEmbedding.forward(self, torch.arange(self.num_embeddings, device=self.weight.device))
        return rows.round().to(torch.int8), s.float().reshape(1)


# ----------------------------------------------------------------------------------------------------------------
# nonlinear modules
# ----------------------------------------------------------------------------------------------------------------
class IntGELU(nn.Module):
    """i-GELU (I-BERT Eq. 8-9) on the FC1 accumulator, or fairseq's float ``gelu``.

    Integer when ``cfg.integer_gelu`` (symmetric mode, GELU not force-dequantized): input ``(q, S)`` with the
    32-bit accumulator scale ``S`` ``(C,)``; output ``(q_out, S_out)`` (float64 integers, float32 ``(C,)``), see
    :func:`~ibert_plugin.quant.nonlinear.int_gelu`. Otherwise ``F.gelu(x.float()).type_as(x)`` on the real
    (dequantized) input, returning ``(y, None)``.

    Args:
        cfg: quantization configuration.
    """

    def __init__(self, cfg: Optional[QuantConfig] = None):
        super().__init__()
        self.cfg = _cfg(cfg)

    def extra_repr(self) -> str:
        return f"integer={self.cfg.integer_gelu}"

    def forward(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> QTensor:
        """Args: ``x`` ``(..., C)``; ``scale`` ``(C,)``/``(1,)`` or None. Returns the GELU pair."""
        if self.cfg.integer_gelu:
            _need_quantized("IntGELU", scale, per_tensor=False)
            return int_gelu(x, scale, self.cfg.nonlinear_constants)
        real = dequantize(x, scale)
        return F.gelu(real.float()).type_as(real), None

    def int_form(self, scale: torch.Tensor) -> GeluConstants:
        """i-GELU constants for the accumulator scale ``scale`` (``cfg.nonlinear_constants``)."""
        return gelu_constants(scale, self.cfg.nonlinear_constants)


class IntSoftmax(nn.Module):
    """Integer softmax (I-BERT Alg. 3 i-exp, unsigned ``cfg.softmax_out_bits`` output) or float softmax.

    Integer when ``cfg.integer_softmax``: scores ``(q, S)`` ``(B, H, Tq, Tk)`` with ``S`` ``(1,)`` -> ``(p, 1/255)``
    (float32 integers in ``[0, 255]``; float32 ``(1,)``), see :func:`~ibert_plugin.quant.nonlinear.int_softmax`.
    Otherwise (fairseq): masked keys set to ``-inf`` on the real scores, then ``F.softmax(x.float(), -1)``,
    returning ``(p, None)``.

    Args:
        cfg: quantization configuration.
    """

    def __init__(self, cfg: Optional[QuantConfig] = None):
        super().__init__()
        self.cfg = _cfg(cfg)
        self.out_bits = self.cfg.softmax_out_bits

    def extra_repr(self) -> str:
        return f"integer={self.cfg.integer_softmax}, out_bits={self.out_bits}"

    def forward(
        self,
        x: torch.Tensor,
        scale: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> QTensor:
        """Args: ``x`` scores ``(B, H, Tq, Tk)``; ``scale`` ``(1,)`` or None; ``key_padding_mask`` ``(B, Tk)`` bool
        (True = padded key) or None. Returns the probability pair."""
        if self.cfg.integer_softmax:
            _need_quantized("IntSoftmax", scale, per_tensor=True)
            return int_softmax(x, scale, key_padding_mask, self.out_bits, self.cfg.nonlinear_constants)
        real = dequantize(x, scale)
        if key_padding_mask is not None:
            real = real.masked_fill(key_padding_mask.to(torch.bool)[:, None, None, :], float("-inf"))
        return F.softmax(real.float(), dim=-1), None

    def int_form(self, scale: torch.Tensor) -> SoftmaxIntForm:
        """i-exp constants, the engine's i-exp table and the probability scale for the score scale ``scale``."""
        c = self.cfg.nonlinear_constants
        return SoftmaxIntForm(softmax_constants(scale, c), exp_lut(scale, c), softmax_output_scale(self.out_bits))


class IntLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same ``weight``/``bias``) computed with integers (I-BERT §3.5, Alg. 4) in symmetric mode.

    Integer when ``cfg.integer_layernorm``: input ``(q, S)`` with ``S`` ``(1,)`` (the ``cfg.residual_bits``-bit
    residual sum) -> ``(q_out, S_out)``: float64 integers and float32 ``(C,)`` scale ``sqrt(C)/2^30 * gamma'``, see
    :func:`~ibert_plugin.quant.nonlinear.int_layernorm`. The buffer ``shift`` (float32 ``(1,)``, symmetric mode
    only, saved in checkpoints) only grows, in training, so that the sum of squares stays below
    ``2^cfg.ln_var_bits`` (2^52; upstream 2^32).
    Otherwise ``F.layer_norm`` on the real input (identical to ``nn.LayerNorm``), returning ``(y, None)``.

    Args:
        normalized_shape, eps, elementwise_affine: as ``nn.LayerNorm`` (fairseq RoBERTa: eps 1e-5).
        cfg: quantization configuration.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 cfg: Optional[QuantConfig] = None, **kwargs):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, **kwargs)
        self.cfg = _cfg(cfg)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"IntLayerNorm normalises over the last dim only, got {self.normalized_shape}")
        if self.cfg.symmetric:
            self.register_buffer("shift", torch.zeros(1))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", integer={self.cfg.integer_layernorm}"

    def forward(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> QTensor:  # type: ignore[override]
        """Args: ``x`` ``(..., C)``; ``scale`` ``(1,)`` or None. Returns the normalised pair."""
        if self.cfg.integer_layernorm:
            _need_quantized("IntLayerNorm", scale, per_tensor=True)
            c = self.normalized_shape[0]
            gamma = self.weight if self.weight is not None else x.new_ones(c, dtype=torch.float32)
            beta = self.bias if self.bias is not None else x.new_zeros(c, dtype=torch.float32)
            if self.training:
                # the shift grows monotonically with the batch's largest variance: MAX over data-parallel ranks
                self.shift.copy_(all_reduce_max(layernorm_shift_update(x, self.shift, self.cfg.ln_var_bits)))
            return int_layernorm(x, scale, gamma, beta, self.shift)
        real = dequantize(x, scale)
        return F.layer_norm(real, self.normalized_shape, self.weight, self.bias, self.eps), None

    @torch.no_grad()
    def int_form(self) -> LayerNormIntForm:
        """Shift, integer bias and output scale of the integer forward (the input scale cancels)."""
        c = self.normalized_shape[0]
        dev = self.shift.device
        gamma = self.weight if self.weight is not None else torch.ones(c, device=dev)
        beta = self.bias if self.bias is not None else torch.zeros(c, device=dev)
        lc = layernorm_constants(gamma, beta, c)
        return LayerNormIntForm(int(self.shift.reshape(-1)[0]), lc.b_int.to(torch.int64), lc.s_out)


#: Module types the integer audit instruments.
QUANT_MODULE_TYPES = (QuantAct, QuantLinear, QuantEmbedding, IntGELU, IntSoftmax, IntLayerNorm, DynamicActQuant)
