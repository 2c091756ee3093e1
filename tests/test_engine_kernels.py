"""Bit-exactness of the fused C++ integer kernels against the pure-PyTorch spec formulas."""
import math

import pytest
import torch

from ibert_plugin.engine import kernels, reference as R

K = kernels.load()
f64 = torch.float64
I64 = torch.int64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _dy(ratio):
    m, e = R.dyadic(torch.as_tensor(ratio, dtype=f64))
    return m, e


def _ref_requant8(z, m, e, qmax=127):
    return torch.clamp(R.requant(z, m, e), -qmax, qmax)


def test_requant_u8_bias_per_channel():
    g = _gen(1)
    M, N = 67, 96
    acc = torch.randint(-2 ** 24, 2 ** 24, (M, N), generator=g, dtype=torch.int32)
    acc[0] = 2 ** 31 - 1 - 2 ** 20  # extremes
    acc[1] = -2 ** 31 + 2 ** 20
    bias = torch.randint(-2 ** 20, 2 ** 20, (N,), generator=g)
    ratio = torch.rand(N, generator=g, dtype=f64) * 1e-4 + 1e-7
    ratio[::5] *= -1  # negative per-channel scales
    m, e = _dy(ratio)
    out = torch.empty(M, N, dtype=torch.uint8)
    K.requant_u8(acc, bias, m.to(I64), e.to(I64), 127, out)
    ref = _ref_requant8(acc.to(f64) + bias.to(f64), m, e) + 128
    assert torch.equal(out.to(f64), ref)


def test_requant_qkv_layout():
    g = _gen(2)
    B, T, H, dh = 2, 5, 3, 4
    D = H * dh
    acc = torch.randint(-2 ** 20, 2 ** 20, (B * T, 3 * D), generator=g, dtype=torch.int32)
    bias = torch.randint(-1000, 1000, (3 * D,), generator=g)
    m, e = _dy(torch.rand(3 * D, generator=g, dtype=f64) * 1e-3 + 1e-5)
    q = torch.empty(B, H, T, dh, dtype=torch.uint8)
    kT = torch.empty(B, H, dh, T, dtype=torch.uint8)
    v = torch.empty(B, H, T, dh, dtype=torch.uint8)
    K.requant_qkv(acc, bias, m.to(I64), e.to(I64), 127, B, T, H, q, kT, v)
    ref = (_ref_requant8(acc.to(f64) + bias.to(f64), m, e) + 128).view(B, T, 3, H, dh)
    assert torch.equal(q.to(f64), ref[:, :, 0].permute(0, 2, 1, 3))
    assert torch.equal(kT.to(f64), ref[:, :, 1].permute(0, 2, 3, 1))
    assert torch.equal(v.to(f64), ref[:, :, 2].permute(0, 2, 1, 3))


@pytest.mark.parametrize("S", [3.1e-4, 2.0e-3, 0.037])
def test_softmax_lut_masked(S):
    g = _gen(3)
    B, H, T = 3, 2, 40
    span = int(12 / S)
    scores = torch.randint(-span, span, (B, H, T, T), generator=g, dtype=torch.int32)
    scores[0, 0, 0] = 7  # constant row
    mask = torch.zeros(B, T, dtype=torch.uint8)
    mask[1, 30:] = 1
    mask[2, 1:] = 1
    lut = R.exp_lut(S)
    # LUT built from the formula == formula
    x0 = R.softmax_consts(S)[0]
    d = -torch.arange(0, 30 * abs(x0) + 50, dtype=f64)
    assert torch.equal(R.int_exp(d, S), lut[torch.clamp(-d, max=lut.numel() - 1).long()].to(f64))
    out = torch.empty(B, H, T, T, dtype=torch.uint8)
    K.softmax_u8(scores, mask, lut, out)
    ref = R.int_softmax(scores, S, mask)
    assert torch.equal(out.to(f64), ref)
    out2 = torch.empty_like(out)
    K.softmax_u8(scores, torch.empty(0, dtype=torch.uint8), lut, out2)
    assert torch.equal(out2.to(f64), R.int_softmax(scores, S, None))


