"""The engine's compiled integer model: plain dataclasses of int8/int64 tensors and float32 scales.

This is what :mod:`.convert` produces from a QAT model, what :mod:`.model_file` stores in an IBERT-INT file and what
:class:`.engine.IntegerEngine` runs. It depends on nothing but torch, so the runtime (engine, model file) never
imports the converter. Field meanings follow ``docs/integer_spec.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch


@dataclass
class IntLinear:
    w_int: torch.Tensor  # int8 [N, K]
    s_acc: torch.Tensor  # float32 [N]
    b_int: torch.Tensor  # int64 [N]


@dataclass
class IntLN:
    shift: int
    b_int: torch.Tensor  # int64 [C]
    s_out: torch.Tensor  # float32 [C]


@dataclass
class IntLayer:
    qkv: IntLinear
    o: IntLinear
    fc1: IntLinear
    fc2: IntLinear
    heads: int
    in_m: torch.Tensor  # input_act requant from the previous LN (per channel)
    in_e: torch.Tensor
    s_x: torch.Tensor  # input_act scale (1,)
    qkv_m: torch.Tensor
    qkv_e: torch.Tensor
    s_qkv: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    lut: torch.Tensor  # int32 i-exp table
    s_scores: torch.Tensor
    ctx_m: int
    ctx_e: int
    s_ctx: torch.Tensor
    ar_m: torch.Tensor  # attn_residual_act: out_proj accumulator -> 22 bit (per channel)
    ar_e: torch.Tensor
    ar_id_m: int  # identity (input_act output) -> 22 bit
    ar_id_e: int
    attn_ln: IntLN
    h_m: torch.Tensor  # fc1_act from attn LN (per channel)
    h_e: torch.Tensor
    s_h: torch.Tensor
    gelu_k: torch.Tensor  # i-GELU erf pre-shift per channel (|q| << k, or >> -k)
    gelu_b: torch.Tensor
    gelu_c: torch.Tensor
    gelu_one: torch.Tensor
    g_m: torch.Tensor  # fc2_act from the GELU scale (per channel)
    g_e: torch.Tensor
    s_g: torch.Tensor
    fr_m: torch.Tensor  # ffn_residual_act: fc2 accumulator -> 22 bit
    fr_e: torch.Tensor
    fr_id_m: int
    fr_id_e: int
    ffn_ln: IntLN


@dataclass
class IntModel:
    tok_w: torch.Tensor  # int8 [V, D]
    pos_w: torch.Tensor  # int8 [P, D]
    padding_idx: int
    emb_tok_m: int
    emb_tok_e: int
    emb_pos_m: int
    emb_pos_e: int
    emb_ln: IntLN
    layers: List[IntLayer]
    act_bits: int
    residual_bits: int
    embed_act_bits: int
    head: Optional[Dict[str, torch.Tensor]]
    weight_bits: int
    ternary: bool
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def s_out(self) -> torch.Tensor:
        return self.layers[-1].ffn_ln.s_out if self.layers else self.emb_ln.s_out
