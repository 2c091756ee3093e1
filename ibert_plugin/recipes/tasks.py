"""The one task table of the driver (``run.py``) and of the hydra configs it generates (``configs/*.yaml``).

GLUE numbers are the fairseq RoBERTa ``README.glue.md`` recipe, which I-BERT's ``run.py`` copies unchanged: learning
rate, batch size in sentences, total and warmup updates of the polynomial schedule, epochs, and the mid-epoch
validation interval in training sentences (``validate_interval_updates = sentences // bs``). Added tasks:

* RT-SENT (Rotten Tomatoes, 8,568 train sentences): single-sentence like SST-2, 10 epochs at batch 32 = 10 x 268
  = 2680 updates, 6 % warmup (160), lr 1e-5 as SST-2.
* BOOLQ (9,427 question/passage pairs): RTE's lr/batch, 10 epochs at batch 16 = 10 x 590 = 5900 updates,
  6 % warmup (354), passages truncated to 512 positions, max-tokens raised to 16 x 512 so long passages keep the
  batch size.

TernaryBERT stages (``--quant-mode ternarybert``) use :data:`TERNARY` instead of the FP schedule, with the per-task
batch of ``quant_task_glue.py`` (``TaskSpec.ternary_bs``).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

__all__ = ["TaskSpec", "TASKS", "SQUAD_TASKS", "ARCHS", "TernarySchedule", "TERNARY", "FP_OPTIMIZER",
           "TERNARY_OPTIMIZER"]

#: Span-extraction tasks: ``run.py --task SQUAD1|SQUAD2`` hands the whole command line to their own recipe
#: (:func:`ibert_plugin.squad.recipe.run_squad`, also ``python -m ibert_plugin.squad``).
SQUAD_TASKS = ("SQUAD1", "SQUAD2")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task's fine-tuning recipe (FP stage; the I-BERT QAT stage keeps it with 0 warmup)."""

    num_classes: int
    lr: float
    bs: int
    total_updates: int
    warmup: int
    max_epoch: int
    metric: str = "accuracy"  # best-checkpoint metric (all GLUE metrics here are higher-is-better)
    metric_flags: Tuple[str, ...] = ()
    valid_interval_sentences: Optional[int] = None  # mid-epoch validation every N training sentences
    valid_subset: str = "valid"
    regression: bool = False
    max_positions: int = 512
    max_tokens: int = 4400
    truncate: bool = False  # --truncate-sequence (long passages)
    ternary_bs: int = 32  # TernaryBERT per-task batch size (quant_task_glue.py default_params)

    def validate_interval_updates(self, bs: int) -> Optional[int]:
        """Mid-epoch validation interval in updates for batch ``bs`` (``None``: once per epoch)."""
        return max(1, self.valid_interval_sentences // bs) if self.valid_interval_sentences else None


TASKS: Dict[str, TaskSpec] = {
    "RTE": TaskSpec(2, 2e-5, 16, 2036, 122, 12),
    "SST-2": TaskSpec(2, 1e-5, 32, 20935, 1256, 12),
    "MNLI": TaskSpec(3, 1e-5, 32, 123873, 7432, 6, valid_interval_sentences=100000, valid_subset="valid,valid1"),
    "QNLI": TaskSpec(2, 1e-5, 32, 33112, 1986, 12, valid_interval_sentences=55000),
    "CoLA": TaskSpec(2, 1e-5, 16, 5336, 320, 12, metric="mcc", metric_flags=("--report-mcc",), ternary_bs=16),
    "QQP": TaskSpec(2, 1e-5, 32, 113272, 28318, 6, metric="acc_and_f1", metric_flags=("--report-acc-and-f1",),
                    valid_interval_sentences=950000),
    "MRPC": TaskSpec(2, 1e-5, 16, 2296, 137, 12, metric="acc_and_f1", metric_flags=("--report-acc-and-f1",)),
    "STS-B": TaskSpec(1, 2e-5, 16, 3598, 214, 12, metric="pearson_and_spearman",
                      metric_flags=("--report-pearson-and-spearman",), regression=True),
    "RT-SENT": TaskSpec(2, 1e-5, 32, 2680, 160, 10),
    "BOOLQ": TaskSpec(2, 2e-5, 16, 5900, 354, 10, max_tokens=8192, truncate=True, ternary_bs=16),
}


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

#: ``--arch`` -> (fairseq arch, size tag used in output paths, default pretrained checkpoints relative to
#: ``--model-dir``; ``@`` marks a path relative to the repository).
ARCHS: Dict[str, Tuple[str, str, Tuple[str, ...]]] = {
    "roberta_base": ("ibert_roberta_base", "base", ("roberta.base/model.pt",)),
    "roberta_large": ("ibert_roberta_large", "large", ("roberta.large/model.pt",)),
    "minilm": ("ibert_roberta_minilm", "minilm", ("minilm/model.pt", "@data/minilm/model.pt")),
    "tiny": ("ibert_roberta_tiny", "tiny", ()),
}
