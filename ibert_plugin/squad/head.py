"""The span head: start/end logits for every token from the model's ``classification_heads["squad_span"]``.

The head is the plugin's RoBERTa classification head with two outputs (``dense`` D x D, tanh, ``out_proj`` 2 x D),
applied to *every* position instead of ``<s>`` only. Registering it in ``classification_heads`` means fairseq saves,
reloads and upgrades it like any sentence head, the packed export keeps it, and the integer engine's converter reads
it (``compile_model(model, head_name=SPAN_HEAD)``). In TernaryBERT mode ``dense`` is a quantized linear, as for
sentence heads; ``out_proj`` stays float. Padded positions get a logit of ``PAD_LOGIT`` (softmax weight 0, finite so
that soft cross-entropy against a teacher stays finite).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

SPAN_HEAD = "squad_span"
PAD_LOGIT = -1e4


def ensure_span_head(model) -> None:
    """Register the two-output span head on a fairseq RoBERTa-style model if it has none."""
    if SPAN_HEAD not in model.classification_heads:
        model.register_classification_head(SPAN_HEAD, num_classes=2)


def span_logits(head, features: torch.Tensor, padding_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Start and end logits ``[B, T]`` (float32) of a classification head applied per token.

    Args:
        head: the registered span head (reads ``features[:, 0]``, so every token is fed as its own row).
        features: encoder output ``[B, T, D]`` (real values).
        padding_mask: ``[B, T]`` bool, True at padding.
    """
    B, T, D = features.shape
    logits = head(features.reshape(B * T, 1, D)).float().view(B, T, 2)
    logits = logits.masked_fill(padding_mask.unsqueeze(-1), PAD_LOGIT)
    return logits[..., 0], logits[..., 1]


def span_logits_float(weights: Dict[str, torch.Tensor], features: torch.Tensor,
                      padding_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same head from its float weights (``dense.*``, ``out_proj.*``), for the integer engine's output.

    Args:
        weights: the converter's head dict (``IntModel.head``).
        features: the engine's ``q_out * s_out`` as float32 ``[B, T, D]``.
    """
    B, T, D = features.shape
    x = torch.tanh(F.linear(features.reshape(B * T, D), weights["dense.weight"], weights["dense.bias"]))
    logits = F.linear(x, weights["out_proj.weight"], weights["out_proj.bias"]).float().view(B, T, 2)
    logits = logits.masked_fill(padding_mask.unsqueeze(-1), PAD_LOGIT)
    return logits[..., 0], logits[..., 1]
