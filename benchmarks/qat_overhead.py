"""QAT overhead: training-step time of a symmetric (I-BERT integer) encoder vs the same encoder in float.

fairseq's model is wired elsewhere; this benchmark builds a stand-alone post-LN encoder layer stack from the
``ibert_plugin.quant`` modules with the dataflow of ``docs/integer_spec.md`` ("Encoder wiring"), in
``quant_mode="none"`` (plain float, numerically ``nn.Linear``/``nn.LayerNorm``/``F.gelu``/``F.softmax``) and in
``quant_mode="symmetric"``, and times full training steps (forward, backward, Adam) interleaved in one process.

Prints a table, then ONE JSON object as the last line (``ratio`` = symmetric / float median step time).
Usage: ``OMP_NUM_THREADS=1 python benchmarks/qat_overhead.py [--layers 2 --batch 8 --seq 128 --steps 5]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Optional, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ibert_plugin.quant import (  # noqa: E402
    IntGELU,
    IntLayerNorm,
    IntSoftmax,
    QuantAct,
    QuantConfig,
    QuantLinear,
)
from ibert_plugin.quant.primitives import dequantize, exact_int_matmul  # noqa: E402


def _matmul(a, sa, b_t, sb, a_bits, b_bits) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``a @ b_t^T``: exact integer GEMM with scale ``sa*sb`` for carriers, plain matmul for real tensors."""
    if sa is None or sb is None:
        return torch.matmul(dequantize(a, sa), dequantize(b_t, sb).transpose(-1, -2)), None
    return exact_int_matmul(a, b_t, a_bits, b_bits), sa * sb


class EncoderLayer(nn.Module):
    """Post-LN transformer encoder layer (RoBERTa), integer dataflow of the spec in symmetric mode.

    Input/output ``(x, scale)`` of shape ``(B, T, C)``; ``mask`` ``(B, T)`` True on padding.
    """

    def __init__(self, cfg: QuantConfig, dim: int, heads: int, ffn: int, dropout: float = 0.0):
        super().__init__()
        self.cfg, self.heads, self.head_dim, self.dropout = cfg, heads, dim // heads, dropout
        self.scaling = self.head_dim**-0.5
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (QuantLinear(dim, dim, cfg=cfg) for _ in range(4))
        self.fc1, self.fc2 = QuantLinear(dim, ffn, cfg=cfg), QuantLinear(ffn, dim, cfg=cfg)
        self.self_attn_layer_norm, self.final_layer_norm = IntLayerNorm(dim, cfg=cfg), IntLayerNorm(dim, cfg=cfg)
        self.softmax, self.gelu = IntSoftmax(cfg), IntGELU(cfg)
        a, r = cfg.act_bits, cfg.residual_bits
        self.input_act, self.q_act, self.k_act, self.v_act, self.attn_act = (QuantAct(a, cfg) for _ in range(5))
        self.fc1_act, self.fc2_act = QuantAct(a, cfg), QuantAct(a, cfg)
        self.attn_residual_act, self.ffn_residual_act = QuantAct(r, cfg), QuantAct(r, cfg)

    def _heads(self, x):
        b, t, _ = x.shape
        return x.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)

    def _drop(self, x):
        return nn.functional.dropout(x, self.dropout, self.training) if self.dropout > 0 else x

    def forward(self, x, scale, mask=None):
        b, t, c = x.shape
        a = self.cfg.act_bits
        x, scale = self.input_act(x, scale)
        res, res_s = x, scale
        q, sq = self.q_act(*self.q_proj(x, scale))
        k, sk = self.k_act(*self.k_proj(x, scale))
        v, sv = self.v_act(*self.v_proj(x, scale))
        scores, ss = _matmul(self._heads(q), sq, self._heads(k), sk, a, a)
        if ss is None:
            scores = scores * self.scaling
        else:
            ss = ss * self.scaling
        p, sp = self.softmax(scores, ss, mask)
        p = self._drop(p)
        vt = self._heads(v).transpose(-1, -2)
        ctx, sc = _matmul(p, sp, vt, sv, self.cfg.softmax_out_bits + 1, a)
        ctx = ctx.transpose(1, 2).reshape(b, t, c)
        x, scale = self.out_proj(*self.attn_act(ctx, sc))
        x, scale = self.attn_residual_act(self._drop(x), scale, identity=res, identity_scale=res_s)
        x, scale = self.self_attn_layer_norm(x, scale)
        x, scale = self.fc1_act(x, scale)
        res, res_s = x, scale
        x, scale = self.gelu(*self.fc1(x, scale))
        x, scale = self.fc2(*self.fc2_act(x, scale))
        x, scale = self.ffn_residual_act(self._drop(x), scale, identity=res, identity_scale=res_s)
        return self.final_layer_norm(x, scale)


class EncoderStack(nn.Module):
    """``layers`` encoder layers on a real input, real output ``q * S`` (the float head's input)."""

    def __init__(self, cfg: QuantConfig, layers: int, dim: int, heads: int, ffn: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg, dim, heads, ffn, dropout) for _ in range(layers))

    def forward(self, x, mask=None):
        scale = None
        for layer in self.layers:
            x, scale = layer(x, scale, mask)
        return dequantize(x, scale)
