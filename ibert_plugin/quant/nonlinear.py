"""Integer-only nonlinear operations of I-BERT, as pure functions on ``(q, S)`` carriers.

* :func:`int_gelu`: i-GELU, I-BERT Eq. 8-9 (second-order polynomial of erf, ``L(x) = sgn(x)[a(min(|x|,-b)+b)^2+1]``,
  ``GELU(x) ~= x/2 [1 + L(x/sqrt 2)]``), Algorithm 2.
* :func:`int_exp` / :func:`int_softmax`: i-exp with ``-ln2`` range reduction (I-BERT Eq. 10-12, Algorithm 3),
  normalised to an unsigned ``softmax_out_bits`` probability.
* :func:`int_layernorm`: integer LayerNorm with the integer Newton square root (I-BERT §3.5, Algorithm 4).

Everything follows ``docs/integer_spec.md`` exactly: the outputs of these functions in eval mode are the integers
the inference engine must reproduce. Integer intermediates are exact in float64 (all below 2^53); every
scale-derived constant is computed in float64 from the float32 input scale with the expression order given in the
spec. Gradients for QAT go through ``floor_ste``/``round_ste`` (identity) and ``isqrt_ste`` (as sqrt).

Two constant sets differ from the I-BERT paper (documented in the spec): the i-GELU polynomial uses
``a = -0.287, b = -1.775`` (paper ``-0.2888, -1.769``: L-inf 0.01815 over [-4, 4]; ours 0.0177 at the same L2
0.0082) with round-half-up on the ``>> 14``, and i-exp uses the minimax coefficients ``0.3671 x^2 + 0.9736 x + 1``
(paper least squares ``0.35815147, 0.96963238, 1``: max error 1.93e-3 on (-ln2, 0]; ours 1.6e-3).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .primitives import attach_scale_grad, floor_ste, isqrt_ste, qmax

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


# ----------------------------------------------------------------------------------------------------------------
# i-GELU
# ----------------------------------------------------------------------------------------------------------------
def int_gelu(q: torch.Tensor, scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """i-GELU (I-BERT Eq. 8-9, Algorithm 2) on an integer accumulator.

    With ``S' = S / k`` (float64): ``b_int = floor(b / S')``, ``c_int = floor((c/a) / S'^2)``,
    ``t = min(|q|, -b_int) + b_int``, ``y = floor((sgn(q) (t^2 + c_int) + 2^13) / 2^14)``,
    ``S_erf = a S'^2 2^14``, ``one = floor(1 / S_erf)``; output ``q (y + one)`` with scale ``S S_erf / 2``.

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
    sp = s64 / GELU_K
    sp2 = sp * sp
    b_int = torch.floor(GELU_B / sp)
    c_int = torch.floor((GELU_C / GELU_A) / sp2)
    s_erf = GELU_A * sp2 * float(2**GELU_SHIFT)
    one = torch.floor(1.0 / s_erf)
    qd = q.to(torch.float64)
    t = torch.minimum(qd.abs(), -b_int) + b_int
    y = torch.sign(qd) * (t * t + c_int)
    y = floor_ste((y + float(2 ** (GELU_SHIFT - 1))) * float(2.0**-GELU_SHIFT))
    q_out = qd * (y + one)
    s_out = (s64 * s_erf / 2.0).to(torch.float32)
    return q_out, s_out


# ----------------------------------------------------------------------------------------------------------------
# i-exp / softmax
# ----------------------------------------------------------------------------------------------------------------
def _exp_constants(scale: torch.Tensor):
    s64 = scale.detach().to(torch.float64)
    x0 = torch.floor(-EXP_LN2 / s64).clamp(max=-1.0)
    b_int = torch.floor((EXP_B / EXP_A) / s64)
    c_int = torch.floor((EXP_C / EXP_A) / (s64 * s64))
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
    qd = q.to(torch.float64)
    if mask is not None:
        km = mask.to(torch.bool)[:, None, None, :]
        rowmax = qd.detach().masked_fill(km, float("-inf")).amax(dim=-1, keepdim=True)
        rowmax = torch.where(torch.isfinite(rowmax), rowmax, torch.zeros_like(rowmax))
        d = (qd - rowmax).masked_fill(km, 0.0)
    else:
        d = qd - qd.detach().amax(dim=-1, keepdim=True)
    e = _int_exp(d, x0, b_int, c_int, shift_t)
    if mask is not None:
        e = e.masked_fill(km, 0.0)
    total = e.sum(dim=-1, keepdim=True).clamp(min=1.0)
    f = floor_ste(float(2**SOFTMAX_NORM_BITS) / total)
    p_max = float(2**out_bits - 1)
    p = floor_ste(e * f * (p_max * 2.0**-SOFTMAX_NORM_BITS) + 0.5)
    s_p = torch.full((1,), 1.0 / p_max, dtype=torch.float32, device=q.device)
    return p.to(torch.float32), s_p


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
    ``31 - log2(sd)`` bits of ``1/sd``, 1.4% error for full-range 22-bit inputs); ``gamma' = sign(gamma) max(|gamma|, 1e-8)``;
    ``b_int = clamp(floor(beta / gamma' / S_n), -n(32), n(32))``; output ``y_n + b_int`` with scale ``S_n gamma'``.
    The input scale cancels (normalisation is scale invariant) and is not used.

    Gradients (QAT): to ``q`` through the normalisation (STE floors, ``isqrt`` as sqrt); to ``beta`` and ``gamma``
    through ``b_int`` (STE) and, for ``gamma``, through the output scale via :func:`attach_scale_grad`.

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
    y = _ln_center(q.to(torch.float64))
    sh = shift.detach().to(torch.float64)
    ys = floor_ste(y * _pow2(-sh))
    var = (ys * ys).sum(dim=-1, keepdim=True)
    sd = isqrt_ste(var).clamp(min=1.0) * _pow2(sh)
    f = floor_ste(float(2**LN_FACTOR_BITS) / sd)
    y_n = floor_ste(y * f * float(2.0 ** (LN_OUT_SHIFT - LN_FACTOR_BITS)))
    s_n = math.sqrt(float(c)) / float(2**30)
    g = _gamma_guard(gamma)
    n32 = float(qmax(32))
    b_int = floor_ste(beta.to(torch.float64) / g.to(torch.float64) / s_n).clamp(-n32, n32)
    s_out = (s_n * g.to(torch.float64)).to(torch.float32)
    q_out = attach_scale_grad(y_n + b_int, s_out)
    return q_out, s_out.detach()
