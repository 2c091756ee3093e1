"""TernaryBERT distillation-aware training criterion (``--criterion ternary_distill``).

Zhang et al., "TernaryBERT: Distillation-aware Ultra-low Bit BERT", EMNLP 2020 (arXiv:2009.12812), and the released
``quant_task_glue.py``: the quantized student is trained against a frozen full-precision teacher with

* prediction distillation (``--pred-distill``): soft cross-entropy ``mean(-softmax(t) * log_softmax(s))`` at
  temperature 1, the mean taken over batch x classes (so divided by the number of classes, as upstream), or the
  MSE of the logits for regression tasks;
* intermediate distillation (``--intermediate-distill``): ``rep_loss = sum over the L+1 hidden states`` (embedding
  output and every layer output) of ``MSE(H_s, H_t)`` plus ``att_loss = sum over the L layers`` of
  ``MSE(A_s, A_t)`` on the pre-softmax attention scores, with the entries of padded keys set to 0 in *both* tensors
  (an explicit key-padding mask, where upstream thresholded at -100; fairseq masks with -inf);
* an optional ground-truth loss ``--label-loss-weight`` (default 0: upstream's PyTorch code has none).

``loss = w_pred * pred_loss + rep_loss + att_loss + label_loss_weight * label_loss`` (``w_pred`` =
``--pred-distill-weight``, default 1: the unweighted sum of upstream). Every term is
a per-batch mean; the criterion returns it multiplied by ``sample_size`` (= number of sentences), because fairseq
divides gradients by ``sample_size``: the optimised quantity is exactly upstream's.

The teacher is loaded from ``--teacher-path`` with ``checkpoint_utils.load_model_ensemble`` (its ``quant_mode`` forced
to ``none``), frozen (``eval()``, ``requires_grad_(False)``, run under ``no_grad``: no dropout) and kept out of the
module tree (``object.__setattr__``), so it is neither optimised, nor DDP-wrapped, nor saved with the criterion or the
student. It is moved to the student's device/dtype lazily at the first forward.
"""
import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils
from fairseq.criterions import register_criterion
from fairseq.criterions.sentence_prediction import SentencePredictionConfig, SentencePredictionCriterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics

from ..quant.config import ConfigError

logger = logging.getLogger(__name__)

COMPONENTS = ("pred_loss", "att_loss", "rep_loss", "label_loss")


@dataclass
class DistillFlags(FairseqDataclass):
    """TernaryBERT's distillation switches, shared by the sentence and the span (SQuAD) criteria."""

    teacher_path: str = field(default="", metadata={"help": "full-precision teacher checkpoint (fairseq .pt)"})
    pred_distill: bool = field(default=False, metadata={"help": "distil the predictions (soft CE; MSE for regression)"})
    intermediate_distill: bool = field(
        default=False, metadata={"help": "distil every hidden state and every layer's pre-softmax attention scores"}
    )
    pred_distill_weight: float = field(
        default=1.0,
        metadata={"help": "weight of the prediction-distillation term (1 = upstream; the soft CE is a mean over "
                          "classes or span positions, so a span model's term is ~1/T of a per-window CE)"},
    )


def attach_teacher(criterion, cfg: DistillFlags, task, teacher, name: str) -> None:
    """Set ``criterion._teacher``: ``teacher`` (tests) or the checkpoint ``cfg.teacher_path``, frozen in eval mode.

    The teacher is not a submodule: never optimised, DDP-wrapped or saved with the criterion or the student.
    """
    if teacher is None:
        if not cfg.teacher_path:
            raise ConfigError(f"--criterion {name} needs --teacher-path (a full-precision checkpoint)")
        teacher = TernaryDistillCriterion.load_teacher(cfg.teacher_path, task)
    teacher.eval()
    teacher.requires_grad_(False)
    object.__setattr__(criterion, "_teacher", teacher)


@dataclass
class TernaryDistillConfig(SentencePredictionConfig, DistillFlags):
    label_loss_weight: float = field(
        default=0.0, metadata={"help": "weight of the ground-truth loss (0 = upstream TernaryBERT: none)"}
    )


