"""Numeric layer of the plugin: I-BERT integer-only and TernaryBERT quantization in plain PyTorch (no fairseq).

Layers (torchao-style): :mod:`.config` (the one ``QuantConfig``), :mod:`.primitives` (quantize, dyadic requant,
integer sqrt, exact integer GEMM), :mod:`.nonlinear` (i-GELU, i-exp/softmax, integer LayerNorm as pure functions),
:mod:`.weight` (weight quantizers and their registry), :mod:`.ternary` (TWN / LAT, imported here so that the
registry always holds them), :mod:`.packing` (2-bit / int8 storage), :mod:`.modules` (the ``(x, scale)`` modules the
model wiring uses) and :mod:`.audit` (integer-only audit). ``docs/integer_spec.md`` is the contract shared with the
engine.
"""
from .config import QuantConfig
from .modules import (
    DynamicActQuant,
    IntGELU,
    IntLayerNorm,
    IntSoftmax,
    QuantAct,
    QuantEmbedding,
    QuantLinear,
)
from .ternary import LATWeightQuantizer, TWNWeightQuantizer  # registers "twn" and "lat"
from .weight import SymWeightQuantizer, WeightQuantizer, build_weight_quantizer, register_weight_quantizer

__all__ = [
    "QuantConfig",
    "QuantAct",
    "QuantLinear",
    "QuantEmbedding",
    "IntGELU",
    "IntSoftmax",
    "IntLayerNorm",
    "DynamicActQuant",
    "WeightQuantizer",
    "SymWeightQuantizer",
    "TWNWeightQuantizer",
    "LATWeightQuantizer",
    "build_weight_quantizer",
    "register_weight_quantizer",
]
