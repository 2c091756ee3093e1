"""Integer-only nonlinear operations of I-BERT, as pure functions on ``(q, S)`` carriers.

* :func:`int_gelu`: i-GELU, I-BERT Eq. 8-9 (second-order polynomial of erf, ``L(x) = sgn(x)[a(min(|x|,-b)+b)^2+1]``,
  ``GELU(x) ~= x/2 [1 + L(x/sqrt 2)]``), Algorithm 2.
* :func:`int_exp` / :func:`int_softmax`: i-exp with ``-ln2`` range reduction (I-BERT Eq. 10-12, Algorithm 3),
  normalised to an unsigned ``softmax_out_bits`` probability.
* :func:`int_layernorm`: integer LayerNorm with the integer Newton square root (I-BERT §3.5, Algorithm 4).

Everything follows ``docs/integer_spec.md`` exactly: the outputs of these functions in eval mode are the integers
the inference engine must reproduce. Integer intermediates are exact in float64 (all below 2^53); every
scale-derived constant is computed in float64 from the float32 input scale with the expression order given in the
spec. For QAT speed, i-GELU, the softmax and the LayerNorm are single autograd Functions: the forward runs the
integer arithmetic in place (few float64 temporaries) and the backward is the closed form of the straight-through
derivative that autograd would produce through ``floor_ste`` (identity) and ``isqrt_ste`` (as sqrt); tests check the
two agree.

Deviations from upstream I-BERT (all documented in the spec): the i-GELU polynomial uses ``a = -0.287,
b = -1.775`` (paper ``-0.2888, -1.769``: L-inf 0.01815 over [-4, 4]; ours 0.0177 at the same L2 0.0082) and
rounds its ``>> 14`` to nearest (half away from zero, keeping erf odd) instead of flooring; i-exp uses the minimax
coefficients ``0.3671 x^2 + 0.9736 x + 1`` (paper least squares ``0.35815147, 0.96963238, 1``: max error 1.93e-3
on (-ln2, 0]; ours 1.6e-3); the softmax normalises with ``2^40 / sum`` and rounds; IntLayerNorm uses
``2^45 / sd`` instead of ``2^31 / sd`` (14 more bits of ``1/sd``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .primitives import floor_ste, isqrt, pow2, qmax, true_div

__all__ = [
    "GELU_K",
    "GELU_A",
    "GELU_B",
    "GELU_C",
    "GELU_SHIFT",
    "EXP_LN2",
    "EXP_A",
    "EXP_B",
    "EXP_C",
    "EXP_CLIP",
    "EXP_BITS",
    "SOFTMAX_NORM_BITS",
    "LN_VAR_BITS",
    "LN_GAMMA_EPS",
    "LN_FACTOR_BITS",
    "LN_OUT_SHIFT",
    "int_gelu",
    "int_exp",
    "int_softmax",
    "int_layernorm",
    "layernorm_shift_update",
]

# i-GELU (I-BERT Eq. 8-9); a, b refit for L-inf <= 0.018 (paper: -0.2888, -1.769).
GELU_K = 1.4142
GELU_A = -0.287
GELU_B = -1.775
GELU_C = 1.0
GELU_SHIFT = 14

# i-exp (I-BERT Eq. 10-12); minimax quadratic on (-ln2, 0] with exp(0) = 1 (paper: 0.35815147, 0.96963238, 1).
EXP_LN2 = math.log(2.0)
EXP_A = 0.3671
EXP_B = 0.9736
EXP_C = 1.0
EXP_CLIP = 30  # inputs below -30 ln2 are clipped (exp < 1e-9)
EXP_BITS = 16  # static shift T keeps exp values within 16 bits
SOFTMAX_NORM_BITS = 40  # f = floor(2^40 / sum)

# IntLayerNorm
LN_VAR_BITS = 32  # training grows `shift` so that the sum of squares stays below 2^32
LN_GAMMA_EPS = 1e-8
LN_FACTOR_BITS = 45  # f = floor(2^45 / sd) (upstream 2^31: only ~7 bits of 1/sd for wide 22-bit inputs)
LN_OUT_SHIFT = 30  # y_n = floor(y f / 2^(45 - 30)) = y / (sqrt(C) sigma) * 2^30, scale sqrt(C) / 2^30


def _pow2(x: torch.Tensor) -> torch.Tensor:
    return torch.exp2(x)


def _pow2_neg_f32(z: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Exact ``2^-(z + shift)`` in float32 from the exponent bits, for integers ``0 <= z + shift < 127``."""
    n = z.to(torch.int32).add_(shift.to(torch.int32))
    return n.neg_().add_(127).bitwise_left_shift_(23).view(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# i-GELU
# ----------------------------------------------------------------------------------------------------------------
def int_gelu(q: torch.Tensor, scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """i-GELU (I-BERT Eq. 8-9, Algorithm 2) on an integer accumulator.

    With ``S' = S / k`` (float64): ``b_int = floor(b / S')``, ``c_int = floor((c/a) / S'^2)``,
    ``t = min(|q|, -b_int) + b_int``, ``Y = max(0, floor((2^13 - c_int - t^2) / 2^14))``,
    ``S_erf = a S'^2 2^14``, ``one = floor(1 / S_erf)``; output ``q_out = q (one - sgn(q) Y)`` with scale
    ``S S_erf / 2``. This is ``q (y + one)`` with the integer erf ``y = -sgn(q) Y``: ``sgn(q) (t^2 + c_int) / 2^14``
    rounded half away from zero, so that the erf stays odd (upstream floors). ``Y >= 0`` always holds for usable
    (fine) scales; the ``max`` only pins the definition for absurdly coarse ones.

    Precondition: a fine accumulator scale (the 32-bit FC1 output, ``S = S_w S_x``, typically ``< 1e-3``); with an
    8-bit input scale the ``>> 14`` destroys the resolution.

    Args:
        q: integer accumulator ``(..., C)`` (float64 or float32, exact integers, ``|q| < 2^31``).
        scale: float32 ``(C,)`` per-channel or ``(1,)`` scale of ``q``.

    Returns:
        ``(q_out, S_out)``: float64 integers (``|q_out|`` up to about ``|x| 8.5e-4 / S^3``, below 2^42 for
        ``S >= 1e-5``) and the float32 ``(C,)``/``(1,)`` scale ``S S_erf / 2`` (negative: ``a < 0``).
    """
    s64 = scale.detach().to(torch.float64)
    sp = true_div(s64, GELU_K)
    sp2 = sp * sp
    b_int = torch.floor(true_div(GELU_B, sp))
    c_int = torch.floor(true_div(GELU_C / GELU_A, sp2))
    s_erf = GELU_A * sp2 * float(2**GELU_SHIFT)
    one = torch.floor(true_div(1.0, s_erf))
    q_out = _IntGELU.apply(q, b_int, c_int, one)
    s_out = (s64 * s_erf / 2.0).to(torch.float32)
    return q_out, s_out


class _IntGELU(torch.autograd.Function):
    """Forward: the exact integer i-GELU (float64, in-place). Backward: the straight-through derivative of the
    same expression with ``floor`` as identity: ``d q_out / d q = one - sgn(q) Y + q t / 2^13`` (``t = 0`` where
    ``|q| >= -b_int``), the derivative of ``q (y + one)`` through the erf polynomial, as upstream's autograd."""

    @staticmethod
    def forward(ctx, q, b_int, c_int, one):
        qd = q.to(torch.float64)
        t = qd.abs().clamp_(max=-b_int).add_(b_int)  # min(|q|, -b_int) + b_int, in [b_int, 0]
        w = torch.addcmul(float(2 ** (GELU_SHIFT - 1)) - c_int, t, t, value=-1.0)
        torch.floor_divide(w, float(2**GELU_SHIFT), out=w).clamp_(min=0.0)  # Y >= 0
        torch.sub(one, w.copysign_(qd), out=w)  # y + one = one - sgn(q) Y  (q = 0: q_out = 0 either way)
        q_out = qd * w
        if ctx.needs_input_grad[0]:
            deriv = w.addcmul_(qd, t, value=float(2.0 ** -(GELU_SHIFT - 1)))  # one - sgn(q) Y + q t / 2^13
            ctx.save_for_backward(deriv)  # float64: the incoming gradient is float64 (same-dtype multiply)
            ctx.q_dtype = q.dtype
        return q_out

    @staticmethod
    def backward(ctx, grad):
        (deriv,) = ctx.saved_tensors
        return (grad.to(deriv.dtype) * deriv).to(ctx.q_dtype), None, None, None


# ----------------------------------------------------------------------------------------------------------------
# i-exp / softmax
# ----------------------------------------------------------------------------------------------------------------
def _exp_constants(scale: torch.Tensor):
    s64 = scale.detach().to(torch.float64)
    x0 = torch.floor(true_div(-EXP_LN2, s64)).clamp(max=-1.0)
    b_int = torch.floor(true_div(EXP_B / EXP_A, s64))
    c_int = torch.floor(true_div(EXP_C / EXP_A, s64 * s64))
    _, bits = torch.frexp(c_int)
    shift_t = (bits.to(torch.float64) - EXP_BITS).clamp(min=0.0)
    return s64, x0, b_int, c_int, shift_t


def _int_exp(qd: torch.Tensor, x0, b_int, c_int, shift_t) -> torch.Tensor:
    d = torch.maximum(qd, EXP_CLIP * x0)
    z = floor_ste(d / x0)
    r = d - x0 * z
    big_l = r * (r + b_int) + c_int
    # No gradient reaches r (dr/dd = 1 - x0 * (1/x0) = 0); as upstream, d exp/dd flows through 2^-z, giving
    # e * ln2 / |x0| ~= e * S, the derivative of exp.
    return floor_ste(big_l * _pow2(-(z + shift_t)))


def int_exp(q: torch.Tensor, scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """i-exp (I-BERT Eq. 10-12, Algorithm 3) of non-positive integers.

    ``x0 = floor(-ln2 / S)`` (at most -1); ``d = max(q, 30 x0)``; ``z = floor(d / x0)``; ``r = d - x0 z`` in
    ``(x0, 0]``; ``L = r (r + floor((b/a)/S)) + floor((c/a)/S^2)``; ``T = max(0, bits(floor((c/a)/S^2)) - 16)``;
    ``e = floor(L / 2^(z + T))``, real value ``e * a S^2 2^T``.

    Args:
        q: integer-valued ``q <= 0`` (any shape, float32/float64).
        scale: float32 ``(1,)`` scale of ``q``.

    Returns:
        ``(e, S_e)``: float64 integers in ``[0, 2^16)`` and the float32 ``(1,)`` scale ``a S^2 2^T``.
    """
    s64, x0, b_int, c_int, shift_t = _exp_constants(scale)
    e = _int_exp(q.to(torch.float64), x0, b_int, c_int, shift_t)
    return e, (EXP_A * s64 * s64 * _pow2(shift_t)).to(torch.float32)


def int_softmax(
    q: torch.Tensor,
    scale: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    out_bits: int = 8,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Integer softmax over the last dim: i-exp of ``q - rowmax`` normalised to unsigned ``out_bits``.

    ``d = q - max_unmasked(q)``; ``e = i-exp(d)`` (0 on masked keys); ``sum = max(sum(e), 1)``;
    ``f = floor(2^40 / sum)``; ``p = floor((e f P + 2^39) / 2^40)`` with ``P = 2^out_bits - 1``; scale ``1/P``.

    Args:
        q: integer scores ``(B, H, Tq, Tk)`` (exact; float32 or float64), real value ``q * S``.
        scale: float32 ``(1,)`` scale of the scores (``S_q S_k head_dim^-0.5``).
        mask: optional key padding mask ``(B, Tk)``, True (nonzero) on padded keys: probability 0.
        out_bits: unsigned output bit-width (8: ``p`` in ``[0, 255]``).

    Returns:
        ``(p, S_p)``: float32 integers in ``[0, 2^out_bits - 1]`` and the float32 ``(1,)`` scale
        ``1 / (2^out_bits - 1)``. A fully masked row gives all zeros.
    """
    _, x0, b_int, c_int, shift_t = _exp_constants(scale)
    km = None if mask is None else mask.to(torch.bool)[:, None, None, :]
    p = _IntSoftmax.apply(q, km, x0, b_int, c_int, shift_t, out_bits)
    s_p = torch.full((1,), 1.0 / float(2**out_bits - 1), dtype=torch.float32, device=q.device)
    return p, s_p


class _IntSoftmax(torch.autograd.Function):
    """Forward: the exact integer softmax (float64 intermediates). Backward: the straight-through derivative of
    the same expression with every floor as identity (as upstream's autograd through ``floor_ste``):
    ``de/dd = e ln2 / |x0|`` (through ``2^-z``; ``e`` before its floor), then the quotient rule of
    ``p = e f P / 2^40``, ``f = 2^40 / sum`` (with the pre-floor ``e`` too: a relative difference below 2^-16
    from the composite). The row max is treated as a constant (softmax is shift invariant)."""

    @staticmethod
    def forward(ctx, q, km, x0, b_int, c_int, shift_t, out_bits):
        if km is not None:
            rowmax = q.masked_fill(km, float("-inf")).amax(dim=-1, keepdim=True)
            rowmax = torch.where(torch.isinf(rowmax), torch.zeros_like(rowmax), rowmax)  # fully masked rows
        else:
            rowmax = q.amax(dim=-1, keepdim=True)
        d = q.to(torch.float64, copy=True).sub_(rowmax.to(torch.float64)).clamp_(min=EXP_CLIP * x0)  # [30 x0, 0]
        z = torch.div(d, x0).floor_()  # in [0, 30]
        r = d.addcmul_(z, x0, value=-1.0)  # d - x0 z in (x0, 0], in place
        e = (r + b_int).mul_(r).add_(c_int)  # L = r (r + b) + c
        # floor(L / 2^(z + T)): 2^-(z+T) built exactly from float32 exponent bits (z + T <= 30 + 37 < 127)
        e.mul_(_pow2_neg_f32(z, shift_t))
        if km is not None:
            e.masked_fill_(km, 0.0)
        e_pre = e.to(torch.float32) if ctx.needs_input_grad[0] else None  # pre-floor exp, for the STE chain
        e.floor_()  # < 2^16
        total = e.sum(dim=-1, keepdim=True).clamp_(min=1.0)
        f = torch.floor(true_div(float(2**SOFTMAX_NORM_BITS), total))
        p_max = float(2**out_bits - 1)
        k = p_max * 2.0**-SOFTMAX_NORM_BITS
        p = e.mul_(f * k).add_(0.5).floor_().to(torch.float32)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(e_pre, f, total, x0)
            ctx.k = k
            ctx.q_dtype = q.dtype
        return p

    @staticmethod
    def backward(ctx, grad):
        e, f, total, x0 = ctx.saved_tensors
        g = grad.to(torch.float32)
        big = (g * e).sum(dim=-1, keepdim=True)
        c1 = (f * ctx.k).to(torch.float32)
        c2 = (float(2**SOFTMAX_NORM_BITS) * ctx.k / (total * total)).to(torch.float32)
        grad_e = g * c1 - big * c2
        grad_q = grad_e.mul_(e).mul_((EXP_LN2 / x0.abs()).to(torch.float32))
        return grad_q.to(ctx.q_dtype), None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# IntLayerNorm
# ----------------------------------------------------------------------------------------------------------------
def _ln_center(qd: torch.Tensor) -> torch.Tensor:
    c = qd.shape[-1]
    mean = floor_ste((2.0 * qd.sum(dim=-1, keepdim=True) + c) / (2.0 * c))
    return qd - mean


@torch.no_grad()
def layernorm_shift_update(q: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Training-time growth of the IntLayerNorm ``shift`` so that ``sum_C(floor(y / 2^shift)^2) < 2^32``.

    With ``V`` the largest row sum of squares at the current shift, when ``V >= 2^32`` the shift grows by
    ``k = max(1, ceil(log2(sqrt(V) / (2^16 - sqrt(C) - 1))))``. Since ``floor(floor(y/2^s)/2^k) = floor(y/2^(s+k))``
    and ``|floor(u/2^k)| <= |u|/2^k + 1``, the new sum satisfies ``sqrt(V') <= sqrt(V)/2^k + sqrt(C) < 2^16``.
    (Upstream takes ``max(shift, k')`` with ``k'`` measured at the *current* shift, which stops growing once
    ``shift >= k'``.) Only training changes the shift; it is frozen in eval.

    Args:
        q: integer input ``(..., C)``.
        shift: float32 ``(1,)`` current shift.

    Returns:
        the new float32 ``(1,)`` shift (never smaller).
    """
    y = _ln_center(q.to(torch.float64))
    ys = torch.floor(y * _pow2(-shift.to(torch.float64)))
    v = (ys * ys).sum(dim=-1).amax().reshape(1)
    margin = math.log2(2.0 ** (LN_VAR_BITS // 2) - math.sqrt(q.shape[-1]) - 1.0)
    grow = torch.ceil(0.5 * torch.log2(v.clamp(min=1.0)) - margin)
    k = torch.where(v >= float(2**LN_VAR_BITS), grow.clamp(min=1.0), torch.zeros_like(grow))
    return (shift + k.to(shift.dtype)).to(shift.dtype)


def _gamma_guard(gamma: torch.Tensor) -> torch.Tensor:
    g = gamma.to(torch.float32)
    return torch.where(g >= 0, g.clamp(min=LN_GAMMA_EPS), g.clamp(max=-LN_GAMMA_EPS))


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
    c = q.shape[-1]
    s_n = math.sqrt(float(c)) / float(2**30)
    g = _gamma_guard(gamma.detach())
    s_out = (s_n * g.to(torch.float64)).to(torch.float32)
    q_out = _IntLayerNorm.apply(q, gamma, beta, shift.detach())
    return q_out, s_out


class _IntLayerNorm(torch.autograd.Function):
    """Forward: the exact integer LayerNorm (float64). Backward: the straight-through derivative of the same
    expression (every floor as identity, ``isqrt`` as ``sqrt``), which for ``q`` is LayerNorm's own gradient;
    ``beta`` and ``gamma`` get theirs through ``b_int = beta / gamma' / S_n`` and, for ``gamma``, through the
    output scale ``S_n gamma'`` (real output ``q_out S_n gamma'``; scales travel detached)."""

    @staticmethod
    def forward(ctx, q, gamma, beta, shift):
        c = q.shape[-1]
        y = q.to(torch.float64, copy=True)
        mean = torch.floor(true_div(y.sum(dim=-1, keepdim=True).mul_(2.0).add_(c), 2.0 * c))
        y.sub_(mean)  # |y| < 2^23
        sh = shift.to(torch.float64)
        ys = (y * pow2(-sh)).floor_()
        var = torch.linalg.vecdot(ys, ys).unsqueeze(-1)  # exact: every partial sum < 2^53
        root = isqrt(var)
        sd = root.clamp(min=1.0).mul_(pow2(sh))
        f = torch.floor(true_div(float(2**LN_FACTOR_BITS), sd))
        y_n = (y * f).mul_(float(2.0 ** (LN_OUT_SHIFT - LN_FACTOR_BITS))).floor_()
        s_n = math.sqrt(float(c)) / float(2**30)
        g64 = _gamma_guard(gamma.detach()).to(torch.float64)
        n32 = float(qmax(32))
        b_raw = torch.floor(true_div(true_div(beta.detach().to(torch.float64), g64), s_n))
        b_int = b_raw.clamp(-n32, n32)
        q_out = y_n.add_(b_int)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(y.to(torch.float32), ys.to(torch.float32), f, sd, root, q_out, g64, gamma,
                                  beta, b_raw)
            ctx.s_n = s_n
            ctx.q_dtype = q.dtype
        return q_out

    @staticmethod
    def backward(ctx, grad):
        y, ys, f, sd, root, q_out, g64, gamma, beta, b_raw = ctx.saved_tensors
        s_n = ctx.s_n
        c = y.shape[-1]
        grad_q = grad_gamma = grad_beta = None
        g = grad.to(torch.float64)
        if ctx.needs_input_grad[0]:
            # y_n = y f / 2^15, f = 2^45 / sd, sd = sqrt(sum ys^2) 2^s, ys = y / 2^s (floors as identity)
            a = (g * y).sum(dim=-1, keepdim=True)
            coef = a * float(2**LN_OUT_SHIFT) / (sd * sd * root.clamp(min=1.0))
            gy = g * (f * float(2.0 ** (LN_OUT_SHIFT - LN_FACTOR_BITS))) - coef * ys
            grad_q = (gy - gy.mean(dim=-1, keepdim=True)).to(ctx.q_dtype)
        n32 = float(qmax(32))
        live = (b_raw.abs() <= n32).to(torch.float64)  # b_int not saturated
        rows = g.reshape(-1, c)
        if ctx.needs_input_grad[2]:
            grad_beta = (rows.sum(0) * live / (g64 * s_n)).to(beta.dtype)
        if ctx.needs_input_grad[1]:
            guard = (gamma.detach().abs() >= LN_GAMMA_EPS).to(torch.float64)
            via_scale = (rows * q_out.reshape(-1, c)).sum(0) / g64
            via_bias = rows.sum(0) * live * beta.detach().to(torch.float64) / (g64 * g64 * s_n)
            grad_gamma = ((via_scale - via_bias) * guard).to(gamma.dtype)
        return grad_q, grad_gamma, grad_beta, None