def test_requant_ctx_layout():
    g = _gen(4)
    B, H, T, dh = 2, 3, 7, 5
    ctx = torch.randint(-2 ** 22, 2 ** 22, (B, H, T, dh), generator=g, dtype=torch.int32)
    m, e = _dy(torch.tensor(3.3e-5, dtype=f64))
    out = torch.empty(B, T, H * dh, dtype=torch.uint8)
    K.requant_ctx(ctx, int(m), int(e), 127, out)
    ref = (_ref_requant8(ctx.to(f64), m, e) + 128).permute(0, 2, 1, 3).reshape(B, T, H * dh)
    assert torch.equal(out.to(f64), ref)


def _ln_setup(g, C):
    gamma = torch.randn(C, generator=g, dtype=f64) * 0.3 + 0.8
    gamma[3] = -0.5
    gamma[4] = 0.0
    beta = torch.randn(C, generator=g, dtype=f64) * 0.1
    return gamma, beta


@pytest.mark.parametrize("shift", [0, 3])
def test_resid_ln(shift):
    g = _gen(5)
    M, C = 19, 64
    acc = torch.randint(-2 ** 24, 2 ** 24, (M, C), generator=g, dtype=torch.int32)
    bias = torch.randint(-2 ** 16, 2 ** 16, (C,), generator=g)
    m_a, e_a = _dy(torch.rand(C, generator=g, dtype=f64) * 0.05 + 0.01)
    res_u8 = torch.randint(0, 256, (M, C), generator=g, dtype=torch.uint8)
    res_u8[2] = 128
    m_r, e_r = _dy(torch.tensor(311.7, dtype=f64))
    gamma, beta = _ln_setup(g, C)
    S_in = 1e-3
    qmax22 = R.n_bits(22)
    q22 = torch.clamp(R.requant(acc.to(f64) + bias.to(f64), m_a, e_a) + R.requant(res_u8.to(f64) - 128, m_r, e_r),
                      -qmax22, qmax22)
    q22[5] = 17  # constant row: var 0
    acc[5] = 0
    ln_out, b_int, S_n = R.int_layernorm(q22, shift, gamma, beta)
    g2 = torch.sign(gamma) * torch.clamp(gamma.abs(), min=1e-8)
    g2[g2 == 0] = 1e-8
    S_out = S_n * g2
    nm, ne = _dy(S_out / 0.02)
    ref_u8 = _ref_requant8(ln_out, nm, ne) + 128
    out_u8 = torch.empty(M, C, dtype=torch.uint8)
    out_q = torch.empty(M, C, dtype=I64)
    out_q22 = torch.empty(M, C, dtype=I64)
    # row 5 must give q22 = 17: bias + residual cancel is awkward, so patch the inputs to hit exactly 17
    bias_k = bias.clone()
    res_u8[5] = 128
    acc[5] = 0
    # find acc row 5 s.t. requant(acc+bias) == 17 per channel: use a direct inverse via search-free construction
    z = torch.floor(17 * torch.pow(2.0, e_a) / m_a)
    for _ in range(3):
        z = torch.where(R.requant(z, m_a, e_a) < 17, z + 1, z)
        z = torch.where(R.requant(z, m_a, e_a) > 17, z - 1, z)
    acc[5] = (z - bias.to(f64)).to(torch.int32)
    q22[5] = torch.clamp(R.requant(acc[5].to(f64) + bias.to(f64), m_a, e_a), -qmax22, qmax22)
    ln_out, _, _ = R.int_layernorm(q22, shift, gamma, beta)
    ref_u8 = _ref_requant8(ln_out, nm, ne) + 128
    K.resid_ln(acc, bias_k, m_a.to(I64), e_a.to(I64), res_u8, int(m_r), int(e_r), qmax22, shift, b_int.to(I64),
               nm.to(I64), ne.to(I64), 127, out_u8, out_q, out_q22)
    assert torch.equal(out_q22.to(f64), q22)
    assert torch.equal(out_q.to(f64), ln_out)
    assert torch.equal(out_u8.to(f64), ref_u8)