def pred_distill_weight(cfg: DistillFlags) -> float:
    """``cfg.pred_distill_weight`` checked: a finite number >= 0 (:class:`ConfigError` otherwise)."""
    w = float(getattr(cfg, "pred_distill_weight", 1.0))
    if not math.isfinite(w) or w < 0:
        raise ConfigError(f"--pred-distill-weight must be a finite number >= 0, got {w}")
    return w


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``mean(-softmax(t) * log_softmax(s))`` over batch x classes (upstream; temperature 1)."""
    t = F.softmax(teacher_logits.float(), dim=-1)
    return (-t * F.log_softmax(student_logits.float(), dim=-1)).mean()


def masked_attention_mse(
    student_scores: List[torch.Tensor], teacher_scores: List[torch.Tensor], key_padding_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Sum over layers of ``MSE(A_s, A_t)``, padded keys zeroed in both.

    Args:
        student_scores, teacher_scores: per layer, ``B x H x T x T`` real pre-softmax scores (masked keys may hold
            ``-inf``).
        key_padding_mask: ``B x T`` bool, True at padding (keys) or None.
    """
    if len(student_scores) != len(teacher_scores):
        raise ValueError(f"student has {len(student_scores)} attention layers, teacher {len(teacher_scores)}")
    total = None
    m = key_padding_mask[:, None, None, :].to(torch.bool) if key_padding_mask is not None else None
    for a_s, a_t in zip(student_scores, teacher_scores):
        # MSE(A_s', A_t') with both zeroed at padded keys is the mean square of their difference zeroed there
        # (-inf - -inf is nan before the fill): one B x H x T x T temporary instead of two masked copies, the same
        # values and gradients
        diff = a_s.float() - a_t.float()
        if m is not None:
            diff = diff.masked_fill_(m, 0.0)
        term = F.mse_loss(diff, diff.new_zeros(()).expand_as(diff))
        total = term if total is None else total + term
    return total


def hidden_state_mse(student_states: List[torch.Tensor], teacher_states: List[torch.Tensor]) -> torch.Tensor:
    """Sum over the L+1 hidden states of ``MSE(H_s, H_t)`` (plain mean over all elements, padding included)."""
    if len(student_states) != len(teacher_states):
        raise ValueError(f"student has {len(student_states)} hidden states, teacher {len(teacher_states)}")
    total = None
    for h_s, h_t in zip(student_states, teacher_states):
        term = F.mse_loss(h_s.float(), h_t.float())
        total = term if total is None else total + term
    return total


