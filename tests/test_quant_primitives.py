"""Primitives: symmetric quantization + STE, dyadic/requant exactness, integer sqrt, exact integer GEMM."""
import math
import random
from decimal import ROUND_HALF_UP, Decimal

import pytest
import torch
import torch.nn.functional as F

from ibert_plugin.quant.primitives import (
    DYADIC_BITS,
    clamp_ste,
    dyadic,
    exact_int_matmul,
    floor_ste,
    isqrt,
    isqrt_ste,
    qmax,
    quantize,
    requant,
    requant_clamp,
    round_ste,
    symmetric_scale,
)


def test_symmetric_scale_and_quantize_clamp_to_symmetric_range():
    s = symmetric_scale(torch.tensor([-3.0]), torch.tensor([2.0]), 8)
    assert s.dtype == torch.float32 and torch.equal(s, torch.tensor([3.0]) / 127)
    assert torch.equal(symmetric_scale(torch.zeros(1), torch.zeros(1), 8), torch.tensor([1e-8]) / 127)
    x = torch.tensor([-10.0, -3.0, -0.0118, 0.0, 0.0119, 3.0, 10.0])
    q = quantize(x, s, 8)
    assert q.tolist() == [-127, -127, 0, 0, 1, 127, 127]  # [-n, n]: +127 reachable (upstream stops at 126)
    # round half to even on exact ties
    assert quantize(torch.tensor([0.5, 1.5, -0.5, 2.5]), torch.ones(1), 8).tolist() == [0, 2, 0, 2]


def test_quantize_ste_gradient_is_one_over_scale_and_none_to_scale():
    x = torch.randn(5, requires_grad=True)
    s = torch.tensor([0.25], requires_grad=True)
    q = quantize(x * 10, s, 4)  # saturates: gradient still passes straight through
    q.sum().backward()
    assert torch.allclose(x.grad, torch.full((5,), 10 / 0.25))
    assert s.grad is None


def test_ste_helpers():
    x = torch.tensor([-1.5, -0.5, 0.25, 2.75], requires_grad=True)
    assert floor_ste(x).tolist() == [-2, -1, 0, 2]
    assert round_ste(x).tolist() == [-2, -0, 0, 3]
    assert clamp_ste(x, -1, 1).tolist() == [-1, -0.5, 0.25, 1]
    (floor_ste(x) + round_ste(x) + clamp_ste(x, -1, 1)).sum().backward()
    assert torch.equal(x.grad, torch.full((4,), 3.0))


