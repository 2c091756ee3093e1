"""squad_span_distill: the start/end soft CE against the teacher, by hand, and --pred-distill-weight scaling it."""
import math
from types import SimpleNamespace

import pytest
import torch
from fairseq.data import Dictionary

from ibert_plugin.criterions.squad_span import SquadSpanDistillConfig, SquadSpanDistillCriterion
from ibert_plugin.squad.head import SPAN_HEAD


class FirstColumnHead(torch.nn.Module):
    """Span head stand-in: start logit = feature 0, end logit = feature 1 of each token."""

    def forward(self, x):  # x: [B*T, 1, D]
        return x[:, 0, :2]


class FixedFeatures(torch.nn.Module):
    def __init__(self, feats):
        super().__init__()
        self.feats = torch.nn.Parameter(torch.as_tensor(feats, dtype=torch.float32))
        self.classification_heads = torch.nn.ModuleDict({SPAN_HEAD: FirstColumnHead()})

    def forward(self, src_tokens, features_only=True, return_all_hiddens=False, return_attn_scores=False):
        return self.feats * 1.0, {}


def _crit(teacher, **kw):
    task = SimpleNamespace(source_dictionary=Dictionary())
    return SquadSpanDistillCriterion(SquadSpanDistillConfig(pred_distill=True, **kw), task, teacher=teacher)


def test_span_soft_ce_by_hand_and_its_weight():
    # one window of T = 2 tokens (no padding): student start logits (0, 0), end (0, ln 3); teacher the reverse
    student = FixedFeatures([[[0.0, 0.0], [0.0, math.log(3.0)]]])
    teacher = FixedFeatures([[[0.0, math.log(3.0)], [math.log(3.0), 0.0]]])
    sample = {"net_input": {"src_tokens": torch.tensor([[0, 5]])}, "target": torch.tensor([[0, 1]]), "ntokens": 2}
    # start: teacher (1/4, 3/4) vs student (1/2, 1/2): -(1/4 + 3/4) ln 1/2 = ln 2; end: teacher (3/4, 1/4) vs student
    # (1/4, 3/4): -(3/4 ln 1/4 + 1/4 ln 3/4); each a mean over the T = 2 positions
    sce = (math.log(2) - (0.75 * math.log(0.25) + 0.25 * math.log(0.75))) / 2
    loss, n, log = _crit(teacher)(student, sample)
    assert n == 1 and log["pred_loss"].item() == pytest.approx(sce, rel=1e-6)
    assert loss.item() == pytest.approx(sce, rel=1e-6)
    loss_w, _, log_w = _crit(teacher, pred_distill_weight=2.0)(student, sample)
    assert log_w["pred_loss"].item() == pytest.approx(sce, rel=1e-6)  # logged unweighted
    assert loss_w.item() == pytest.approx(2.0 * sce, rel=1e-6)
    with pytest.raises(ValueError, match="--pred-distill-weight"):
        _crit(teacher, pred_distill_weight=-1.0)