@register_criterion("ternary_distill", dataclass=TernaryDistillConfig)
class TernaryDistillCriterion(SentencePredictionCriterion):
    """Distillation from a frozen FP teacher for TernaryBERT quantization-aware training.

    Args:
        cfg: :class:`TernaryDistillConfig`; at least one of ``pred_distill`` / ``intermediate_distill``.
        task: the sentence prediction task (used to build the teacher and for the padding index).
        teacher: an already-built teacher (tests); otherwise loaded from ``cfg.teacher_path``.
    """

    def __init__(self, cfg: TernaryDistillConfig, task, teacher=None):
        super().__init__(cfg, task)
        if not (cfg.pred_distill or cfg.intermediate_distill):
            raise ConfigError(
                "--criterion ternary_distill needs at least one of --pred-distill / --intermediate-distill"
            )
        self.pred_distill = bool(cfg.pred_distill)
        self.intermediate_distill = bool(cfg.intermediate_distill)
        self.label_loss_weight = float(cfg.label_loss_weight)
        self.pred_distill_weight = pred_distill_weight(cfg)
        src_dict = getattr(task, "source_dictionary", None)
        self.padding_idx = src_dict.pad() if src_dict is not None else 1
        attach_teacher(self, cfg, task, teacher, "ternary_distill")
        object.__setattr__(self, "_teacher_placed", False)

    @property
    def teacher(self):
        return self._teacher

    @staticmethod
    def load_teacher(path: str, task):
        """Load the FP teacher (``quant_mode`` forced to ``none``) with ``checkpoint_utils.load_model_ensemble``.

        A quantized checkpoint has quantization buffers an FP build may not have: it is then loaded non-strictly
        (parameters must still match; the skipped keys are logged by fairseq/torch).
        """
        overrides = {"quant_mode": "none"}
        try:
            models, _ = checkpoint_utils.load_model_ensemble([path], arg_overrides=overrides, task=task)
        except RuntimeError as e:
            if "Unexpected key" not in str(e):
                raise
            logger.warning("teacher %s: ignoring quantization buffers absent from the FP build", path)
            models, _ = checkpoint_utils.load_model_ensemble([path], arg_overrides=overrides, task=task, strict=False)
        teacher = models[0]
        qcfg = getattr(teacher, "quant_config", None)
        if qcfg is not None and getattr(qcfg, "quant_mode", "none") != "none":
            raise ConfigError(f"teacher {path} was built with quant_mode={qcfg.quant_mode}, expected none")
        return teacher

    def _place_teacher(self, model) -> None:
        p = next(model.parameters())
        t = self._teacher
        tp = next(t.parameters())
        if tp.device != p.device:
            t.to(p.device)
        if p.is_floating_point() and tp.dtype != p.dtype:  # --fp16 / --bf16 students
            t.to(p.dtype)
        object.__setattr__(self, "_teacher_placed", True)

    def _run(self, model, sample, need_inner: bool):
        kwargs = dict(features_only=True, classification_head_name=self.classification_head_name)
        if need_inner:
            kwargs.update(return_all_hiddens=True, return_attn_scores=True)
        return model(**sample["net_input"], **kwargs)

    def forward(self, model, sample, reduce=True):
        """Returns ``(loss * sample_size, sample_size, logging_output)``; see the module docstring."""
        assert (
            hasattr(model, "classification_heads") and self.classification_head_name in model.classification_heads
        ), "model must provide sentence classification head for --criterion=ternary_distill"
        if not self._teacher_placed:
            self._place_teacher(model)
        teacher = self._teacher
        teacher.eval()  # dropout-free teacher, whatever the trainer did to the criterion

        inner = self.intermediate_distill
        logits, extra = self._run(model, sample, inner)
        with torch.no_grad():
            t_logits, t_extra = self._run(teacher, sample, inner)

        targets = model.get_targets(sample, [logits]).view(-1)
        sample_size = targets.numel()
        parts: Dict[str, torch.Tensor] = {}
        if self.pred_distill:
            if self.regression_target:
                parts["pred_loss"] = F.mse_loss(logits.view(-1).float(), t_logits.view(-1).float())
            else:
                parts["pred_loss"] = soft_cross_entropy(logits, t_logits)
        if inner:
            for key in ("inner_states", "attn_scores"):
                for name, ex in (("student", extra), ("teacher", t_extra)):
                    if not isinstance(ex, dict) or not ex.get(key):
                        raise ValueError(
                            f"--intermediate-distill: the {name} model returned no '{key}' (needs an ibert_roberta "
                            "model called with return_all_hiddens=True, return_attn_scores=True)"
                        )
            src_tokens = sample["net_input"]["src_tokens"]
            pad_mask = src_tokens.eq(self.padding_idx)
            parts["att_loss"] = masked_attention_mse(extra["attn_scores"], t_extra["attn_scores"], pad_mask)
            parts["rep_loss"] = hidden_state_mse(extra["inner_states"], t_extra["inner_states"])
        if self.label_loss_weight != 0:
            if self.regression_target:
                parts["label_loss"] = F.mse_loss(logits.view(-1).float(), targets.float())
            else:
                parts["label_loss"] = F.nll_loss(F.log_softmax(logits, dim=-1, dtype=torch.float32), targets)

        weights = {"label_loss": self.label_loss_weight, "pred_loss": self.pred_distill_weight}
        mean_loss = sum(weights.get(k, 1.0) * v for k, v in parts.items())
        loss = mean_loss * sample_size

        logging_output = {
            "loss": loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample_size,
            "sample_size": sample_size,
        }
        for k, v in parts.items():
            logging_output[k] = v.data * sample_size
        if not self.regression_target:
            preds = logits.argmax(dim=1)
            logging_output["ncorrect"] = (preds == targets).sum()
        if self.keep_pred_and_targ and not model.training:
            if self.regression_target:
                logging_output["pred"] = logits.detach().view(-1).float().cpu().tolist()
                logging_output["targ"] = targets.detach().float().cpu().tolist()
            else:
                preds = self.label_dict.string(preds + self.label_dict.nspecial).split()
                targs = self.label_dict.string(targets + self.label_dict.nspecial).split()
                logging_output["pred"] = list(map(int, preds))
                logging_output["targ"] = list(map(int, targs))
            if self.report_mcc:
                logging_output["report_mcc"] = True
            if self.report_acc_and_f1:
                logging_output["report_acc_and_f1"] = True
            if self.report_pearson_and_spearman:
                logging_output["report_pearson_and_spearman"] = True
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        """The parent's metrics (``loss``, ``accuracy`` ...) plus ``pred_loss``, ``att_loss``, ``rep_loss`` and
        (unweighted) ``label_loss``, in the parent's base-2 convention (divided by ln 2) so that
        ``loss = pred_loss + att_loss + rep_loss + label_loss_weight * label_loss``."""
        SentencePredictionCriterion.reduce_metrics(logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        for key in COMPONENTS:
            if any(key in log for log in logging_outputs):
                total = sum(log.get(key, 0) for log in logging_outputs)
                metrics.log_scalar(key, total / max(sample_size, 1) / math.log(2), sample_size, round=3)
