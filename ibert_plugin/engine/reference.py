"""Pure-PyTorch reference of the integer formulas in docs/integer_spec.md (float64 carriers, like the QAT code).

Used by the kernel tests as a second, independent implementation of the spec, and as a fallback source of constants
when ``ibert_plugin.quant.primitives`` is not importable. Where the QAT modules exist, they are the ground truth.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ibert_plugin.quant import nonlinear as NL  # the QAT functions are the ground truth

DYADIC_BITS = 20
GELU_K, GELU_A, GELU_B, GELU_C, GELU_SHIFT = NL.GELU_K, NL.GELU_A, NL.GELU_B, NL.GELU_C, NL.GELU_SHIFT
EXP_A, EXP_B, EXP_C = NL.EXP_A, NL.EXP_B, NL.EXP_C

f64 = torch.float64


def n_bits(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def symmetric_scale(x_min: torch.Tensor, x_max: torch.Tensor, bits: int) -> torch.Tensor:
    return (torch.maximum(x_min.abs(), x_max.abs()).clamp(min=1e-8) / n_bits(bits)).to(torch.float32)


def dyadic(ratio: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    r = ratio.to(f64)
    mant, ex = torch.frexp(r)
    m = torch.sign(mant) * torch.floor(mant.abs() * 2.0 ** DYADIC_BITS + 0.5)
    e = (DYADIC_BITS - ex).to(f64)
    return m, e


def requant(z: torch.Tensor, m: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    z = z.to(f64)
    return torch.floor((z * m + torch.pow(2.0, e - 1)) / torch.pow(2.0, e))


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """Exact floor square root of non-negative integer-valued float64 (< 2^53)."""
    ni = n.to(torch.int64)
    r = torch.sqrt(ni.to(f64)).floor().to(torch.int64)
    for _ in range(2):
        r = torch.where(r * r > ni, r - 1, r)
        r = torch.where((r + 1) * (r + 1) <= ni, r + 1, r)
    return r.clamp(min=0).to(f64)


# ---------------------------------------------------------------------------------------------------------- GELU
def gelu_consts(S: torch.Tensor):
    """Same expressions, order and dtypes as ``quant.nonlinear.int_gelu``."""
    s64 = S.detach().to(torch.float32).to(f64)
    sp = s64 / GELU_K
    sp2 = sp * sp
    b_int = torch.floor(GELU_B / sp)
    c_int = torch.floor((GELU_C / GELU_A) / sp2)
    s_erf = GELU_A * sp2 * float(2 ** GELU_SHIFT)
    one = torch.floor(1.0 / s_erf)
    s_out = (s64 * s_erf / 2.0).to(torch.float32)
    return b_int, c_int, one, s_out


def int_gelu(q: torch.Tensor, S: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return NL.int_gelu(q, S.to(torch.float32))


def int_exp(d: torch.Tensor, S: float) -> torch.Tensor:
    return NL.int_exp(d.to(f64), torch.tensor([S], dtype=torch.float32))[0]


def exp_lut(S: float) -> torch.Tensor:
    """lut[i] = i-exp(-i) for i in [0, 30 |x0|] (the QAT function evaluated on every possible input)."""
    x0 = math.floor(-math.log(2) / float(torch.tensor(S, dtype=torch.float32).double()))
    size = 30 * max(1, abs(x0)) + 1
    return int_exp(-torch.arange(size, dtype=f64), S).to(torch.int32)


def softmax_consts(S: float):
    x0 = min(-1, math.floor(-math.log(2) / float(torch.tensor(S, dtype=torch.float32).double())))
    return (x0,)


def int_softmax(s: torch.Tensor, S: float, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    return NL.int_softmax(s.to(f64), torch.tensor([S], dtype=torch.float32), key_padding_mask)[0].to(f64)


# ----------------------------------------------------------------------------------------------------- LayerNorm
def int_layernorm(q: torch.Tensor, shift: int, gamma: torch.Tensor, beta: torch.Tensor, S_in=None):
    """Returns (q_out, b_int, S_n) for a per-tensor input q [..., C]."""
    q = q.to(f64)
    C = q.shape[-1]
    mean = torch.floor((2 * q.sum(-1, keepdim=True) + C) / (2 * C))
    y = q - mean
    ys = torch.floor(y / 2.0 ** shift)
    var = (ys * ys).sum(-1, keepdim=True)
    sd = torch.clamp(isqrt(var), min=1) * 2.0 ** shift
    f = torch.floor(2.0 ** 45 / sd)
    yn = torch.floor(y * f / 2.0 ** 15)
    S_n = math.sqrt(C) / 2.0 ** 30
    g = gamma.to(f64)
    g = torch.sign(g) * torch.clamp(g.abs(), min=1e-8)
    g = torch.where(g == 0, torch.full_like(g, 1e-8), g)
    b_int = torch.floor(beta.to(f64) / g / S_n).clamp(-n_bits(32), n_bits(32))
    return yn + b_int, b_int, S_n


def int_ln_core(q: torch.Tensor, shift: int, b_int: torch.Tensor) -> torch.Tensor:
    q = q.to(f64)
    C = q.shape[-1]
    mean = torch.floor((2 * q.sum(-1, keepdim=True) + C) / (2 * C))
    y = q - mean
    ys = torch.floor(y / 2.0 ** shift)
    var = (ys * ys).sum(-1, keepdim=True)
    sd = torch.clamp(isqrt(var), min=1) * 2.0 ** shift
    f = torch.floor(2.0 ** 45 / sd)
    return torch.floor(y * f / 2.0 ** 15) + b_int.to(f64)


def _exact_requant(z: torch.Tensor, m: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """requant with exact integer arithmetic (python ints) where |z*m| >= 2^53 (GELU outputs)."""
    out = requant(z, m.to(f64), e.to(f64))
    big = (z.abs() * m.to(f64).abs()) >= 2.0 ** 52
    if bool(big.any()):
        zz, mm, ee = torch.broadcast_tensors(z, m.to(f64), e.to(f64))
        idx = big.nonzero(as_tuple=False)
        for ix in idx.tolist():
            ix = tuple(ix)
            zi, mi, ei = int(zz[ix]), int(mm[ix]), int(ee[ix])
            out[ix] = float((zi * mi + (1 << (ei - 1))) >> ei)
    return out


@torch.no_grad()
def forward_int(im, tokens: torch.Tensor):
    """Float64 spec forward over an ``IntModel``'s constants; returns the same activation dict as
    ``IntegerEngine.encode(collect=True)``."""
    from .engine import make_positions

    acts = {}
    B, T = tokens.shape
    pad = tokens.eq(im.padding_idx)
    pos = make_positions(tokens, im.padding_idx)
    n8, n22, n16 = n_bits(im.act_bits), n_bits(im.residual_bits), n_bits(im.embed_act_bits)
    q16 = torch.clamp(requant(im.tok_w[tokens].to(f64), torch.tensor(float(im.emb_tok_m)), torch.tensor(float(im.emb_tok_e)))
                      + requant(im.pos_w[pos].to(f64), torch.tensor(float(im.emb_pos_m)), torch.tensor(float(im.emb_pos_e))),
                      -n16, n16)
    acts["embed_act"] = q16
    y = int_ln_core(q16, im.emb_ln.shift, im.emb_ln.b_int) * (~pad).unsqueeze(-1)
    acts["layernorm_embedding"] = y
    D = y.shape[-1]
    for i, L in enumerate(im.layers):
        pre = f"layers.{i}."
        H = L.heads
        dh = D // H
        x8 = torch.clamp(requant(y, L.in_m.to(f64), L.in_e.to(f64)), -n8, n8)
        acts[pre + "input_act"] = x8
        acc = x8 @ L.qkv.w_int.to(f64).t() + L.qkv.b_int.to(f64)
        qkv = torch.clamp(requant(acc, L.qkv_m.to(f64), L.qkv_e.to(f64)), -n8, n8)
        q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
        acts[pre + "self_attn.q_act"], acts[pre + "self_attn.k_act"], acts[pre + "self_attn.v_act"] = q, k, v
        hq = q.view(B, T, H, dh).permute(0, 2, 1, 3)
        hk = k.view(B, T, H, dh).permute(0, 2, 1, 3)
        hv = v.view(B, T, H, dh).permute(0, 2, 1, 3)
        s = hq @ hk.transpose(-1, -2)
        p = int_softmax(s, float(L.s_scores), pad)
        acts[pre + "self_attn.softmax"] = p
        ctx = (p @ hv).permute(0, 2, 1, 3).reshape(B, T, D)
        c8 = torch.clamp(requant(ctx, torch.tensor(float(L.ctx_m)), torch.tensor(float(L.ctx_e))), -n8, n8)
        acts[pre + "self_attn.attn_act"] = c8
        acc = c8 @ L.o.w_int.to(f64).t() + L.o.b_int.to(f64)
        r = torch.clamp(requant(acc, L.ar_m.to(f64), L.ar_e.to(f64))
                        + requant(x8, torch.tensor(float(L.ar_id_m)), torch.tensor(float(L.ar_id_e))), -n22, n22)
        acts[pre + "attn_residual_act"] = r
        y = int_ln_core(r, L.attn_ln.shift, L.attn_ln.b_int)
        acts[pre + "self_attn_layer_norm"] = y
        h8 = torch.clamp(requant(y, L.h_m.to(f64), L.h_e.to(f64)), -n8, n8)
        acts[pre + "fc1_act"] = h8
        acc = h8 @ L.fc1.w_int.to(f64).t() + L.fc1.b_int.to(f64)
        qq = acc
        t = torch.minimum(qq.abs(), -L.gelu_b.to(f64)) + L.gelu_b.to(f64)
        Y = torch.floor((2.0 ** (GELU_SHIFT - 1) - L.gelu_c.to(f64) - t * t) / 2.0 ** GELU_SHIFT).clamp(min=0)
        gq = qq * (L.gelu_one.to(f64) - torch.sign(qq) * Y)
        acts[pre + "gelu"] = gq
        g8 = torch.clamp(_exact_requant(gq, L.g_m, L.g_e), -n8, n8)
        acts[pre + "fc2_act"] = g8
        acc = g8 @ L.fc2.w_int.to(f64).t() + L.fc2.b_int.to(f64)
        r = torch.clamp(requant(acc, L.fr_m.to(f64), L.fr_e.to(f64))
                        + requant(h8, torch.tensor(float(L.fr_id_m)), torch.tensor(float(L.fr_id_e))), -n22, n22)
        acts[pre + "ffn_residual_act"] = r
        y = int_ln_core(r, L.ffn_ln.shift, L.ffn_ln.b_int)
        acts[pre + "final_layer_norm"] = y
    return y, acts
