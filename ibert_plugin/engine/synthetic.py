"""Random RoBERTa-shaped models in float-level ``QState`` form (tests and benchmarks without a trained checkpoint).

Weights ~ N(0, 0.02) (BERT init, slightly perturbed LayerNorms and biases); integer weights by per-channel symmetric
quantization (8 or 7 bits) or TWN ternarization; activation ranges calibrated with a float forward of the
fake-quantized network on random tokens.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .convert import Linear, LNState, LayerState, QState

f32 = torch.float32


def quantize_weight(w: torch.Tensor, mode: str):
    """mode: "8bit" / "7bit" (per-channel symmetric) or "ternary" (TWN, one alpha per matrix)."""
    if mode in ("8bit", "7bit"):
        n = 127 if mode == "8bit" else 63
        s = (w.abs().amax(dim=1).clamp(min=1e-8) / n).to(f32)
        q = torch.clamp(torch.round(w / s[:, None]), -n, n)
        return q.to(torch.int64), s
    if mode == "ternary":
        delta = 0.7 * w.abs().mean()
        mask = w.abs() > delta
        alpha = (w.abs() * mask).sum() / mask.sum().clamp(min=1)
        q = torch.sign(w) * mask
        return q.to(torch.int64), alpha.to(f32).expand(w.shape[0]).contiguous()
    raise ValueError(mode)


def _lin(g, n_out, n_in, mode) -> Linear:
    w = torch.randn(n_out, n_in, generator=g) * 0.02
    w_int, s_w = quantize_weight(w, mode)
    b = torch.randn(n_out, generator=g) * 0.02
    return Linear(w_int, s_w, b.to(f32))


def _ln(g, C) -> LNState:
    return LNState(1.0 + 0.1 * torch.randn(C, generator=g), 0.05 * torch.randn(C, generator=g), 0)


def random_qstate(layers=2, dim=64, ffn=128, heads=4, vocab=100, max_pos=64, mode="7bit", seed=0,
                  padding_idx=1, num_classes=2, calib_tokens: Optional[torch.Tensor] = None) -> QState:
    g = torch.Generator().manual_seed(seed)
    tok = torch.randn(vocab, dim, generator=g) * 0.1
    tok[padding_idx] = 0
    pos = torch.randn(max_pos + padding_idx + 1, dim, generator=g) * 0.1
    pos[padding_idx] = 0
    Ls = []
    for _ in range(layers):
        Ls.append(LayerState(q=_lin(g, dim, dim, mode), k=_lin(g, dim, dim, mode), v=_lin(g, dim, dim, mode),
                             o=_lin(g, dim, dim, mode), fc1=_lin(g, ffn, dim, mode), fc2=_lin(g, dim, ffn, mode),
                             ranges={}, attn_ln=_ln(g, dim), ffn_ln=_ln(g, dim), heads=heads))
    head = {"dense.weight": torch.randn(dim, dim, generator=g) * 0.02, "dense.bias": torch.zeros(dim),
            "out_proj.weight": torch.randn(num_classes, dim, generator=g) * 0.02,
            "out_proj.bias": torch.zeros(num_classes)}
    st = QState(tok_w=tok, pos_w=pos, padding_idx=padding_idx, embed_range=(torch.zeros(1), torch.zeros(1)),
                emb_ln=_ln(g, dim), layers=Ls, head=head, weight_bits={"8bit": 8, "7bit": 7, "ternary": 2}[mode],
                ternary=mode == "ternary")
    if calib_tokens is None:
        calib_tokens = random_tokens(4, min(32, max_pos), vocab, padding_idx, seed=seed + 1)
    calibrate(st, calib_tokens)
    return st


def random_tokens(batch, T, vocab, padding_idx=1, seed=0, pad=True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(padding_idx + 3, vocab, (batch, T), generator=g)
    t[:, 0] = 0  # <s>
    if pad:
        for b in range(1, batch, 2):
            n = int(torch.randint(T // 2, T, (1,), generator=g))
            t[b, n:] = padding_idx
    return t


def _rng(x: torch.Tensor):
    return (x.min().reshape(1).to(f32), x.max().reshape(1).to(f32))


@torch.no_grad()
def float_forward(st: QState, tokens: torch.Tensor, record: Optional[Dict] = None) -> torch.Tensor:
    """Float forward of the fake-quantized network (GELU/softmax/LN in float); records the QuantAct input ranges."""
    from .engine import make_positions

    pad = tokens.eq(st.padding_idx)
    pos = make_positions(tokens, st.padding_idx)
    x = st.tok_w[tokens] + st.pos_w[pos]
    if record is not None:
        record["embed"] = _rng(x)
    D = x.shape[-1]
    x = F.layer_norm(x, (D,), st.emb_ln.gamma, st.emb_ln.beta) * (~pad).unsqueeze(-1)
    B, T, _ = x.shape
    mask = pad[:, None, None, :]
    for i, L in enumerate(st.layers):
        rec = {}
        W = lambda lin: lin.w_int.to(f32) * lin.s_w[:, None]  # noqa: E731
        rec["input_act"] = _rng(x)
        q = F.linear(x, W(L.q), L.q.bias)
        k = F.linear(x, W(L.k), L.k.bias)
        v = F.linear(x, W(L.v), L.v.bias)
        rec["q_act"], rec["k_act"], rec["v_act"] = _rng(q), _rng(k), _rng(v)
        H = L.heads
        dh = D // H
        hq, hk, hv = (t.view(B, T, H, dh).transpose(1, 2) for t in (q, k, v))
        s = (hq @ hk.transpose(-1, -2)) * dh ** -0.5
        p = torch.softmax(s.masked_fill(mask, -math.inf), -1)
        ctx = (p @ hv).transpose(1, 2).reshape(B, T, D)
        rec["attn_act"] = _rng(ctx)
        a = F.linear(ctx, W(L.o), L.o.bias) + x
        rec["attn_residual_act"] = _rng(a)
        x = F.layer_norm(a, (D,), L.attn_ln.gamma, L.attn_ln.beta)
        rec["fc1_act"] = _rng(x)
        hmid = F.gelu(F.linear(x, W(L.fc1), L.fc1.bias))
        rec["fc2_act"] = _rng(hmid)
        a = F.linear(hmid, W(L.fc2), L.fc2.bias) + x
        rec["ffn_residual_act"] = _rng(a)
        x = F.layer_norm(a, (D,), L.ffn_ln.gamma, L.ffn_ln.beta)
        if record is not None:
            record[i] = rec
    return x


def calibrate(st: QState, tokens: torch.Tensor) -> None:
    rec: Dict = {}
    float_forward(st, tokens, rec)
    st.embed_range = rec["embed"]
    for i, L in enumerate(st.layers):
        L.ranges = dict(rec[i])
