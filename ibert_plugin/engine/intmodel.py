"""The engine's compiled integer model: plain dataclasses of int8/int64 tensors and float32 scales.

This is what :mod:`.convert` produces from a QAT model, what :mod:`.model_file` stores in an IBERT-INT file and what
:class:`.engine.IntegerEngine` runs. It depends on nothing but torch, so the runtime (engine, model file) never
imports the converter. The arithmetic each field takes part in is in ``docs/integer_spec.md``; names follow the QAT
modules they come from (``fc1_input`` is the QAT model's ``fc1_act``, the 8-bit input of FC1).

Every requantization step is a :class:`Dyadic` ratio (I-BERT Eq. 6: ``q_out = (q_in * multiplier) >> shift``,
rounded); a ``*_scale`` field is the float scale of the integers a step produces (real value = integer x scale),
kept for dequantizing outputs and for checks, never used by the integer arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

#: The four GEMMs of a layer, as :class:`IntLayer` names them (``route_hints`` and the engine's ``routes`` too).
LINEARS = ("qkv", "out_proj", "fc1", "fc2")


@dataclass
class Dyadic:
    """A dyadic number ``multiplier / 2**shift`` (I-BERT Eq. 6): the integer form of a requantization ratio.

    Attributes:
        multiplier: int64 ``[C]`` (per output channel) or a Python int (per tensor), below ``2**31``.
        shift: int64 ``[C]`` or a Python int, the right shift (rounding) applied after the multiply.
    """

    multiplier: Union[torch.Tensor, int]
    shift: Union[torch.Tensor, int]


@dataclass
class IntLinear:
    """A linear layer's integer form: ``acc = x_int8 @ weight.T + bias`` in int32.

    Attributes:
        weight: int8 ``[N, K]``, symmetric (``weight_bits`` of the model; ternary models: {-1, 0, 1}).
        acc_scale: float32 ``[N]``: scale of the accumulator, input scale x per-channel weight scale.
        bias: int64 ``[N]``: the 32-bit bias, quantized with ``acc_scale``.
    """

    weight: torch.Tensor
    acc_scale: torch.Tensor
    bias: torch.Tensor


@dataclass
class IntLN:
    """I-BERT integer LayerNorm (Alg. 4, integer square root) of a 22-bit residual sum.

    Attributes:
        shift: right shift of the centred input before squaring (keeps the variance sum below ``2**52``).
        bias: int64 ``[C]``: beta / (gamma-folded output scale), added to the normalised integer.
        out_scale: float32 ``[C]``: scale of the integer output (``S_n x gamma``, per channel).
    """

    shift: int
    bias: torch.Tensor
    out_scale: torch.Tensor


@dataclass
class IntLayer:
    """One transformer layer (post-LN RoBERTa), in the order the engine runs it (``engine.py``'s module docstring).

    Requantization ratios (:class:`Dyadic`) and the scales of what they produce:

    * ``input_requant`` ``[D]``: the previous LayerNorm's output -> the 8-bit layer input (``input_scale`` ``[1]``);
    * ``qkv_requant`` ``[3D]``: QKV accumulators -> 8-bit q, k, v (``qkv_scales``: three ``[1]``);
    * ``context_requant`` (per tensor): softmax x v accumulator -> the 8-bit context (``context_scale``);
    * ``attn_residual_requant`` ``[D]``: out-projection accumulator -> 22-bit residual branch;
      ``attn_identity_requant`` (per tensor): the 8-bit layer input -> the 22-bit identity branch;
    * ``fc1_input_requant`` ``[D]``: attention LayerNorm output -> 8-bit FC1 input (``fc1_input_scale``);
    * ``fc2_input_requant`` ``[F]``: i-GELU output -> 8-bit FC2 input (``fc2_input_scale``);
    * ``ffn_residual_requant`` ``[D]`` / ``ffn_identity_requant``: FC2 accumulator / FC1 input -> 22-bit.

    i-softmax: ``exp_table`` int32, the i-exp values of ``-0, -1, -2, ...`` score steps (``score_scale``: scale of
    the q.k accumulator). i-GELU (Eq. 8-9) per FC1 channel: ``gelu_shift`` (pre-shift of the accumulator into the
    erf polynomial's range: ``<< k`` or ``>> -k``), ``gelu_b`` / ``gelu_c`` (the polynomial's integer constants) and
    ``gelu_one`` (the integer 1 of the erf output).
    """

    qkv: IntLinear
    out_proj: IntLinear
    fc1: IntLinear
    fc2: IntLinear
    heads: int
    input_requant: Dyadic
    input_scale: torch.Tensor
    qkv_requant: Dyadic
    qkv_scales: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    exp_table: torch.Tensor
    score_scale: torch.Tensor
    context_requant: Dyadic
    context_scale: torch.Tensor
    attn_residual_requant: Dyadic
    attn_identity_requant: Dyadic
    attn_ln: IntLN
    fc1_input_requant: Dyadic
    fc1_input_scale: torch.Tensor
    gelu_shift: torch.Tensor
    gelu_b: torch.Tensor
    gelu_c: torch.Tensor
    gelu_one: torch.Tensor
    fc2_input_requant: Dyadic
    fc2_input_scale: torch.Tensor
    ffn_residual_requant: Dyadic
    ffn_identity_requant: Dyadic
    ffn_ln: IntLN


@dataclass
class IntModel:
    """The whole integer encoder (plus the float classification head, when the model has one).

    Attributes:
        token_table: int8 ``[V, D]``; ``position_table``: int8 ``[P, D]`` (fairseq learned positions).
        token_requant / position_requant: per-tensor :class:`Dyadic` ratios of the two tables to the
            ``embed_act_bits`` embedding sum; ``emb_ln``: the embedding LayerNorm.
        act_bits / residual_bits / embed_act_bits / weight_bits: bit-widths (8 / 22 / 16 / 8, 7 or 2);
            ``ternary``: weights are {-1, 0, 1} per channel.
        head: float32 ``dense.*`` / ``out_proj.*`` of the classification head, or None.
        info: provenance kept for reports (embedding scales, the nonlinear constants' preset).
    """

    token_table: torch.Tensor
    position_table: torch.Tensor
    padding_idx: int
    token_requant: Dyadic
    position_requant: Dyadic
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
    def out_scale(self) -> torch.Tensor:
        """Scale of the encoder's integer output: the last LayerNorm's ``out_scale``."""
        return self.layers[-1].ffn_ln.out_scale if self.layers else self.emb_ln.out_scale