def _ref_dyadic(r: float):
    mant, ex = math.frexp(r)
    m = int(Decimal(repr(abs(mant) * 2**DYADIC_BITS)).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    m = m if mant >= 0 else -m
    e = DYADIC_BITS - ex
    if e < 1:
        m, e = m * 2 ** (1 - e), 1
    return m, e


def test_dyadic_matches_decimal_round_half_up_and_is_close():
    rng = random.Random(0)
    ratios = [rng.uniform(-1, 1) * 10 ** rng.uniform(-12, 5) for _ in range(3000)]
    ratios += [1.0, 0.5, -0.75, 2.0**-30, 3.0, 2.0**19, 2.0**25 + 3, (2**20 - 0.5) / 2**20, 0.0]
    # exact ties of |mant| * 2^20 + 0.5 (round half up, away from zero)
    ratios += [(2**19 + k + 0.5) / 2**20 for k in range(5)] + [-(2**19 + 0.5) / 2**20]
    m, e = dyadic(torch.tensor(ratios, dtype=torch.float64))
    assert m.dtype == e.dtype == torch.float64 and bool((e >= 1).all())
    for r, mi, ei in zip(ratios, m.tolist(), e.tolist()):
        assert (mi, ei) == _ref_dyadic(r), r
        if r != 0 and abs(r) < 2**19:
            assert 2**19 <= abs(mi) <= 2**20
            assert abs(mi / 2**ei - r) <= abs(r) * 2.0**-20


def _ref_requant(z: int, m: int, e: int) -> int:
    return (z * m + (1 << (e - 1))) >> e


@pytest.mark.parametrize("dtype, zmax", [(torch.float32, 2**24), (torch.float64, 2**42)])
def test_requant_is_exact_against_python_integers(dtype, zmax):
    g = torch.Generator().manual_seed(1)
    c = 7
    z = torch.randint(-zmax, zmax, (200, c), generator=g, dtype=torch.int64)
    z[0] = zmax - 1
    z[1] = -zmax + 1
    z = z.to(dtype)
    ratios = torch.tensor([1e-3, -2.5e-5, 0.77, 3.3, -1e-12, 2.0**-45, 1e-17], dtype=torch.float64)
    m, e = dyadic(ratios)
    out = requant(z, m, e)
    assert out.dtype == torch.float64
    zi = z.to(torch.int64).tolist()
    mi, ei = [int(v) for v in m.tolist()], [int(v) for v in e.tolist()]
    expect = [[_ref_requant(row[j], mi[j], ei[j]) for j in range(c)] for row in zi]
    assert out.to(torch.int64).tolist() == expect


@pytest.mark.parametrize("bits", [8, 16, 22])
def test_requant_clamp_saturates_exactly_for_any_input_below_2_51(bits):
    """No int64 overflow however fine the input scale: |z| up to 2^51 and shifts up to 90 (products to 2^71)."""
    g = torch.Generator().manual_seed(3)
    z = torch.randint(-2**50, 2**50, (300,), generator=g, dtype=torch.int64) >> torch.randint(0, 50, (300,),
                                                                                                generator=g)
    z[:4] = torch.tensor([2**51 - 1, -(2**51 - 1), 0, 1])
    ratios = torch.tensor([3e-16, 1e-12, 7e-9, 2e-5, 0.4, 1e-20, 1e-27], dtype=torch.float64)
    m, e = dyadic(ratios)
    assert int(e.max()) > 62
    n = 2 ** (bits - 1) - 1
    out = requant_clamp(z.to(torch.float64)[:, None], m, e, bits)
    mi, ei = [int(v) for v in m.tolist()], [int(v) for v in e.tolist()]
    expect = [[max(-n, min(n, _ref_requant(zz, mi[j], ei[j]))) for j in range(len(mi))] for zz in z.tolist()]
    assert out.to(torch.int64).tolist() == expect


@pytest.mark.parametrize("acc_scale", [1e-5, 5e-6, 1e-6, 1e-7])
def test_gelu_outputs_requantize_correctly_at_fine_accumulator_scales(acc_scale):
    """Issue 9: at an FC1 accumulator scale of 5e-6, GELU(3) and GELU(6) requantized to -1 instead of 63 / 127
    (int64 overflow of z * m); they must saturate or land on the nearest 8-bit level, as the engine does."""
    from ibert_plugin.quant.nonlinear import int_gelu

    s = torch.tensor([acc_scale])
    x = torch.tensor([3.0, 6.0, -3.0, -6.0, 40.0, 0.7], dtype=torch.float64)
    g, s_g = int_gelu(torch.round(x / s.double()), s)
    s_out = torch.tensor([6.0 / 127])
    m, e = dyadic(s_g.double() / s_out.double())
    out = requant_clamp(g, m, e, 8)
    want = (torch.nn.functional.gelu(x) / float(s_out)).clamp(-127, 127)
    assert (out.double() - want).abs().max() <= 1, (out, want)  # i-GELU error 0.018 < one 8-bit step 0.047
    assert out[1] == 127 and out[4] == 127


def test_requant_half_up_ties_and_backward():
    m, e = torch.tensor([1.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)  # ratio 1/2
    z = torch.tensor([-3.0, -1.0, 1.0, 3.0], requires_grad=True)
    out = requant(z, m, e)
    assert out.tolist() == [-1, 0, 1, 2]  # floor(z/2 + 1/2)
    out.sum().backward()
    assert torch.equal(z.grad, torch.full((4,), 0.5))


def test_requant_clamp_with_identity_and_gradients():
    g = torch.Generator().manual_seed(2)
    z = torch.randint(-2**30, 2**30, (50, 4), generator=g).to(torch.float64).requires_grad_()
    zid = torch.randint(-127, 128, (50, 4), generator=g).to(torch.float32).requires_grad_()
    m, e = dyadic(torch.tensor([2e-7, 1e-6, -3e-7, 5e-8], dtype=torch.float64))
    m2, e2 = dyadic(torch.tensor([0.9], dtype=torch.float64))
    out = requant_clamp(z, m, e, 8, zid, m2, e2)
    assert out.dtype == torch.float32
    ref = (requant(z.detach(), m, e) + requant(zid.detach(), m2, e2)).clamp(-127, 127)
    assert torch.equal(out.double(), ref)
    out.sum().backward()
    assert torch.allclose(z.grad, (m * torch.exp2(-e)).expand(50, 4))
    assert torch.allclose(zid.grad, torch.full((50, 4), float(m2 * torch.exp2(-e2))))
    # training-time dropout fractions of float32 carriers are rounded by the dyadic rounding itself
    frac = requant_clamp(torch.tensor([2.6, -2.4]), *dyadic(torch.tensor([1.0], dtype=torch.float64)), 8)
    assert frac.tolist() == [3, -2]


def test_isqrt_equals_math_isqrt():
    rng = random.Random(3)
    vals = [0, 1, 2, 3, 4, 5, 8, 9, 10, 15, 16, 17, 2**52, 2**52 - 1, 2**52 + 1, 2**53 - 1, 2**32, 2**32 - 1]
    vals += [rng.randrange(2**53) for _ in range(3000)] + [rng.randrange(2**20) for _ in range(1000)]
    for k in [rng.randrange(1, 2**26) for _ in range(1000)] + [2**26 - 1, 94906265, 3]:
        vals += [k * k - 1, k * k, k * k + 1]
    vals = [v for v in vals if 0 <= v < 2**53]
    got = isqrt(torch.tensor(vals, dtype=torch.float64))
    assert got.dtype == torch.float64
    assert [int(v) for v in got.tolist()] == [math.isqrt(v) for v in vals]
    # int64 input up to 2^62
    big = [2**62 - 1, 2**61 + 12345, (2**31 - 1) ** 2, (2**31 - 1) ** 2 - 1]
    big += [rng.randrange(2**62) for _ in range(500)]
    assert isqrt(torch.tensor(big, dtype=torch.int64)).tolist() == [math.isqrt(v) for v in big]


def test_isqrt_ste_gradient_is_sqrt_derivative():
    n = torch.tensor([100.0, 10000.0], dtype=torch.float64, requires_grad=True)
    isqrt_ste(n).sum().backward()
    assert torch.allclose(n.grad, torch.tensor([0.05, 0.005], dtype=torch.float64))


def test_exact_int_matmul_exact_beyond_float32_with_chunks():
    g = torch.Generator().manual_seed(4)
    a = torch.randint(-127, 128, (16, 3072), generator=g).float()
    w = torch.randint(-127, 128, (24, 3072), generator=g).float()
    a[0] = 127.0
    w[0] = 127.0  # 3072 * 16129 = 49.5M > 2^24: one float32 GEMM would round
    out = exact_int_matmul(a, w)
    assert out.dtype == torch.float64
    ref = a.to(torch.int64) @ w.to(torch.int64).t()
    assert torch.equal(out.to(torch.int64), ref)
    small = exact_int_matmul(a[:, :768], w[:, :768])
    assert small.dtype == torch.float32
    assert torch.equal(small.to(torch.int64), a[:, :768].to(torch.int64) @ w[:, :768].to(torch.int64).t())


def test_exact_int_matmul_batched_and_gradients_match_linear():
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-127, 128, (2, 2, 3, 2100), generator=g).float().requires_grad_()
    b = torch.randint(-127, 128, (2, 2, 4, 2100), generator=g).float().requires_grad_()
    out = exact_int_matmul(a, b)
    ref = torch.matmul(a.detach().double(), b.detach().double().transpose(-1, -2))
    assert torch.equal(out, ref)
    w = torch.randn(out.shape, dtype=torch.float64)
    (out * w).sum().backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    (torch.matmul(a2, b2.transpose(-1, -2)) * w.float()).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-5, atol=1e-3)
    x = torch.randint(-127, 128, (6, 1500), generator=g).float().requires_grad_()
    wt = torch.randint(-127, 128, (7, 1500), generator=g).float().requires_grad_()
    go = torch.randn(6, 7)
    (exact_int_matmul(x, wt) * go).sum().backward()
    x2, wt2 = x.detach().clone().requires_grad_(), wt.detach().clone().requires_grad_()
    (F.linear(x2, wt2) * go).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(wt.grad, wt2.grad, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="batch dims"):
        exact_int_matmul(torch.zeros(2, 3, 4), torch.zeros(5, 6, 4))


def test_qmax():
    assert [qmax(b) for b in (2, 4, 8, 16, 22, 32)] == [1, 7, 127, 32767, 2**21 - 1, 2**31 - 1]


def test_true_div_is_correctly_rounded_where_scalar_division_is_not():
    from ibert_plugin.quant.primitives import true_div

    g = torch.Generator().manual_seed(6)
    s = torch.rand(20000, generator=g, dtype=torch.float64) * 1e-3 + 1e-6
    got = true_div(-1.775, s)
    assert got.tolist() == [-1.775 / v for v in s.tolist()]  # Python float division is IEEE
    assert (-1.775 / s != got).any()  # torch's scalar / tensor is reciprocal * scalar (1 ulp off)
    assert true_div(s, 1.4142).tolist() == [v / 1.4142 for v in s.tolist()]
    m = torch.rand(1000, generator=g) * 10
    assert torch.equal(symmetric_scale(-m, m, 8), true_div(m, 127.0))
