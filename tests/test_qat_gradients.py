"""The QAT fast paths: exact float64 requantization, float32 LayerNorm on 24-bit inputs, and the float32
straight-through backward passes, each against an independent reference (Python integers, float64 autograd
through the straight-through composite, plain float GEMMs)."""
import math

import pytest
import torch
import torch.nn.functional as F

from ibert_plugin.quant.nonlinear import (
    LN_FACTOR_BITS,
    LN_OUT_SHIFT,
    NONLINEAR_CONSTANT_SETS,
    gelu_constants,
    int_gelu,
    int_layernorm,
    int_softmax,
    layernorm_constants,
    layernorm_shift_update,
    nonlinear_coeffs,
)
from ibert_plugin.quant.primitives import (
    attach_scale_grad,
    dyadic,
    exact_int_matmul,
    floor_ste,
    isqrt_ste,
    requant,
    requant_clamp,
)


def _ref(z: int, m: int, e: int) -> int:
    return (z * m + (1 << (e - 1))) >> e


def _ints(t: torch.Tensor):
    return [int(v) for v in t.reshape(-1).tolist()]


# ---------------------------------------------------------------------------------------------------------------
# float64 requantization (the split in float64 arithmetic)
# ---------------------------------------------------------------------------------------------------------------
def test_requant_float64_split_is_exact_across_the_domain():
    """Every shift (1 .. 90, capped at 72), lifted multipliers (ratio >= 2^19, e = 1), negative ratios and
    inputs up to 2^51 - 1: equal to Python integers whenever the result is below 2^51."""
    g = torch.Generator().manual_seed(11)
    bits = torch.randint(0, 52, (600,), generator=g)
    z = (torch.rand(600, generator=g, dtype=torch.float64) * torch.exp2(bits.double())).floor()
    z = torch.where(torch.rand(600, generator=g) < 0.5, -z, z)
    z[:3] = torch.tensor([2.0**51 - 1, -(2.0**51 - 1), 0.0], dtype=torch.float64)
    ratios = torch.tensor([2.0**21 + 3, 3.3, -0.77, 2.0**-13, -3e-9, 2.0**-31 * 1.7, 1e-16, 2.0**-70],
                          dtype=torch.float64)
    m, e = dyadic(ratios)
    assert float(e.min()) == 1 and float(e.max()) > 72
    out = requant(z[:, None], m, e)
    mi, ei = _ints(m), _ints(e)
    for row, zz in zip(out.tolist(), _ints(z)):
        for j in range(len(mi)):
            want = _ref(zz, mi[j], ei[j])
            if abs(want) < 2**51:
                assert int(row[j]) == want, (zz, mi[j], ei[j])


@pytest.mark.parametrize("bits", [8, 22])
def test_requant_clamp_with_residual_saturates_exactly_beyond_2_51(bits):
    """A residual sum whose main term is far beyond 2^51 (a ratio of 2^21 times inputs up to 2^45) still lands on
    the exact clamped value (an int64 split would overflow here)."""
    g = torch.Generator().manual_seed(12)
    z = torch.randint(-2**45, 2**45, (400, 1), generator=g).double()
    z[:4, 0] = torch.tensor([0.0, 1.0, -1.0, 2.0**45], dtype=torch.float64)
    zid = torch.randint(-2**21 + 1, 2**21, (400, 1), generator=g).float()
    m, e = dyadic(torch.tensor([2.0**21 + 5, 1e-7, -2.5e-6], dtype=torch.float64))
    m2, e2 = dyadic(torch.tensor([0.6], dtype=torch.float64))
    n = 2 ** (bits - 1) - 1
    out = requant_clamp(z, m, e, bits, zid, m2, e2)
    mi, ei, m2i, e2i = _ints(m), _ints(e), int(m2), int(e2)
    for row, zz, zi in zip(out.tolist(), _ints(z), _ints(zid)):
        want = [max(-n, min(n, _ref(zz, mi[j], ei[j]) + _ref(zi, m2i, e2i))) for j in range(3)]
        assert [int(v) for v in row] == want


