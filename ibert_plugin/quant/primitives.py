"""Stateless numeric primitives of the integer dataflow (``docs/integer_spec.md``, "Primitives").

Symmetric uniform quantization with a straight-through estimator (I-BERT §3.1, App. A), dyadic requantization
(I-BERT §3.1: a real ratio ``S_in / S_out`` is replaced by ``m / 2^e`` so that requantization is an integer multiply
and shift; HAWQ-V3 dyadic arithmetic), the integer square root of I-BERT Algorithm 4 and an exact integer GEMM.

Carrier convention: a quantized tensor is a float tensor ``q`` holding exact integers plus a float32 scale ``S`` of
shape ``(1,)`` (per tensor) or ``(C,)`` (per channel over the last dim); its real value is ``q * S``. Scales never
carry gradient: gradients travel through ``q`` (``dL/dq = S * dL/dreal``).

Every function is vectorised, device-agnostic (CPU and CUDA; dtypes and devices come from the inputs) and free of
host synchronisation: no ``.item()``, numpy, ``decimal`` or Python loops over elements.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import fused

__all__ = [
    "true_div",
    "pow2",
    "DYADIC_BITS",
    "ISQRT_ITERS",
    "SCALE_EPS",
    "qmax",
    "symmetric_scale",
    "quantize",
    "dequantize",
    "floor_ste",
    "round_ste",
    "clamp_ste",
    "dyadic",
    "requant",
    "requant_clamp",
    "requant_constants",
    "accumulator_scale",
    "bias_integer",
    "score_scale",
    "context_scale",
    "isqrt",
    "isqrt_ste",
    "exact_int_matmul",
    "attach_scale_grad",
]

#: Bits of the dyadic multiplier ``m`` (``|m|`` in ``[2^(B-1), 2^B]``).
DYADIC_BITS = 20
#: Newton iterations of :func:`isqrt`; 6 are proven sufficient for ``n < 2^53``, 7 for every ``n < 2^62``.
ISQRT_ITERS = 7
#: Lower clamp of ``max(|x_min|, |x_max|)`` in :func:`symmetric_scale` (no zero scales).
SCALE_EPS = 1e-8
#: Largest chunk of the reduction dimension of :func:`exact_int_matmul` (1024 * 127 * 127 < 2^24).
MATMUL_CHUNK = 1024
_F32_EXACT = 2**24


def qmax(bits: int) -> int:
    """``n(b) = 2^(b-1) - 1``, the largest magnitude of a signed symmetric ``b``-bit integer."""
    return 2 ** (bits - 1) - 1


# ----------------------------------------------------------------------------------------------------------------
# scales, quantize, STE helpers
# ----------------------------------------------------------------------------------------------------------------
def true_div(a, b) -> torch.Tensor:
    """IEEE (correctly rounded) ``a / b`` on every device, for scale-derived constants that must be bit-exact.

    PyTorch evaluates ``python_scalar / tensor`` as ``tensor.reciprocal() * scalar`` (two roundings: 1 ulp off for
    about a quarter of float64 inputs), and CUDA divides by a Python scalar through its reciprocal; both could move a
    ``floor`` across an integer. Here both operands are tensors of the same device and dtype.

    Args:
        a, b: tensors or Python numbers (at least one tensor).
    """
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(b, a)
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(a, b)
    return torch.div(a, b)


def pow2(n: torch.Tensor) -> torch.Tensor:
    """Exact float64 ``2^n`` for integer-valued ``n`` in ``[-1022, 1023]``, built from the exponent bits.

    (``torch.exp2`` is exact for integers on CPU, but CUDA only documents a 1-ulp bound.)
    """
    bits = n.to(torch.int64).clamp(-1022, 1023).add_(1023).bitwise_left_shift_(52)
    return bits.view(torch.float64)


@torch.no_grad()
def symmetric_scale(x_min: torch.Tensor, x_max: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric scale ``max(|x_min|, |x_max|).clamp(min=1e-8) / n(bits)`` in float32 (no gradient).

    Args:
        x_min: range minimum, any shape (``(1,)`` per tensor, ``(C,)`` per channel).
        x_max: range maximum, same shape.
        bits: signed bit-width ``b``; the integer grid is ``[-n(b), n(b)]``.

    Returns:
        float32 scale with the shape of ``x_min``.
    """
    m = torch.maximum(x_min.detach().abs(), x_max.detach().abs()).float().clamp(min=SCALE_EPS)
    return true_div(m, float(qmax(bits)))


