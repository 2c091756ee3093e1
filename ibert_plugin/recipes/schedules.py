"""The recipes' schedules that are not per task: TernaryBERT's, and the Adam settings of each kind of stage.

The per-task numbers (FP learning rate, batch, updates, warmup, epochs, TernaryBERT batch) are in the one task table,
:data:`ibert_plugin.catalog.TASKS`. TernaryBERT stages (``--quant-mode ternarybert``, and the SQuAD recipe's ternary
stages) use :data:`TERNARY` instead of the FP schedule.
"""
from __future__ import annotations

import dataclasses

__all__ = ["TernarySchedule", "TERNARY", "FP_OPTIMIZER", "TERNARY_OPTIMIZER"]


@dataclasses.dataclass(frozen=True)
class TernarySchedule:
    """TernaryBERT's recipe: lr, epochs, weight decay, linear warmup fraction of the total updates, clip-norm."""

    lr: float = 2e-5
    epochs: int = 3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    clip_norm: float = 1.0


TERNARY = TernarySchedule()

#: Adam settings of the FP / I-BERT stages (RoBERTa's) and of the TernaryBERT stage (BertAdam's betas and eps).
FP_OPTIMIZER = {"adam_betas": "(0.9, 0.98)", "adam_eps": 1e-6, "weight_decay": 0.1, "clip_norm": 0.0}
TERNARY_OPTIMIZER = {"adam_betas": "(0.9, 0.999)", "adam_eps": 1e-6, "weight_decay": TERNARY.weight_decay,
                     "clip_norm": TERNARY.clip_norm}