def test_requant_rounds_fractional_float64_inputs_half_to_even():
    """Training-time dropout leaves fractions in float64 accumulators: they are rounded half to even before the
    exact requantization (as the int64 conversion did), float32 ones by the dyadic rounding itself."""
    m, e = dyadic(torch.tensor([2.0**-3], dtype=torch.float64))  # ratio 1/8, e = 23
    z = torch.tensor([[2.5], [3.5], [-2.5], [11.49], [11.5], [12.5], [-12.5], [1e6 + 0.5]], dtype=torch.float64)
    want = [_ref(int(round(v)), int(m), int(e)) for v in z.reshape(-1).tolist()]  # Python round: half to even
    assert _ints(requant(z, m, e)) == want
    assert _ints(requant_clamp(z, m, e, 24)) == want


# ---------------------------------------------------------------------------------------------------------------
# i-GELU without the Y clamp
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("constants", NONLINEAR_CONSTANT_SETS)
def test_i_gelu_erf_numerator_is_positive_at_every_scale(constants):
    """Y = floor((2^13 - c_int - t^2) / 2^14) is used unclamped: its numerator must stay positive over the whole
    input range ``t`` in ``[b_int, 0]`` at every normalised scale (both ends of ``[2^-14, 2^-13)`` and between)."""
    s = torch.exp2(torch.linspace(-30.0, 2.0, 401))
    gc = gelu_constants(s, constants)
    worst = float(2**13) - gc.c_int - gc.b_int * gc.b_int  # t = b_int maximises t^2
    assert float(worst.min()) > 0
    # and the forward agrees with the clamped formula on saturated and small inputs
    q = torch.round(torch.randn(64, s.numel(), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
                    * 6 / s.double())
    q_out, _ = int_gelu(q, s, constants)
    t = torch.minimum(torch.floor(q.abs() * torch.exp2(gc.shift)), -gc.b_int) + gc.b_int
    y = torch.floor((float(2**13) - gc.c_int - t * t) / float(2**14)).clamp(min=0)
    assert torch.equal(q_out, q * (gc.one - torch.sign(q) * y))
    assert nonlinear_coeffs(constants).gelu_a < 0


# ---------------------------------------------------------------------------------------------------------------
# IntLayerNorm: float32 arithmetic for 24-bit inputs
# ---------------------------------------------------------------------------------------------------------------
def _ln_python(row, gamma, beta, shift):
    c = len(row)
    mean = (2 * sum(row) + c) // (2 * c)
    y = [v - mean for v in row]
    var = sum((v >> shift) ** 2 for v in y)
    sd = max(math.isqrt(var), 1) << shift
    f = (1 << LN_FACTOR_BITS) // sd
    lc = layernorm_constants(gamma, beta, c)
    return [(v * f) >> (LN_FACTOR_BITS - LN_OUT_SHIFT) for v in y], _ints(lc.b_int)


@pytest.mark.parametrize("var_bits", [32, 52])  # upstream's bound (a shift > 0 here) and the default (shift 0)
def test_int_layernorm_float32_inputs_equal_python_integers_and_the_float64_path(var_bits):
    g = torch.Generator().manual_seed(13)
    c = 48
    q = torch.round(torch.randn(9, c, generator=g) * 2**20).clamp(-(2**23 - 1), 2**23 - 1)
    q[0] = 2**23 - 1  # constant row at the 24-bit bound
    q[1], q[1, 0] = 2**23 - 1, -(2**23 - 1)  # y[1, 0] = -(2^23 - 1) - mean, close to -2^24
    gamma, beta = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    shift = layernorm_shift_update(q, torch.zeros(1), var_bits)
    assert (float(shift) > 0) == (var_bits == 32)
    out32, s32 = int_layernorm(q, torch.ones(1), gamma, beta, shift)
    out64, s64 = int_layernorm(q.double(), torch.ones(1), gamma, beta, shift)
    assert out32.dtype == torch.float64 and torch.equal(out32, out64) and torch.equal(s32, s64)
    assert torch.equal(layernorm_shift_update(q.double(), torch.zeros(1), var_bits), shift)
    for row, got in zip(q.tolist(), out32.tolist()):
        y_n, b_int = _ln_python([int(v) for v in row], gamma, beta, int(shift))
        assert [int(v) for v in got] == [a + b for a, b in zip(y_n, b_int)]


# ---------------------------------------------------------------------------------------------------------------
# fused float32 backward passes == float64 autograd through the straight-through composites
# ---------------------------------------------------------------------------------------------------------------
def _composite_layernorm(q, gamma, beta, shift):
    c = q.shape[-1]
    y = q - floor_ste((2 * q.sum(-1, keepdim=True) + c) / (2 * c))
    ys = floor_ste(y / 2.0**shift)
    sd = isqrt_ste((ys * ys).sum(-1, keepdim=True)).clamp(min=1) * 2.0**shift
    f = floor_ste(2.0**LN_FACTOR_BITS / sd)
    y_n = floor_ste(y * f / 2.0 ** (LN_FACTOR_BITS - LN_OUT_SHIFT))
    s_n = math.sqrt(c) / 2.0**LN_OUT_SHIFT
    b_int = floor_ste(beta / gamma / s_n)
    s_out = s_n * gamma
    q_out = y_n + b_int
    return q_out, attach_scale_grad(q_out, s_out) * s_out.detach()


def test_layernorm_float32_backward_matches_the_float64_composite():
    """The model's LayerNorm input is a float32 22-bit residual sum: its backward runs in float32."""
    g = torch.Generator().manual_seed(14)
    q = torch.round(torch.randn(3, 7, 32, generator=g) * 3e5)
    gamma, beta = torch.rand(32, generator=g) + 0.5, torch.randn(32, generator=g)
    w = torch.randn(3, 7, 32, generator=g, dtype=torch.float64)
    qa, ga, ba = q.clone().requires_grad_(), gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    qb, gb, bb = q.double().requires_grad_(), gamma.double().requires_grad_(), beta.double().requires_grad_()
    out, s_out = int_layernorm(qa, torch.ones(1), ga, ba, torch.tensor([3.0]))
    (out * s_out.double() * w).sum().backward()
    q_ref, ref = _composite_layernorm(qb, gb, bb, 3)
    assert torch.equal(out.detach(), q_ref.detach())
    (ref * w).sum().backward()
    assert qa.grad.dtype == torch.float32
    torch.testing.assert_close(qa.grad.double(), qb.grad, rtol=1e-4, atol=1e-4 * qb.grad.abs().max().item())
    torch.testing.assert_close(ga.grad.double(), gb.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ba.grad.double(), bb.grad, rtol=1e-4, atol=1e-6)


def test_softmax_backward_matches_the_composite_and_masked_keys_get_nothing():
    g = torch.Generator().manual_seed(15)
    s = torch.tensor([3e-4])
    q = torch.round(torch.randn(2, 3, 6, 11, generator=g) * 3 / 3e-4)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[0, 7:] = True
    mask[1] = True  # a fully masked row: all zeros, no gradient
    km = mask[:, None, None, :]
    w = torch.randn(2, 3, 6, 11, generator=g)
    qa, qb = q.clone().requires_grad_(), q.double().requires_grad_()
    p, _ = int_softmax(qa, s, mask)
    (p * w).sum().backward()
    s64 = s.double()
    x0 = torch.floor(-math.log(2.0) / s64)
    co = nonlinear_coeffs("paper")
    b, c = torch.floor((co.exp_b / co.exp_a) / s64), torch.floor((co.exp_c / co.exp_a) / (s64 * s64))
    t = max(0, int(c.item()).bit_length() - 16)
    rowmax = qb.detach().masked_fill(km, float("-inf")).amax(-1, keepdim=True).nan_to_num(neginf=0.0)
    d = torch.maximum(qb - rowmax, 30 * x0).masked_fill(km, 0.0)
    z = floor_ste(d / x0)
    r = d - x0 * z
    e = floor_ste((r * (r + b) + c) * torch.exp2(-(z + t))).masked_fill(km, 0.0)
    ref = floor_ste(e * floor_ste(2.0**40 / e.sum(-1, keepdim=True).clamp(min=1)) * 255 / 2.0**40 + 0.5)
    assert torch.equal(p.double(), ref.detach())
    assert float(p.detach()[1].abs().sum()) == 0.0 and float(p.detach()[0, ..., 7:].abs().sum()) == 0.0
    (ref * w.double()).sum().backward()
    assert float(qa.grad[1].abs().sum()) == 0.0 and float(qa.grad[0, ..., 7:].abs().sum()) == 0.0
    torch.testing.assert_close(qa.grad.double(), qb.grad, rtol=2e-3, atol=1e-5)


def test_exact_int_matmul_backward_equals_float_gemm_gradients_for_permuted_gradients():
    """The gradient reaching an accumulator is often a permuted float64 view (attention heads): the backward's one
    contiguous float32 conversion must give the float32 GEMM's gradients (weight, input, bias)."""
    g = torch.Generator().manual_seed(16)
    x = torch.randint(-127, 128, (5, 3, 40), generator=g).float()
    w = torch.randint(-127, 128, (24, 40), generator=g).float()
    bias = torch.randint(-2**31 + 1, 2**31, (24,), generator=g).double()
    xa, wa, ba = x.clone().requires_grad_(), w.clone().requires_grad_(), bias.clone().requires_grad_()
    acc = exact_int_matmul(xa, wa, bias=ba)
    assert acc.dtype == torch.float64 and torch.equal(acc, (x.double() @ w.double().t()) + bias)
    up = torch.randn(3, 24, 5, generator=g, dtype=torch.float64).permute(2, 0, 1)  # non-contiguous float64
    acc.backward(up)
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.linear(xb, wb).backward(up.float())
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(ba.grad, up.float().sum((0, 1)).double(), rtol=1e-6, atol=1e-5)
    # batched operands (attention scores): permuted inputs and gradients
    qh = torch.randint(-127, 128, (2, 4, 6, 8), generator=g).float().permute(0, 2, 1, 3).requires_grad_()
    kh = torch.randint(-127, 128, (2, 4, 6, 8), generator=g).float().permute(0, 2, 1, 3).requires_grad_()
    up = torch.randn(2, 6, 4, 4, generator=g).transpose(-1, -2)
    exact_int_matmul(qh, kh).backward(up)
    qr, kr = qh.detach().clone().requires_grad_(), kh.detach().clone().requires_grad_()
    torch.matmul(qr, kr.transpose(-1, -2)).backward(up)
    torch.testing.assert_close(qh.grad, qr.grad, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(kh.grad, kr.grad, rtol=1e-6, atol=1e-4)


def test_gelu_backward_matches_the_composite_including_zero_inputs():
    """d q_out / d q at q = 0 is ``one`` (sgn(0) = 0), as autograd through the composite gives."""
    s = torch.tensor([3e-5, 2e-4, 7e-3])
    g = torch.Generator().manual_seed(17)
    q = torch.round(torch.randn(50, 3, generator=g, dtype=torch.float64) * 3 / s.double())
    q[:4] = 0.0
    w = torch.randn(50, 3, generator=g, dtype=torch.float64)
    qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
    out, _ = int_gelu(qa, s)
    (out * w).sum().backward()
    gc = gelu_constants(s)
    t = torch.minimum(floor_ste(qb.abs() * torch.exp2(gc.shift)), -gc.b_int) + gc.b_int
    y = floor_ste((8192.0 - gc.c_int - t * t) / 16384.0)
    ref = qb * (gc.one - torch.sign(qb) * y)
    assert torch.equal(out.detach(), ref.detach())
    (ref * w).sum().backward()
    torch.testing.assert_close(qa.grad, qb.grad, rtol=1e-6, atol=1e-9 * qb.grad.abs().max().item())
    assert torch.equal(qa.grad[:4], w[:4] * gc.one)
