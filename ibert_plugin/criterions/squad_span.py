"""Span-extraction criteria for ``--task squad``.

* ``--criterion squad_span``: BERT's SQuAD loss, ``(CE(start) + CE(end)) / 2`` over the window's positions
  (padding masked), labels from the task (0 = the ``<s>`` null answer).
* ``--criterion squad_span_distill``: TernaryBERT distillation (Zhang et al., 2020; ``quant_task_squad.py``):
  ``pred_loss = SCE(start_s, start_t) + SCE(end_s, end_t)`` with the soft cross-entropy of
  :func:`ibert_plugin.criterions.distill.soft_cross_entropy` (temperature 1, mean over batch x positions), and the
  intermediate ``rep_loss`` / ``att_loss`` of :mod:`ibert_plugin.criterions.distill` (hidden states and pre-softmax
  attention scores, padded keys zeroed); ``loss = w * pred_loss + rep_loss + att_loss`` (no ground-truth term, as
  upstream; ``w`` = ``--pred-distill-weight``, default 1 as upstream: the soft CE is a mean over the window's T
  positions, so ``w`` near T makes the term a per-window soft CE). The FP teacher is loaded and frozen as by
  ``ternary_distill``.

Both return ``loss * sample_size`` with ``sample_size`` = windows in the batch (fairseq divides by it) and, in eval
mode, the start/end logits for the task's whole-dev-set metrics.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics

from ..quant.config import ConfigError
from ..squad.head import SPAN_HEAD, span_logits
from .distill import (
    DistillFlags,
    attach_teacher,
    hidden_state_mse,
    masked_attention_mse,
    pred_distill_weight,
    soft_cross_entropy,
)

COMPONENTS = ("pred_loss", "att_loss", "rep_loss")


@dataclass
class SquadSpanConfig(FairseqDataclass):
    pass


@dataclass
class SquadSpanDistillConfig(DistillFlags):
    """``--pred-distill`` distils the start and end logits (soft CE)."""


@register_criterion("squad_span", dataclass=SquadSpanConfig)
class SquadSpanCriterion(FairseqCriterion):
    """Start/end cross-entropy on the ``squad_span`` head."""

    def __init__(self, cfg, task):
        super().__init__(task)
        self.padding_idx = task.source_dictionary.pad()

    def span_forward(self, model, sample, inner: bool = False):
        """``(start [B, T], end [B, T], extra)`` of ``model`` on the sample (logits float32, padding masked)."""
        if SPAN_HEAD not in getattr(model, "classification_heads", {}):
            raise ValueError(f"model has no '{SPAN_HEAD}' head (build it with --task squad)")
        src = sample["net_input"]["src_tokens"]
        kwargs = dict(return_all_hiddens=True, return_attn_scores=True) if inner else {}
        features, extra = model(src, features_only=True, **kwargs)
        start, end = span_logits(model.classification_heads[SPAN_HEAD], features, src.eq(self.padding_idx))
        return start, end, extra

    def _logging(self, model, sample, loss, start, end, parts=None):
        n = sample["target"].size(0)
        log = {"loss": loss.data, "ntokens": sample["ntokens"], "nsentences": n, "sample_size": n}
        for k, v in (parts or {}).items():
            log[k] = v.data * n
        if not model.training:
            lengths = sample["net_input"]["src_tokens"].ne(self.padding_idx).sum(1)
            log["_span"] = (sample["id"].cpu(), start.detach().cpu(), end.detach().cpu(), lengths.cpu())
        return log

    def forward(self, model, sample, reduce=True):
        start, end, _ = self.span_forward(model, sample)
        target = sample["target"]
        loss = (F.cross_entropy(start, target[:, 0]) + F.cross_entropy(end, target[:, 1])) / 2
        n = target.size(0)
        return loss * n, n, self._logging(model, sample, loss * n, start, end)

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        """``loss`` (and distillation components) per window, base 2 like fairseq's other criteria."""
        n = sum(log.get("sample_size", 0) for log in logging_outputs)
        for key in ("loss",) + COMPONENTS:
            if any(key in log for log in logging_outputs):
                total = sum(log.get(key, 0) for log in logging_outputs)
                metrics.log_scalar(key, total / max(n, 1) / math.log(2), n, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return False


@register_criterion("squad_span_distill", dataclass=SquadSpanDistillConfig)
class SquadSpanDistillCriterion(SquadSpanCriterion):
    """TernaryBERT SQuAD distillation from a frozen FP teacher (see the module docstring).

    Args:
        teacher: an already-built teacher (tests); otherwise loaded from ``cfg.teacher_path``.
    """

    def __init__(self, cfg, task, teacher=None):
        super().__init__(cfg, task)
        if not (cfg.pred_distill or cfg.intermediate_distill):
            raise ConfigError("--criterion squad_span_distill needs --pred-distill and/or --intermediate-distill")
        self.pred_distill, self.intermediate_distill = bool(cfg.pred_distill), bool(cfg.intermediate_distill)
        self.pred_weight = pred_distill_weight(cfg)
        attach_teacher(self, cfg, task, teacher, "squad_span_distill")

    def forward(self, model, sample, reduce=True):
        teacher = self._teacher
        p = next(model.parameters())
        if next(teacher.parameters()).device != p.device:
            teacher.to(p.device)
        teacher.eval()
        inner = self.intermediate_distill
        start, end, extra = self.span_forward(model, sample, inner)
        with torch.no_grad():
            t_start, t_end, t_extra = self.span_forward(teacher, sample, inner)
        parts = {}
        if self.pred_distill:
            parts["pred_loss"] = soft_cross_entropy(start, t_start) + soft_cross_entropy(end, t_end)
        if inner:
            pad = sample["net_input"]["src_tokens"].eq(self.padding_idx)
            parts["att_loss"] = masked_attention_mse(extra["attn_scores"], t_extra["attn_scores"], pad)
            parts["rep_loss"] = hidden_state_mse(extra["inner_states"], t_extra["inner_states"])
        n = sample["target"].size(0)
        loss = sum((self.pred_weight if k == "pred_loss" else 1.0) * v for k, v in parts.items()) * n
        return loss, n, self._logging(model, sample, loss, start, end, parts)