def test_embed_ln():
    g = _gen(6)
    V, P, C, B, T = 50, 40, 32, 3, 9
    tok_w = torch.randint(-127, 128, (V, C), generator=g, dtype=torch.int8)
    pos_w = torch.randint(-127, 128, (P, C), generator=g, dtype=torch.int8)
    tokens = torch.randint(2, V, (B, T), generator=g)
    tokens[1, 6:] = 1
    pad = tokens.eq(1)
    positions = (torch.cumsum(~pad, 1) * ~pad + 1).long()
    m_t, e_t = _dy(torch.tensor(0.13, dtype=f64))
    m_p, e_p = _dy(torch.tensor(0.021, dtype=f64))
    qmax16 = R.n_bits(16)
    q16 = torch.clamp(R.requant(tok_w[tokens].to(f64), m_t, e_t) + R.requant(pos_w[positions].to(f64), m_p, e_p),
                      -qmax16, qmax16)
    gamma, beta = _ln_setup(g, C)
    ln_out, b_int, S_n = R.int_layernorm(q16, 0, gamma, beta)
    ln_out = ln_out * (~pad).unsqueeze(-1)
    nm, ne = _dy(S_n * gamma.clamp(min=1e-3) / 0.05)
    out_u8 = torch.empty(B * T, C, dtype=torch.uint8)
    out_q = torch.empty(B * T, C, dtype=I64)
    out_q16 = torch.empty(B * T, C, dtype=I64)
    K.embed_ln(tokens.reshape(-1), positions.reshape(-1), pad.reshape(-1).to(torch.uint8), tok_w, pos_w, int(m_t),
               int(e_t), int(m_p), int(e_p), qmax16, 0, b_int.to(I64), nm.to(I64), ne.to(I64), 127, out_u8, out_q,
               out_q16)
    assert torch.equal(out_q16.view(B, T, C).to(f64), q16)
    assert torch.equal(out_q.view(B, T, C).to(f64), ln_out)
    assert torch.equal(out_u8.view(B, T, C).to(f64), _ref_requant8(ln_out, nm, ne) + 128)


@pytest.mark.parametrize("s_scale", [1.0, 0.05])
def test_gelu_u8(s_scale):
    g = _gen(7)
    M, N = 33, 80
    acc = torch.randint(-2 ** 18, 2 ** 18, (M, N), generator=g, dtype=torch.int32)
    acc[0] = 0
    bias = torch.randint(-5000, 5000, (N,), generator=g)
    S = (torch.rand(N, generator=g, dtype=f64) * 4e-5 + 1e-5) * s_scale
    q = acc.to(f64) + bias.to(f64)
    gq, S_g = R.int_gelu(q, S)
    b_int, c_int, one, _ = R.gelu_consts(S)
    nm, ne = _dy(S_g / 0.03)
    out = torch.empty(M, N, dtype=torch.uint8)
    out_g = torch.empty(M, N, dtype=I64)
    K.gelu_u8(acc, bias, b_int.to(I64), c_int.to(I64), one.to(I64), nm.to(I64), ne.to(I64), 127, out, out_g)
    assert torch.equal(out_g.to(f64), gq)
    # exact integer requant of g (int64 / int128 in the kernel); the float64 spec formula agrees while |g*m| < 2^53
    exact = torch.tensor([[(int(gv) * int(mv) + (1 << (int(ev) - 1))) >> int(ev) for gv, mv, ev in zip(row, nm, ne)]
                          for row in out_g.tolist()], dtype=f64)
    assert torch.equal(out.to(f64), torch.clamp(exact, -127, 127) + 128)
    small = (gq.abs() * nm.abs()) < 2.0 ** 53
    assert torch.equal(out.to(f64)[small], (_ref_requant8(gq, nm, ne) + 128)[small])
    # sanity: the integer GELU approximates GELU
    real = gq * S_g
    x = q * S
    assert (real - torch.nn.functional.gelu(x)).abs().max() < 0.05 * max(1.0, float(x.abs().max()))