class _Quantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, bits):
        n = qmax(bits)
        ctx.save_for_backward(scale)
        return torch.div(x, scale).round_().clamp_(-n, n)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad / scale.to(grad.dtype), None, None


def quantize(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round_half_even(x / S), -n(b), n(b))`` with a straight-through gradient ``dq/dx = 1/S``.

    The division runs in the promoted dtype of ``x`` and ``scale`` (float32 for activations and weights; pass
    float64 operands for 32-bit biases, whose integers do not fit float32). No gradient flows to ``scale``, and the
    gradient passes through the clamp unchanged (I-BERT ``SymmetricQuantFunction``).

    Args:
        x: real values, any shape.
        scale: scale broadcastable to ``x`` (``(1,)`` or ``(C, 1)`` for per-row weights, ``(C,)`` per channel).
        bits: signed bit-width.

    Returns:
        exact integers in ``[-n(b), n(b)]``, dtype of ``x / scale``.
    """
    return _Quantize.apply(x, scale.detach(), bits)


def dequantize(q: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Real value of a carrier: ``q * S`` in float32 (or ``q`` unchanged when ``scale is None``).

    Args:
        q: integer-valued tensor (any float dtype) or a real tensor when ``scale is None``.
        scale: float32 ``(1,)`` / ``(C,)`` scale over the last dim, or None.
    """
    if scale is None:
        return q
    # the promoted product (float64 for float64 q), computed with same-dtype operands: mixed float32/float64
    # elementwise kernels are not vectorised on CPU
    return (q * scale.to(torch.promote_types(q.dtype, scale.dtype))).float()


class _FloorSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.floor(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ClampSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lo, hi):
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """``floor(x)`` with identity gradient (straight-through estimator)."""
    return _FloorSTE.apply(x)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round_half_even(x)`` with identity gradient (straight-through estimator)."""
    return _RoundSTE.apply(x)


def clamp_ste(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``clamp(x, lo, hi)`` with identity gradient (saturation is straight-through, as upstream I-BERT)."""
    return _ClampSTE.apply(x, lo, hi)


class _AttachScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, scale):
        ctx.save_for_backward(q, scale)
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad):
        q, scale = ctx.saved_tensors
        gq = grad * q
        if scale.numel() == 1:
            gs = gq.sum().reshape(scale.shape)
        else:
            gs = gq.reshape(-1, scale.shape[-1]).sum(0).reshape(scale.shape)
        return grad, (gs / scale.to(gs.dtype)).to(scale.dtype)


