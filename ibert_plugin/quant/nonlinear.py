"""Integer-only nonlinear operations of I-BERT, as pure functions on ``(q, S)`` carriers, and the one definition
of their integer constants.

* :func:`gelu_constants` / :func:`int_gelu`: i-GELU, I-BERT Eq. 8-9 (second-order polynomial of erf,
  ``L(x) = sgn(x)[a(min(|x|,-b)+b)^2+1]``, ``GELU(x) ~= x/2 [1 + L(x/sqrt 2)]``), Algorithm 2, with the erf
  evaluated at a normalised scale (any input scale).
* :func:`softmax_constants` / :func:`exp_lut` / :func:`int_exp` / :func:`int_softmax`: i-exp with ``-ln2`` range
  reduction (I-BERT Eq. 10-12, Algorithm 3), normalised to an unsigned ``softmax_out_bits`` probability.
* :func:`layernorm_constants` / :func:`int_layernorm`: integer LayerNorm with the integer Newton square root
  (I-BERT §3.5, Algorithm 4).

Everything follows ``docs/integer_spec.md`` exactly: the outputs of these functions in eval mode are the integers
the inference engine must reproduce, and the engine converter takes its constants from the ``*_constants``
functions here (no second implementation). Integer intermediates are exact in float64 (all below 2^53); every
scale-derived constant is computed in float64 from the float32 input scale with the expression order given in the
spec. For QAT speed, i-GELU, the softmax and the LayerNorm are single autograd Functions: the forward runs the
integer arithmetic in place (few float64 temporaries) and the backward is the closed form of the straight-through
derivative that autograd would produce through ``floor_ste`` (identity) and ``isqrt_ste`` (as sqrt); tests check the
two agree.

Polynomial coefficients come in two sets (``QuantConfig.nonlinear_constants``): ``"paper"`` (default; I-BERT's
``a = -0.2888, b = -1.769`` and i-exp ``0.35815147, 0.96963238, 1``) and ``"refit"`` (``a = -0.287, b = -1.775``:
L-inf 0.0177 instead of 0.01815 over [-4, 4] at the same L2; i-exp minimax ``0.3671, 0.9736, 1``: max error
1.6e-3 instead of 1.93e-3). Other deviations from upstream (all in the spec): i-GELU evaluates its erf on
``|q| 2^k`` at a scale ``S 2^-k`` in ``[2^-14, 2^-13)`` (upstream needs ``S`` of about 1e-3 or finer and collapses
to a few erf levels otherwise) and rounds its ``>> 14`` to nearest (half away from zero, keeping erf odd) instead of
flooring; the softmax normalises with ``2^40 / sum`` and rounds; IntLayerNorm uses ``2^45 / sd`` instead of
``2^31 / sd`` (14 more bits of ``1/sd``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import fused
from .config import LN_VAR_BITS_DEFAULT, NONLINEAR_CONSTANT_SETS
from .primitives import isqrt, pow2, qmax, true_div

__all__ = [
    "NONLINEAR_CONSTANT_SETS",
    "NonlinearCoeffs",
    "nonlinear_coeffs",
    "GELU_K",
    "GELU_C",
    "GELU_SHIFT",
    "GELU_SCALE_EXP",
    "EXP_LN2",
    "EXP_CLIP",
    "EXP_BITS",
    "EXP_LUT_MAX",
    "SOFTMAX_NORM_BITS",
    "LN_VAR_BITS",
    "LN_GAMMA_EPS",
    "LN_FACTOR_BITS",
    "LN_OUT_SHIFT",
    "GeluConstants",
    "gelu_constants",
    "int_gelu",
    "ExpConstants",
    "softmax_constants",
    "exp_lut",
    "int_exp",
    "int_softmax",
    "softmax_output_scale",
    "LayerNormConstants",
    "layernorm_constants",
    "int_layernorm",
    "layernorm_shift_update",
]


@dataclass(frozen=True)
class NonlinearCoeffs:
    """Polynomial coefficients of i-GELU (erf: ``a (x + b)^2 + c``) and i-exp (``A x^2 + B x + C`` on (-ln2, 0])."""

    gelu_a: float
    gelu_b: float
    exp_a: float
    exp_b: float
    exp_c: float


_COEFFS = {
    # I-BERT paper / upstream: erf polynomial (Eq. 8) and the least-squares i-exp quadratic (Eq. 12 / code).
    "paper": NonlinearCoeffs(gelu_a=-0.2888, gelu_b=-1.769, exp_a=0.35815147, exp_b=0.96963238, exp_c=1.0),
    # refit: L-inf 0.0177 (paper's polynomial 0.01815) at L2 0.0082; minimax i-exp with exp(0) = 1 (1.6e-3).
    "refit": NonlinearCoeffs(gelu_a=-0.287, gelu_b=-1.775, exp_a=0.3671, exp_b=0.9736, exp_c=1.0),
}
assert tuple(_COEFFS) == NONLINEAR_CONSTANT_SETS  # the names QuantConfig.nonlinear_constants accepts


def nonlinear_coeffs(name: str = "paper") -> NonlinearCoeffs:
    """The coefficient set ``name`` (``"paper"`` or ``"refit"``); ``ValueError`` otherwise."""
    try:
        return _COEFFS[name]
    except KeyError:
        raise ValueError(f"unknown nonlinear constant set {name!r} (choose {', '.join(_COEFFS)})") from None


# i-GELU (I-BERT Eq. 8-9)
GELU_K = 1.4142
GELU_C = 1.0
GELU_SHIFT = 14
#: The erf runs at the normalised scale ``S' = S 2^-k`` in ``[2^-(E+1), 2^-E)`` (E = 13: 6.1e-5 .. 1.2e-4).
GELU_SCALE_EXP = 13
# i-GELU's Y = floor((2^13 - c_int - t^2) / 2^14) needs no clamp at 0: with t^2 <= b_int^2 <= (|b|/Sp + 1)^2 and
# -c_int >= 1/(|a| Sp^2), the numerator is at least 2^13 - 1 + ((1/|a| - b^2)/Sp - 2|b|)/Sp, positive for every
# Sp = S'/k_gelu < 2^-13.5 when 1/|a| - b^2 > 2|b| 2^-13.5 (paper: 0.33 > 4.3e-4).
_GELU_Y_POSITIVE = all(1.0 / abs(c.gelu_a) - c.gelu_b**2 > 2.0 * abs(c.gelu_b) * 2.0 ** -(GELU_SCALE_EXP + 0.5)
                       for c in _COEFFS.values())
assert _GELU_Y_POSITIVE, "an i-GELU coefficient set makes Y negative: restore the clamp in _IntGELU.forward"

# i-exp (I-BERT Eq. 10-12)
EXP_LN2 = math.log(2.0)
EXP_CLIP = 30  # inputs below -30 ln2 are clipped (exp < 1e-9)
EXP_BITS = 16  # static shift T keeps exp values within 16 bits
SOFTMAX_NORM_BITS = 40  # f = floor(2^40 / sum)
EXP_LUT_MAX = 1 << 25  # largest i-exp table exp_lut builds (score scales down to ~6e-7)

# IntLayerNorm
LN_VAR_BITS = LN_VAR_BITS_DEFAULT  # default variance bound of layernorm_shift_update (QuantConfig.ln_var_bits)
LN_GAMMA_EPS = 1e-8
LN_FACTOR_BITS = 45  # f = floor(2^45 / sd) (upstream 2^31: only ~7 bits of 1/sd for wide 22-bit inputs)
LN_OUT_SHIFT = 30  # y_n = floor(y f / 2^(45 - 30)) = y / (sqrt(C) sigma) * 2^30, scale sqrt(C) / 2^30


def _pow2(x: torch.Tensor) -> torch.Tensor:
    return torch.exp2(x)


# ----------------------------------------------------------------------------------------------------------------
# i-GELU
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class GeluConstants:
    """Per-channel integer constants of i-GELU for an input scale ``S`` ``(C,)`` (all float64 integers ``(C,)``
    except ``s_out``).

    Attributes:
        shift: ``k``: the erf input is ``|q| 2^k`` (``k >= 0``) or ``floor(|q| / 2^-k)`` (``k < 0``), at the scale
            ``S' = S 2^-k`` in ``[2^-14, 2^-13)``.
        b_int: ``floor(b / Sp)`` with ``Sp = S' / k_gelu`` (negative, ``|b_int| < 2^16``).
        c_int: ``floor((c / a) / Sp^2)`` (negative, ``|c_int| < 2^31``).
        one: ``floor(1 / S_erf)``, ``S_erf = a Sp^2 2^14`` (negative, ``|one| < 2^17``).
        s_out: float32 output scale ``float(double(S) S_erf / 2)`` (negative).
    """

    shift: torch.Tensor
    b_int: torch.Tensor
    c_int: torch.Tensor
    one: torch.Tensor
    s_out: torch.Tensor


@torch.no_grad()
def gelu_constants(scale: torch.Tensor, constants: str = "paper") -> GeluConstants:
    """i-GELU constants for the input scale ``scale`` (float32 ``(C,)`` or ``(1,)``, positive), in float64.

    ``mant, ex = frexp(double(S))``; ``k = ex + 13``; ``S' = double(S) 2^-k`` (exact, in ``[2^-14, 2^-13)``);
    ``Sp = S' / 1.4142``; ``Sp2 = Sp Sp``; ``b_int = floor(b / Sp)``; ``c_int = floor((c / a) / Sp2)``;
    ``S_erf = a Sp2 2^14``; ``one = floor(1 / S_erf)``; ``S_out = float(double(S) S_erf / 2)``.

    Args:
        scale: accumulator scale ``S``.
        constants: coefficient set (:data:`NONLINEAR_CONSTANT_SETS`).
    """
    co = nonlinear_coeffs(constants)
    s64 = scale.detach().to(torch.float64)
    _, ex = torch.frexp(s64)
    k = ex.to(torch.float64) + float(GELU_SCALE_EXP)
    sn = s64 * pow2(-k)
    sp = true_div(sn, GELU_K)
    sp2 = sp * sp
    b_int = torch.floor(true_div(co.gelu_b, sp))
    c_int = torch.floor(true_div(GELU_C / co.gelu_a, sp2))
    s_erf = co.gelu_a * sp2 * float(2**GELU_SHIFT)
    one = torch.floor(true_div(1.0, s_erf))
    s_out = (s64 * s_erf / 2.0).to(torch.float32)
    return GeluConstants(shift=k, b_int=b_int, c_int=c_int, one=one, s_out=s_out)


def int_gelu(q: torch.Tensor, scale: torch.Tensor, constants: str = "paper") -> Tuple[torch.Tensor, torch.Tensor]:
    """i-GELU (I-BERT Eq. 8-9, Algorithm 2) on an integer accumulator, exact at every input scale.

    With the constants of :func:`gelu_constants`: ``u = floor(|q| 2^k)``; ``t = min(u, -b_int) + b_int``;
    ``Y = max(0, floor((2^13 - c_int - t^2) / 2^14))``; ``q_out = q (one - sgn(q) Y)`` with scale ``S_out``.
    This is ``q (y + one)`` with the integer erf ``y = -sgn(q) Y`` of ``x / sqrt 2``: ``sgn(q) (t^2 + c_int) / 2^14``
    rounded half away from zero, so that the erf stays odd (upstream floors). Upstream evaluates the erf on ``q``
    itself (``k = 0``), which needs ``S`` of about 1e-3 or finer; the normalisation gives the erf the same
    resolution (``S'`` below 1.3e-4) at every scale.

    Bounds: ``|t| <= |b_int| < 2^16``, ``|c_int| < 2^31``, ``Y < 2^17``, ``|one| < 2^17``; for an accumulator
    ``|q| <= 2^32`` (32-bit bias plus ``K n_a n_w`` for ``K <= 2^17`` at 8 bits) ``|q_out| < 2^50``: exact in
    float64 here and in int64 in the engine.

    Args:
        q: integer accumulator ``(..., C)`` (float64 or float32, exact integers).
        scale: float32 ``(C,)`` per-channel or ``(1,)`` scale of ``q``.
        constants: coefficient set (:data:`NONLINEAR_CONSTANT_SETS`).

    Returns:
        ``(q_out, S_out)``: float64 integers and the float32 ``(C,)``/``(1,)`` scale (negative: ``a < 0``).
    """
    gc = gelu_constants(scale, constants)
    q_out = _IntGELU.apply(q, gc.shift, gc.b_int, gc.c_int, gc.one)
    return q_out, gc.s_out


class _IntGELU(torch.autograd.Function):
    """Forward: the exact integer i-GELU (float64, in-place). Backward: the straight-through derivative of the
    same expression with ``floor`` as identity: ``d q_out / d q = one - sgn(q) Y + q t 2^k / 2^13`` (``t = 0``
    where the erf saturates), the derivative of ``q (y + one)`` through the erf polynomial, as upstream's autograd."""

    @staticmethod
    def forward(ctx, q, shift, b_int, c_int, one):
        k = fused.for_gelu(q, shift, b_int, c_int, one)
        if k is not None:  # CPU: the same integers in one pass (qat_kernels.cpp)
            q_out, deriv = k.int_gelu(q, shift, b_int, c_int, one, GELU_SHIFT, bool(ctx.needs_input_grad[0]))
            if ctx.needs_input_grad[0]:
                ctx.save_for_backward(deriv)
                ctx.q_dtype = q.dtype
            return q_out
        qd = q.to(torch.float64)
        p2k = pow2(shift)
        t = qd.abs().mul_(p2k).floor_()  # u = |q| 2^k, exact (k >= 0), or floor(|q| / 2^-k)
        t.clamp_(max=-b_int).add_(b_int)  # t = min(u, -b_int) + b_int, in [b_int, 0]
        # (2^13 - c_int - t^2) / 2^14 in one pass: t^2 < 2^31 and the sum are exact multiples of 2^-14; it is
        # positive (Y >= 0 without a clamp, see _GELU_Y_POSITIVE)
        w = torch.addcmul((float(2 ** (GELU_SHIFT - 1)) - c_int) * 2.0**-GELU_SHIFT, t, t,
                          value=-(2.0**-GELU_SHIFT)).floor_()
        torch.sub(one, w.mul_(torch.sign(qd)), out=w)  # y + one = one - sgn(q) Y (sgn(0) = 0: slope at 0 is 1/2)
        q_out = qd * w
        if ctx.needs_input_grad[0]:
            deriv = w.addcmul_(qd, t.mul_(p2k * float(2.0 ** -(GELU_SHIFT - 1))))  # one - sgn(q) Y + q t 2^k/2^13
            ctx.save_for_backward(deriv)  # float64: the incoming gradient is float64 (same-dtype multiply)
            ctx.q_dtype = q.dtype
        return q_out

    @staticmethod
    def backward(ctx, grad):
        (deriv,) = ctx.saved_tensors
        return (grad.to(deriv.dtype) * deriv).to(ctx.q_dtype), None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# i-exp / softmax
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ExpConstants:
    """Integer constants of i-exp for a per-tensor score scale (float64 ``(1,)`` integers).

    Attributes:
        x0: ``min(floor(-ln2 / S), -1)``.
        b_int: ``floor((B / A) / S)``.
        c_int: ``floor((C / A) / S^2)``.
        shift: ``T = max(0, bits(c_int) - 16)``.
    """

    x0: torch.Tensor
    b_int: torch.Tensor
    c_int: torch.Tensor
    shift: torch.Tensor


@torch.no_grad()
def softmax_constants(scale: torch.Tensor, constants: str = "paper") -> ExpConstants:
    """i-exp constants (float64) for the float32 ``(1,)`` score scale ``S`` (see :class:`ExpConstants`)."""
    co = nonlinear_coeffs(constants)
    s64 = scale.detach().to(torch.float64)
    x0 = torch.floor(true_div(-EXP_LN2, s64)).clamp(max=-1.0)
    b_int = torch.floor(true_div(co.exp_b / co.exp_a, s64))
    c_int = torch.floor(true_div(co.exp_c / co.exp_a, s64 * s64))
    _, bits = torch.frexp(c_int)
    shift_t = (bits.to(torch.float64) - EXP_BITS).clamp(min=0.0)
    return ExpConstants(x0=x0, b_int=b_int, c_int=c_int, shift=shift_t)


def _exp_before_floor(d: torch.Tensor, x0, b_int, c_int, shift) -> torch.Tensor:
    """The one i-exp evaluation (I-BERT Algorithm 3) before its final floor, computed in place in ``d``.

    ``d``: float64 integers in ``[30 x0, 0]`` (already clipped); returns ``L / 2^(z + T)`` with ``z = floor(d / x0)``,
    ``r = d - x0 z`` and ``L = r (r + b_int) + c_int`` (every value exact in float64: ``|L| < 2^53``).
    """
    z = torch.div(d, x0).floor_()  # in [0, 30]
    r = d.addcmul_(z, x0, value=-1.0)  # d - x0 z in (x0, 0], in place
    e = r + b_int
    torch.addcmul(c_int, e, r, out=e)  # L = r (r + b) + c
    # 2^-(z+T) exactly, in z's buffer: n = 1023 - T - z (in [956, 1023]) lies in the low mantissa bits of
    # n + 2^52; shifting them into the exponent field gives the float64 2^(n - 1023)
    torch.sub((float(2**52) + 1023.0) - shift, z, out=z)
    return e.mul_(z.view(torch.int64).bitwise_left_shift_(52).view(torch.float64))


def _int_exp(qd: torch.Tensor, ec: ExpConstants) -> torch.Tensor:
    d = torch.maximum(qd.to(torch.float64), EXP_CLIP * ec.x0)
    return _exp_before_floor(d, ec.x0, ec.b_int, ec.c_int, ec.shift).floor_()


def int_exp(q: torch.Tensor, scale: torch.Tensor, constants: str = "paper") -> Tuple[torch.Tensor, torch.Tensor]:
    """i-exp (I-BERT Eq. 10-12, Algorithm 3) of non-positive integers.

    ``x0 = floor(-ln2 / S)`` (at most -1); ``d = max(q, 30 x0)``; ``z = floor(d / x0)``; ``r = d - x0 z`` in
    ``(x0, 0]``; ``L = r (r + floor((B/A)/S)) + floor((C/A)/S^2)``; ``T = max(0, bits(floor((C/A)/S^2)) - 16)``;
    ``e = floor(L / 2^(z + T))``, real value ``e * A S^2 2^T``.

    Args:
        q: integer-valued ``q <= 0`` (any shape, float32/float64).
        scale: float32 ``(1,)`` scale of ``q``.
        constants: coefficient set (:data:`NONLINEAR_CONSTANT_SETS`).

    Returns:
        ``(e, S_e)``: float64 integers in ``[0, 2^16)`` and the float32 ``(1,)`` scale ``A S^2 2^T``.
    """
    ec = softmax_constants(scale, constants)
    e = _int_exp(q.to(torch.float64), ec)
    s64 = scale.detach().to(torch.float64)
    return e, (nonlinear_coeffs(constants).exp_a * s64 * s64 * _pow2(ec.shift)).to(torch.float32)


@torch.no_grad()
def exp_lut(scale: torch.Tensor, constants: str = "paper") -> torch.Tensor:
    """The i-exp table of the engine: ``lut[i] = int_exp(-i)`` for ``i`` in ``[0, 30 |x0|]`` (every distinct
    value of ``d = max(s - M, 30 x0)``), int32, truncated after its last non-zero entry plus one 0 (indices past
    the end are clamped to the last entry)."""
    ec = softmax_constants(scale, constants)
    size = int(EXP_CLIP * -float(ec.x0.reshape(-1)[0])) + 1
    if size > EXP_LUT_MAX:
        raise ValueError(f"softmax score scale {float(scale.reshape(-1)[0]):g} is too fine for an i-exp table "
                         f"({size} entries > {EXP_LUT_MAX})")
    lut = _int_exp(-torch.arange(size, dtype=torch.float64, device=ec.x0.device), ec).to(torch.int32)
    nz = torch.nonzero(lut).flatten()
    last = int(nz[-1]) if nz.numel() else 0
    return lut[: last + 2].clone()


def int_softmax(
    q: torch.Tensor,
    scale: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    out_bits: int = 8,
    constants: str = "paper",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integer softmax over the last dim: i-exp of ``q - rowmax`` normalised to unsigned ``out_bits``.

    ``d = q - max_unmasked(q)``; ``e = i-exp(d)`` (0 on masked keys); ``sum = max(sum(e), 1)``;
    ``f = floor(2^40 / sum)``; ``p = floor((e f P + 2^39) / 2^40)`` with ``P = 2^out_bits - 1``; scale ``1/P``.

    Args:
        q: integer scores ``(B, H, Tq, Tk)`` (exact; float32 or float64), real value ``q * S``.
        scale: float32 ``(1,)`` scale of the scores (``S_q S_k head_dim^-0.5``).
        mask: optional key padding mask ``(B, Tk)``, True (nonzero) on padded keys: probability 0.
        out_bits: unsigned output bit-width (8: ``p`` in ``[0, 255]``).
        constants: i-exp coefficient set (:data:`NONLINEAR_CONSTANT_SETS`).

    Returns:
        ``(p, S_p)``: float32 integers in ``[0, 2^out_bits - 1]`` and the float32 ``(1,)`` scale
        ``1 / (2^out_bits - 1)``. A fully masked row gives all zeros.
    """
    ec = softmax_constants(scale, constants)
    km = None if mask is None else mask.to(torch.bool)[:, None, None, :]
    p = _IntSoftmax.apply(q, km, ec.x0, ec.b_int, ec.c_int, ec.shift, out_bits)
    return p, softmax_output_scale(out_bits, q.device)


def softmax_output_scale(out_bits: int = 8, device=None) -> torch.Tensor:
    """Scale of the unsigned ``out_bits`` probabilities: ``float(1 / (2^out_bits - 1))``, float32 ``(1,)``."""
    return torch.full((1,), 1.0 / float(2**out_bits - 1), dtype=torch.float32, device=device)


class _IntSoftmax(torch.autograd.Function):
    """Forward: the exact integer softmax (float64 intermediates). Backward: the straight-through derivative of
    the same expression with every floor as identity (as upstream's autograd through ``floor_ste``):
    ``de/dd = e ln2 / |x0|`` (through ``2^-z``; ``e`` before its floor), then the quotient rule of
    ``p = e f P / 2^40``, ``f = 2^40 / sum`` (with the pre-floor ``e`` too: a relative difference below 2^-16
    from the composite). The row max is treated as a constant (softmax is shift invariant)."""

    @staticmethod
    def forward(ctx, q, km, x0, b_int, c_int, shift_t, out_bits):
        if km is not None:
            # masked keys at -inf: clipped to 30 x0 below, where i-exp floors to 0 (L < 2^(16 + T) <= 2^(30 + T))
            q = q.masked_fill(km, float("-inf"))
            rowmax = q.amax(dim=-1, keepdim=True)
            rowmax = torch.where(torch.isinf(rowmax), torch.zeros_like(rowmax), rowmax)  # fully masked rows
        else:
            rowmax = q.amax(dim=-1, keepdim=True)
        d = q.to(torch.float64, copy=True).sub_(rowmax.to(torch.float64)).clamp_(min=EXP_CLIP * x0)  # [30 x0, 0]
        e = _exp_before_floor(d, x0, b_int, c_int, shift_t)
        e_pre = None
        if ctx.needs_input_grad[0]:  # pre-floor exp for the STE chain, 0 on masked keys (no gradient there)
            e_pre = e.to(torch.float32)
            if km is not None:
                e_pre.masked_fill_(km, 0.0)
        e.floor_()  # < 2^16
        total = e.sum(dim=-1, keepdim=True).clamp_(min=1.0)
        f = torch.floor(true_div(float(2**SOFTMAX_NORM_BITS), total))
        p_max = float(2**out_bits - 1)
        k = p_max * 2.0**-SOFTMAX_NORM_BITS
        # e f P / 2^40 + 1/2 exact: e f <= 2^40, so e f P < 2^48
        p = torch.addcmul(torch.full_like(total, 0.5), e, f * k, out=e).floor_().to(torch.float32)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(e_pre, f, total, x0)
            ctx.k = k
            ctx.q_dtype = q.dtype
        return p

    @staticmethod
    def backward(ctx, grad):
        e, f, total, x0 = ctx.saved_tensors
        g = grad.to(torch.float32, memory_format=torch.contiguous_format)
        big = torch.linalg.vecdot(g, e).unsqueeze(-1)
        dz = EXP_LN2 / x0.abs()  # de/dd = e ln2 / |x0|, folded into the per-row factors
        c1 = (f * ctx.k * dz).to(torch.float32)
        c2 = (float(2**SOFTMAX_NORM_BITS) * ctx.k * dz / (total * total)).to(torch.float32)
        grad_q = (g * c1).addcmul_(big, c2, value=-1.0).mul_(e)
        return grad_q.to(ctx.q_dtype), None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# IntLayerNorm
# ----------------------------------------------------------------------------------------------------------------
def _ln_center(q: torch.Tensor) -> torch.Tensor:
    """``y = q - floor((2 sum(q) + C) / (2C))``, exact: the sum accumulates in float64 (every partial sum an integer
    below 2^53); float32 ``y`` for float32 ``q`` (``|q| < 2^23``, the bound of every QuantAct output (<= 24 bits),
    so ``|y| < 2^24``), float64 otherwise."""
    c = q.shape[-1]
    total = q.sum(dim=-1, keepdim=True, dtype=torch.float64)
    mean = torch.floor(true_div(total.mul_(2.0).add_(c), 2.0 * c))
    if q.dtype == torch.float32:
        return q - mean.to(torch.float32)
    return q.to(torch.float64) - mean


def _ln_shifted(y: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``floor(y / 2^shift)`` in the dtype of ``y`` (exact: a power-of-two scaling, ``shift < 126``)."""
    return (y * pow2(-shift.to(torch.float64)).to(y.dtype)).floor_()


def _row_sq_sum(ys: torch.Tensor) -> torch.Tensor:
    """``sum_C(ys^2)`` per row in float64 (exact below 2^53), shape ``(..., 1)``."""
    ys = ys.to(torch.float64)
    return torch.linalg.vecdot(ys, ys).unsqueeze(-1)


@torch.no_grad()
def layernorm_shift_update(q: torch.Tensor, shift: torch.Tensor, var_bits: int = LN_VAR_BITS) -> torch.Tensor:
    """Training-time growth of the IntLayerNorm ``shift`` so that ``sum_C(floor(y / 2^shift)^2) < 2^var_bits``
    (default ``2^52``, :data:`~ibert_plugin.quant.config.LN_VAR_BITS_DEFAULT`; upstream I-BERT ``2^32``).

    With ``V`` the largest row sum of squares at the current shift and ``h = var_bits / 2``, when
    ``V >= 2^(2h)`` the shift grows by ``k = max(1, ceil(log2(sqrt(V) / (2^h - sqrt(C) - 1))))``. Since
    ``floor(floor(y/2^s)/2^k) = floor(y/2^(s+k))`` and ``|floor(u/2^k)| <= |u|/2^k + 1``, the new sum satisfies
    ``sqrt(V') <= sqrt(V)/2^k + sqrt(C) < 2^h``. 22-bit inputs with ``C <= 1024`` never need a shift.
    (Upstream takes ``max(shift, k')`` with ``k'`` measured at the *current* shift, which stops growing once
    ``shift >= k'``.) Only training changes the shift; it is frozen in eval.

    Args:
        q: integer input ``(..., C)``.
        shift: float32 ``(1,)`` current shift.
        var_bits: the bound's bits (``QuantConfig.ln_var_bits``; even values keep the bound tight).

    Returns:
        the new float32 ``(1,)`` shift (never smaller).
    """
    v = _row_sq_sum(_ln_shifted(_ln_center(q), shift)).amax().reshape(1)
    margin = math.log2(2.0 ** (var_bits // 2) - math.sqrt(q.shape[-1]) - 1.0)
    grow = torch.ceil(0.5 * torch.log2(v.clamp(min=1.0)) - margin)
    k = torch.where(v >= float(2**var_bits), grow.clamp(min=1.0), torch.zeros_like(grow))
    return (shift + k.to(shift.dtype)).to(shift.dtype)


def _gamma_guard(gamma: torch.Tensor) -> torch.Tensor:
    g = gamma.to(torch.float32)
    return torch.where(g >= 0, g.clamp(min=LN_GAMMA_EPS), g.clamp(max=-LN_GAMMA_EPS))


@dataclass
class LayerNormConstants:
    """Integer constants of IntLayerNorm's affine step for ``C`` channels.

    Attributes:
        s_n: ``sqrt(C) / 2^30`` (Python float, float64), the scale of the normalised ``y_n``.
        gamma: guarded ``gamma'`` widened to float64 ``(C,)``.
        b_raw: ``floor(double(beta) / gamma' / S_n)`` before the clamp, float64 ``(C,)``.
        b_int: ``clamp(b_raw, -n(32), n(32))``, float64 ``(C,)``.
        s_out: float32 ``(C,)`` output scale ``float(S_n gamma')`` (negative where ``gamma < 0``).
    """

    s_n: float
    gamma: torch.Tensor
    b_raw: torch.Tensor
    b_int: torch.Tensor
    s_out: torch.Tensor


@torch.no_grad()
def layernorm_constants(gamma: torch.Tensor, beta: torch.Tensor, channels: int) -> LayerNormConstants:
    """IntLayerNorm constants (see :class:`LayerNormConstants`):
    ``gamma' = sign(gamma) max(|gamma|, 1e-8)`` (float32), ``b_int = clamp(floor(beta / gamma' / S_n), +-n(32))``.

    Args:
        gamma: LayerNorm weight ``(C,)``.
        beta: LayerNorm bias ``(C,)``.
        channels: ``C``.
    """
    s_n = math.sqrt(float(channels)) / float(2**LN_OUT_SHIFT)
    g64 = _gamma_guard(gamma.detach()).to(torch.float64)
    n32 = float(qmax(32))
    b_raw = torch.floor(true_div(true_div(beta.detach().to(torch.float64), g64), s_n))
    return LayerNormConstants(s_n=s_n, gamma=g64, b_raw=b_raw, b_int=b_raw.clamp(-n32, n32),
                              s_out=(s_n * g64).to(torch.float32))


def int_layernorm(
    q: torch.Tensor,
    scale: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    shift: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integer LayerNorm (I-BERT §3.5) with the integer square root of Algorithm 4.

    ``mean = floor((2 sum(q) + C) / (2C))``; ``y = q - mean``; ``var = sum(floor(y / 2^shift)^2)``;
    ``sd = max(isqrt(var), 1) 2^shift``; ``f = floor(2^45 / sd)``; ``y_n = floor(y f / 2^15)`` (scale
    ``S_n = sqrt(C) / 2^30``; upstream ``f = floor(2^31 / sd)``, ``y_n = floor(y f / 2)`` keeps only
    ``31 - log2(sd)`` bits of ``1/sd``, 1.4% error for full-range 22-bit inputs);
    ``gamma' = sign(gamma) max(|gamma|, 1e-8)``; ``b_int = clamp(floor(beta / gamma' / S_n), -n(32), n(32))``;
    output ``y_n + b_int`` with scale ``S_n gamma'``.
    The input scale cancels (normalisation is scale invariant) and is not used.

    Gradients (QAT): to ``q`` through the normalisation (STE floors, ``isqrt`` as sqrt); to ``beta`` and ``gamma``
    through ``b_int`` (STE) and, for ``gamma``, through the output scale (which travels detached, so its gradient
    is routed through ``q_out`` as :func:`~ibert_plugin.quant.primitives.attach_scale_grad` does).

    Args:
        q: integer input ``(..., C)`` (float32, 22-bit residual sum).
        scale: float32 ``(1,)`` input scale (unused by the arithmetic).
        gamma: LayerNorm weight ``(C,)``.
        beta: LayerNorm bias ``(C,)``.
        shift: float32 ``(1,)`` variance shift.

    Returns:
        ``(q_out, S_out)``: float64 integers (``|q_out| < 2^32``) and the detached float32 ``(C,)`` scale
        ``S_n gamma'`` (negative where ``gamma < 0``).
    """
    lc = layernorm_constants(gamma, beta, q.shape[-1])
    q_out = _IntLayerNorm.apply(q, gamma, beta, shift.detach(), lc)
    return q_out, lc.s_out


class _IntLayerNorm(torch.autograd.Function):
    """Forward: the exact integer LayerNorm (float64). Backward: the straight-through derivative of the same
    expression (every floor as identity, ``isqrt`` as ``sqrt``), which for ``q`` is LayerNorm's own gradient;
    ``beta`` and ``gamma`` get theirs through ``b_int = beta / gamma' / S_n`` and, for ``gamma``, through the
    output scale ``S_n gamma'`` (real output ``q_out S_n gamma'``; scales travel detached)."""

    @staticmethod
    def forward(ctx, q, gamma, beta, shift, lc):
        y = _ln_center(q)  # float32 for the model's float32 (<= 24-bit) inputs
        ys = _ln_shifted(y, shift)
        var = _row_sq_sum(ys)
        root = isqrt(var)
        sh = shift.to(torch.float64)
        sd = root.clamp(min=1.0).mul_(pow2(sh))
        f = torch.floor(true_div(float(2**LN_FACTOR_BITS), sd))
        # |y f| <= 2^46 (|y| <= 2 sd): exact in float64
        q_out = y.to(torch.float64, copy=True).mul_(f * float(2.0 ** (LN_OUT_SHIFT - LN_FACTOR_BITS))).floor_()
        q_out.add_(lc.b_int)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(y, ys, f, sd, root, q_out, lc.gamma, gamma, beta, lc.b_raw)
            ctx.s_n = lc.s_n
            ctx.q_dtype = q.dtype
        return q_out

    @staticmethod
    def backward(ctx, grad):
        y, ys, f, sd, root, q_out, g64, gamma, beta, b_raw = ctx.saved_tensors
        s_n = ctx.s_n
        c = y.shape[-1]
        grad_q = grad_gamma = grad_beta = None
        # straight-through gradients need no exact arithmetic: float32, per-row constants in float64
        g = grad.to(torch.float32, memory_format=torch.contiguous_format)
        if ctx.needs_input_grad[0]:
            # y_n = y f / 2^15, f = 2^45 / sd, sd = sqrt(sum ys^2) 2^s, ys = y / 2^s (floors as identity)
            yf, ysf = y.to(torch.float32), ys.to(torch.float32)
            a = torch.linalg.vecdot(g, yf).unsqueeze(-1).to(torch.float64)
            coef = (a * float(2**LN_OUT_SHIFT) / (sd * sd * root.clamp(min=1.0))).to(torch.float32)
            gy = g * (f * float(2.0 ** (LN_OUT_SHIFT - LN_FACTOR_BITS))).to(torch.float32)
            gy.addcmul_(ysf, coef, value=-1.0)
            grad_q = gy.sub_(gy.mean(dim=-1, keepdim=True)).to(ctx.q_dtype)
        n32 = float(qmax(32))
        rows = g.view(-1, c)
        g_sum = rows.sum(0).to(torch.float64)
        live = (b_raw.abs() <= n32).to(torch.float64)  # b_int not saturated
        if ctx.needs_input_grad[2]:
            grad_beta = (g_sum * live / (g64 * s_n)).to(beta.dtype)
        if ctx.needs_input_grad[1]:
            guard = (gamma.detach().abs() >= LN_GAMMA_EPS).to(torch.float64)
            via_scale = torch.linalg.vecdot(rows, q_out.view(-1, c).to(torch.float32), dim=0).to(torch.float64) / g64
            via_bias = g_sum * live * beta.detach().to(torch.float64) / (g64 * g64 * s_n)
            grad_gamma = ((via_scale - via_bias) * guard).to(gamma.dtype)
        return grad_q, grad_gamma, grad_beta, None, None