def attach_scale_grad(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Identity on ``q`` whose backward also sends ``dL/dS = sum(dL/dq * q / S)`` to a differentiable ``scale``.

    Scales travel detached, so a scale that depends on a parameter (IntLayerNorm: ``S_out = S_n * gamma``) routes
    its gradient through the integer tensor instead: moving ``S`` by ``dS`` moves the real value ``q*S`` exactly as
    moving ``q`` by ``q*dS/S`` would.

    Args:
        q: integer carrier ``(..., C)``.
        scale: differentiable scale, ``(1,)`` or ``(C,)``.
    """
    return _AttachScaleGrad.apply(q, scale)


# ----------------------------------------------------------------------------------------------------------------
# dyadic requantization
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def dyadic(ratio: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dyadic approximation ``ratio ~= m / 2^e`` (vectorised ``torch.frexp``, exact float64 arithmetic).

    ``mant, ex = frexp(ratio)``; ``m = sign(mant) * floor(|mant| * 2^B + 0.5)`` (round half away from zero, the
    ``Decimal.ROUND_HALF_UP`` of upstream ``batch_frexp``), ``e = B - ex`` with ``B = DYADIC_BITS = 20``, so ``|m|``
    lies in ``[2^19, 2^20]``. Ratios of ``2^19`` or more would give ``e < 1``; they are normalised to ``e = 1``,
    ``m * 2^(1 - e)`` (the same value).

    Args:
        ratio: any shape, converted to float64 (typically ``double(S_in) / double(S_out)``, ``(1,)`` or ``(C,)``).

    Returns:
        ``(m, e)``: float64 tensors of exact integers with the shape of ``ratio``; ``e >= 1``.
    """
    r = ratio.to(torch.float64)
    mant, ex = torch.frexp(r)
    m = torch.sign(mant) * torch.floor(mant.abs() * float(2**DYADIC_BITS) + 0.5)
    e = DYADIC_BITS - ex.to(torch.float64)
    lift = (1.0 - e).clamp(min=0.0)
    return m * pow2(lift), e + lift


#: Inputs of :func:`requant` are integers below this bound (``zl m < 2^51`` in the split of ``_requant_f64``).
REQUANT_Z_BITS = 51
#: Shifts above this give 0 for every input of the domain (``|z m| < 2^71 <= 2^(e-1)``); larger ones are capped.
_REQUANT_E_CAP = 72
#: Low part of the split requant: ``z = zh 2^s + zl`` with ``s <= 31`` keeps ``zl m < 2^51`` and ``|zh m| < 2^40``.
_REQUANT_SPLIT = 31


def _requant_f64(z: torch.Tensor, m: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``floor((z m + 2^(e-1)) / 2^e)`` for float64 integers ``|z| < 2^51``, ``|m| <= 2^20`` (``e <= 1`` when
    larger), in float64 arithmetic where every operation is exact.

    Split ``z = zh 2^s + zl`` with ``s = min(e - 1, 31)``, ``zh = floor(z 2^-s)``, ``0 <= zl < 2^s``; since ``zh m``
    and ``2^(e-1-s)`` are integers, ``R = floor((zh m + lo) 2^-(e-s) + 1/2)`` with ``lo = floor(zl m 2^-s)``.
    Exactness of each float64 step: ``z 2^-s``, ``zh 2^s`` and every ``* 2^-k`` are power-of-two scalings; ``zl``
    is a difference below ``2^s``; ``zl m < 2^51``; ``u = zh m + lo`` with ``|zh m| < 2^40`` when ``s = 31``, and
    ``|u| <= 2 |R| + 2^21`` when ``s = e - 1 < 31`` (``e - s = 1``), so ``u`` and ``u/2^(e-s) + 1/2`` are exact
    whenever ``|R| < 2^51``. Beyond, rounding being monotone, the computed result is still beyond ``+-2^50`` with
    the sign of ``R``: saturating callers (any ``|clamp| <= 2^23``) get the exact clamped value for every
    ``|z| < 2^51``. Non-integer ``z`` (training-time dropout) is rounded half to even (by rounding ``zl``, which
    has the parity of ``z`` when ``s >= 1``), as the int64 split this replaces did.

    Returns float64 integers (11 vectorised passes, no int64 multiply, which AVX2 lacks).
    """
    e = e.clamp(max=float(_REQUANT_E_CAP))
    s = (e - 1.0).clamp(min=0.0, max=float(_REQUANT_SPLIT))
    zh = (z * pow2(-s)).floor_()
    lo = torch.addcmul(z, zh, pow2(s), value=-1.0).round_()  # zl, exact, in [0, 2^s]
    lo.mul_(m * pow2(-s)).floor_()
    u = lo.addcmul_(zh, m)  # zh m + lo
    return torch.addcmul(torch.full_like(e, 0.5), u, pow2(s - e), out=u).floor_()


def _requant_forward(z: torch.Tensor, m: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Exact ``floor((z*m + 2^(e-1)) / 2^e)`` in float64: one fused pass for float32 ``z`` (``|z*m| < 2^44``),
    the split of ``_requant_f64`` for float64 ``z``. Returns float64.

    Non-integer inputs (training-time dropout): float32 ones are rounded by the dyadic rounding itself
    (``floor(z r + 1/2)``), float64 ones to the nearest integer first.
    """
    if z.dtype in (torch.float32, torch.float16, torch.bfloat16):
        # |z| < 2^24, |m| <= 2^20: z m is exact, and so is z m 2^-e + 1/2 = (z m + 2^(e-1)) 2^-e when e <= 52
        # (numerator below 2^53); for e >= 53 it lies in (1/2 - 2^-9, 1/2 + 2^-9) and floors to 0, as R does
        zd = z.to(torch.float64, copy=True)
        return torch.addcmul(torch.full_like(e, 0.5), zd, m * pow2(-e), out=zd).floor_()
    return _requant_f64(z.to(torch.float64), m, e)


class _Requant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, m, e):
        ctx.save_for_backward(m, e)
        ctx.z_dtype = z.dtype
        return _requant_forward(z, m, e).to(torch.float64)

    @staticmethod
    def backward(ctx, grad):
        m, e = ctx.saved_tensors
        return _scaled_grad(grad, m * torch.exp2(-e), ctx.z_dtype), None, None


def requant(z: torch.Tensor, m: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Dyadic requantization ``floor((z * m + 2^(e-1)) / 2^e)`` (round half up), exact.

    Computed in float64: in one pass for float32 ``z`` (``|z| < 2^24``), by an exact split for float64 ``z``
    (``|z| < 2^51``, see ``_requant_f64``); exact whenever the result is below ``2^51`` (any ``z`` of the domain
    when ``e > 31``). :func:`requant_clamp` saturates beyond (exact for every ``|z| < 2^51``).
    Backward (STE): ``grad * m / 2^e``; no gradient to ``m``/``e``.

    Args:
        z: integer-valued tensor ``(..., C)``.
        m: multiplier from :func:`dyadic`, ``(1,)`` or ``(C,)`` (per channel over the last dim).
        e: shift from :func:`dyadic`, same shape as ``m``, ``e >= 1``.

    Returns:
        float64 integers (exact below 2^53).
    """
    return _Requant.apply(z, m, e)


def _scaled_grad(grad: torch.Tensor, ratio: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad * ratio`` in the gradient's dtype (float32: a straight-through gradient needs no float64; the
    integer GEMM that consumes an accumulator's gradient rounds it to float32 anyway), returned in ``dtype``."""
    # same-dtype ops only: mixed float32/float64 elementwise kernels are not vectorised on CPU (~10x slower)
    return torch.mul(grad, ratio.to(grad.dtype)).to(dtype)


class _RequantClamp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, m, e, z_id, m_id, e_id, n):
        ctx.save_for_backward(m, e, m_id, e_id)
        ctx.dtypes = (z.dtype, None if z_id is None else z_id.dtype)
        k = fused.for_requant(z, m, e, z_id, m_id, e_id)
        if k is not None:  # CPU: the same integers in one pass (qat_kernels.cpp)
            return k.requant_clamp(z, m, e, z_id, m_id, e_id, n)
        # exact terms below 2^50 (float64), saturating beyond (see _requant_f64): the clamp is exact
        out = _requant_forward(z, m, e)
        if z_id is not None:
            out.add_(_requant_forward(z_id, m_id, e_id))
        return out.clamp_(-n, n).to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        m, e, m_id, e_id = ctx.saved_tensors
        g = _scaled_grad(grad, m * torch.exp2(-e), ctx.dtypes[0])
        g_id = None
        if ctx.dtypes[1] is not None:
            g_id = _scaled_grad(grad, m_id * torch.exp2(-e_id), ctx.dtypes[1])
        return g, None, None, g_id, None, None, None


def requant_clamp(
    z: torch.Tensor,
    m: torch.Tensor,
    e: torch.Tensor,
    bits: int,
    z_id: Optional[torch.Tensor] = None,
    m_id: Optional[torch.Tensor] = None,
    e_id: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """QuantAct's integer path: ``clamp(requant(z, m, e) [+ requant(z_id, m_id, e_id)], -n(b), n(b))``.

    Both requantizations (float64, see :func:`requant`) and their sum are exact below ``2^50``; a term beyond keeps
    its sign, so the result saturates exactly for every ``|z| < 2^51`` however fine the input scale (with ``z_id``:
    when the other term is below ``2^50``). Gradients: ``grad * m/2^e`` to ``z`` and ``grad * m_id/2^e_id`` to
    ``z_id`` (straight through the clamp), in the operands' dtypes.

    Args:
        z: integer-valued input ``(..., C)``; ``m``, ``e``: its dyadic ratio ``(1,)`` or ``(C,)``.
        bits: signed output bit-width ``b``.
        z_id, m_id, e_id: optional residual (identity) operand and its dyadic ratio.

    Returns:
        float32 integers in ``[-n(b), n(b)]`` (``b <= 24``).
    """
    return _RequantClamp.apply(z, m, e, z_id, m_id, e_id, qmax(bits))


# ----------------------------------------------------------------------------------------------------------------
# derived scales and dyadic constants: the one definition used by the QAT forward and the engine converter
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def requant_constants(s_in: torch.Tensor, s_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dyadic ``(m, e)`` that requantizes scale ``s_in`` to ``s_out``: ``dyadic(double(s_in) / double(s_out))``.

    Args:
        s_in: float32 input scale, ``(1,)`` or ``(C,)``.
        s_out: float32 output scale ``(1,)``.

    Returns:
        float64 ``(m, e)`` with the shape of ``s_in`` (``|m| <= 2^20``, ``e >= 1``).
    """
    return dyadic(true_div(s_in.detach().to(torch.float64), s_out.detach().to(torch.float64)))


@torch.no_grad()
def accumulator_scale(s_w: torch.Tensor, s_x: torch.Tensor) -> torch.Tensor:
    """Scale of a QuantLinear accumulator: ``S_acc = S_w * S_x`` in float32.

    Args:
        s_w: per-output-channel weight scale ``(C_out,)`` (or ``(1,)``).
        s_x: per-tensor input scale ``(1,)``.

    Returns:
        float32 ``(C_out,)``.
    """
    return s_w.detach().float().reshape(-1) * s_x.detach().float().reshape(1)


def bias_integer(bias: torch.Tensor, s_acc: torch.Tensor, bits: int) -> torch.Tensor:
    """``b_int = clamp(round_half_even(double(b) / double(S_acc)), -n(bits), n(bits))`` in float64 (STE to ``b``).

    Args:
        bias: float bias ``(C_out,)``.
        s_acc: float32 accumulator scale ``(C_out,)``.
        bits: bias bit-width (32; float32 cannot hold ``2^31 - 1``, hence float64).

    Returns:
        float64 ``(C_out,)`` integers.
    """
    return quantize(bias.to(torch.float64), s_acc.detach().to(torch.float64), bits)


@torch.no_grad()
def score_scale(s_q: torch.Tensor, s_k: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Scale of the integer attention scores ``q_q @ q_k^T``: ``S_q * S_k * head_dim^-0.5`` in float32 (the
    softmax temperature folded in), shape ``(1,)``."""
    return (s_q.detach().float() * s_k.detach().float() * float(head_dim) ** -0.5).reshape(1)


@torch.no_grad()
def context_scale(s_probs: torch.Tensor, s_v: torch.Tensor) -> torch.Tensor:
    """Scale of the attention context ``p @ q_v``: ``float(double(S_probs) * double(S_v))``, shape ``(1,)``.

    Args:
        s_probs: float32 ``(1,)`` probability scale (``1 / (2^softmax_out_bits - 1)``).
        s_v: float32 ``(1,)`` scale of the 8-bit values.
    """
    return (s_probs.detach().to(torch.float64) * s_v.detach().to(torch.float64)).to(torch.float32).reshape(1)


# ----------------------------------------------------------------------------------------------------------------
# integer square root (I-BERT Algorithm 4)
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def isqrt(n: torch.Tensor) -> torch.Tensor:
    """Exact ``floor(sqrt(n))`` by I-BERT Algorithm 4 (integer Newton), vectorised with a fixed iteration count.

    Starts at ``x0 = 2^ceil(bits(n)/2) >= sqrt(n)`` (so ``x0 / sqrt(n) <= 2``) and iterates
    ``x <- min(x, floor((x + floor(n / x)) / 2))`` (Alg. 4 stops once the iterate stops decreasing; the ``min``
    freezes it there). The integer iterate never exceeds the real Newton iterate, whose relative error obeys
    ``eps' = eps^2 / (2 (1 + eps))`` from ``eps0 <= 1``: after 6 steps ``eps < 2^-100``, below the ``1/(2n)`` needed
    for ``n < 2^53``; the 7 steps used here also cover int64 inputs below 2^62 (``eps0 <= 3``). ``isqrt(0) = 0``.
    Runs in int64.

    Args:
        n: non-negative integers (float64 exact below 2^53, or int64), any shape.

    Returns:
        ``floor(sqrt(n))`` with the dtype and shape of ``n``.
    """
    ni = n if not n.is_floating_point() else n.to(torch.int64)
    _, bits = torch.frexp(ni.to(torch.float64))
    x = torch.bitwise_left_shift(torch.ones_like(ni), ((bits.to(torch.int64) + 1) // 2).clamp(min=0))
    for _ in range(ISQRT_ITERS):
        y = (x + torch.div(ni, x.clamp(min=1), rounding_mode="floor")) >> 1
        x = torch.minimum(x, y)
    return x.to(n.dtype)


class _IsqrtSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, n):
        out = isqrt(n)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (root,) = ctx.saved_tensors
        return grad * 0.5 / root.clamp(min=1).to(grad.dtype)


def isqrt_ste(n: torch.Tensor) -> torch.Tensor:
    """:func:`isqrt` forward; backward as ``sqrt`` (``grad / (2 * max(isqrt(n), 1))``), for the LayerNorm QAT."""
    return _IsqrtSTE.apply(n)


# ----------------------------------------------------------------------------------------------------------------
# exact integer GEMM
# ----------------------------------------------------------------------------------------------------------------
def _mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    if b_t.dim() == 2:
        return F.linear(a, b_t)
    return torch.matmul(a, b_t.transpose(-1, -2))


class _ExactIntMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b_t, bias, chunk):
        a32 = a.to(torch.float32)
        b32 = b_t.to(torch.float32)
        ctx.save_for_backward(a32, b32)
        ctx.dtypes = (a.dtype, b_t.dtype, None if bias is None else bias.dtype)
        k = a32.shape[-1]
        if k <= chunk:
            out = _mm(a32, b32)
            # (mixed float32/float64 elementwise kernels are not vectorised on CPU: convert, then add in place)
            return out if bias is None else out.to(torch.float64).add_(bias)
        acc = None
        for k0 in range(0, k, chunk):  # loop over K-chunks (a handful), not over elements
            part = _mm(a32[..., k0 : k0 + chunk], b32[..., k0 : k0 + chunk]).to(torch.float64)
            acc = part if acc is None else acc.add_(part)
        return acc if bias is None else acc.add_(bias)

    @staticmethod
    def backward(ctx, grad):
        a32, b32 = ctx.saved_tensors
        # one conversion to a contiguous float32 gradient (incoming ones are often permuted views): the
        # reshapes below are then views, not copies
        g = grad.to(torch.float32, memory_format=torch.contiguous_format)
        grad_a = grad_b = grad_bias = None
        if b32.dim() == 2:
            g2 = g.view(-1, g.shape[-1])
            if ctx.needs_input_grad[0]:
                grad_a = torch.mm(g2, b32).view(a32.shape).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                grad_b = torch.mm(g2.t(), a32.reshape(-1, a32.shape[-1])).to(ctx.dtypes[1])
            if ctx.needs_input_grad[2]:
                grad_bias = g2.sum(0).to(ctx.dtypes[2])
        else:
            if ctx.needs_input_grad[0]:
                grad_a = torch.matmul(g, b32).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                grad_b = torch.matmul(g.transpose(-1, -2), a32).to(ctx.dtypes[1])
        return grad_a, grad_b, grad_bias, None


def exact_int_matmul(
    a: torch.Tensor,
    b_t: torch.Tensor,
    a_bits: int = 8,
    b_bits: int = 8,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Exact ``a @ b_t^T (+ bias)`` of integer-valued operands: float32 GEMMs over K-chunks summed in float64.

    Every chunk's partial sums stay below ``2^24`` (``chunk * n(a_bits) * n(b_bits) <= 2^24``, at most 1024), so
    each float32 GEMM is exact whatever its summation order (and with TF32/bf16 inputs for operands of <= 8 bits);
    the chunks (and the bias) are added in float64. Differentiable (float32 GEMMs in backward, as ``F.linear``).

    Args:
        a: ``(..., K)`` integers with ``|a| <= n(a_bits)`` (pass ``a_bits=9`` for unsigned 8-bit).
        b_t: ``(N, K)`` (a weight, as ``F.linear``) or ``(..., N, K)`` with the batch dims of ``a``.
        a_bits, b_bits: signed bit-widths bounding the operands.
        bias: optional float64 ``(N,)`` integers (e.g. a 32-bit quantized bias), only with a 2-D ``b_t``.

    Returns:
        ``(..., N)``: float32 when ``K`` fits one chunk and there is no bias (values below 2^24), else float64.
    """
    if b_t.dim() != 2 and b_t.shape[:-2] != a.shape[:-2]:
        raise ValueError(
            f"exact_int_matmul needs b_t of shape (N, K) or with the batch dims of a, got {tuple(a.shape)} and "
            f"{tuple(b_t.shape)}"
        )
    if bias is not None and (b_t.dim() != 2 or bias.dtype != torch.float64):
        raise ValueError("exact_int_matmul takes a float64 (N,) bias only with a 2-D b_t")
    if qmax(a_bits) * qmax(b_bits) > _F32_EXACT:
        raise ValueError(f"exact_int_matmul: {a_bits}-bit x {b_bits}-bit products exceed 2^24 and cannot be exact "
                         f"in float32")
    chunk = max(1, min(MATMUL_CHUNK, _F32_EXACT // (qmax(a_bits) * qmax(b_bits))))
    return _ExactIntMatmul.apply(a, b_t, bias, chunk)
