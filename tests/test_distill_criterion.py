"""ternary_distill criterion: each loss on hand-checkable inputs, flag validation, frozen out-of-tree teacher."""
import math
from types import SimpleNamespace

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.logging import metrics

from ibert_plugin.criterions.distill import TernaryDistillConfig, TernaryDistillCriterion

HEAD = "sentence_classification_head"
PAD = 1


class FixedModel(torch.nn.Module):
    """Returns the given logits / hidden states / attention scores (as parameters, so they receive gradients)."""

    def __init__(self, logits, states=(), scores=()):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))
        self.states = torch.nn.ParameterList([torch.nn.Parameter(torch.as_tensor(s)) for s in states])
        self.scores = torch.nn.ParameterList([torch.nn.Parameter(torch.as_tensor(s)) for s in scores])
        self.classification_heads = torch.nn.ModuleDict({HEAD: torch.nn.Identity()})
        self.seen_training = []

    def get_targets(self, sample, net_output):
        return sample["target"]

    def forward(self, src_tokens, src_lengths=None, features_only=False, classification_head_name=None,
                return_all_hiddens=False, return_attn_scores=False):
        self.seen_training.append(self.training)
        extra = {"inner_states": list(self.states) if return_all_hiddens else None}
        if return_attn_scores:
            extra["attn_scores"] = list(self.scores)
        return self.logits * 1.0, extra


def _task():
    labels = Dictionary()
    labels.add_symbol("0")
    labels.add_symbol("1")
    return SimpleNamespace(label_dictionary=labels, source_dictionary=Dictionary())


def _criterion(teacher, **kw):
    cfg = TernaryDistillConfig(**kw)
    return TernaryDistillCriterion(cfg, _task(), teacher=teacher)


def _sample(tokens, target):
    tokens = torch.as_tensor(tokens)
    return {"net_input": {"src_tokens": tokens, "src_lengths": tokens.ne(PAD).sum(1)},
            "target": torch.as_tensor(target), "ntokens": int(tokens.numel())}


def test_needs_a_flag_and_a_teacher_path():
    with pytest.raises(ValueError, match="--pred-distill"):
        _criterion(FixedModel([[0.0, 0.0]]))
    with pytest.raises(ValueError, match="--teacher-path"):
        TernaryDistillCriterion(TernaryDistillConfig(pred_distill=True), _task())


def test_soft_cross_entropy_by_hand():
    student = FixedModel([[0.0, 0.0], [0.0, math.log(3.0)]])
    teacher = FixedModel([[0.0, math.log(3.0)], [0.0, 0.0]])
    crit = _criterion(teacher, pred_distill=True)
    loss, sample_size, log = crit(student, _sample([[0, 5, 2], [0, 6, 2]], [1, 0]))
    # row 0: -(0.25 + 0.75) * ln(1/2) = ln 2; row 1: -(0.5 ln 0.25 + 0.5 ln 0.75); mean over 2 x 2 entries
    expected = (math.log(2) + -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))) / 4
    assert sample_size == 2
    assert log["pred_loss"].item() == pytest.approx(expected * 2, rel=1e-6)
    assert loss.item() == pytest.approx(expected * 2, rel=1e-6)
    assert log["ncorrect"].item() == 0  # argmax(student) = [0 (tie), 1] vs targets [1, 0]
    assert "att_loss" not in log and "rep_loss" not in log


def test_pred_distill_weight_scales_only_the_prediction_term():
    s_att, t_att = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    student = FixedModel([[0.0, 0.0], [0.0, math.log(3.0)]], states=[torch.zeros(2, 2, 4)], scores=[s_att])
    teacher = FixedModel([[0.0, math.log(3.0)], [0.0, 0.0]], states=[torch.ones(2, 2, 4)], scores=[t_att])
    sample = _sample([[0, 5], [0, 6]], [0, 1])
    base = _criterion(teacher, pred_distill=True, intermediate_distill=True)
    heavy = _criterion(teacher, pred_distill=True, intermediate_distill=True, pred_distill_weight=10.0)
    l1, _, log1 = base(student, sample)
    l10, _, log10 = heavy(student, sample)
    pred = (math.log(2) + -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))) / 4
    # logged components stay unweighted; only the optimised sum changes, by 9 x the prediction term
    assert log10["pred_loss"].item() == pytest.approx(log1["pred_loss"].item())
    assert l1.item() == pytest.approx(2 * (pred + 1.0 + 1.0), rel=1e-6)
    assert l10.item() == pytest.approx(2 * (10 * pred + 1.0 + 1.0), rel=1e-6)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="--pred-distill-weight"):
            _criterion(teacher, pred_distill=True, pred_distill_weight=bad)


def test_regression_prediction_mse_and_label_loss():
    student = FixedModel([[1.0], [3.0]])
    teacher = FixedModel([[2.0], [1.0]])
    crit = _criterion(teacher, pred_distill=True, regression_target=True, label_loss_weight=0.5)
    loss, n, log = crit(student, _sample([[0, 5], [0, 6]], [0.0, 3.0]))
    assert log["pred_loss"].item() == pytest.approx((1 + 4) / 2 * 2)
    assert log["label_loss"].item() == pytest.approx((1 + 0) / 2 * 2)
    assert loss.item() == pytest.approx(2 * (2.5 + 0.5 * 0.5))


def test_intermediate_losses_mask_padding_keys_explicitly():
    # B=1, H=1, T=3 with the last token padding; student/teacher -inf (or -1e4) on the padded key
    tokens = [[0, 5, PAD]]
    s_att = torch.tensor([[[[1.0, 2.0, -math.inf], [0.0, 1.0, -math.inf], [3.0, 3.0, -math.inf]]]])
    t_att = torch.tensor([[[[2.0, 2.0, -1e4], [0.0, 3.0, -1e4], [3.0, 1.0, -1e4]]]])
    h_s = [torch.zeros(3, 1, 2), torch.ones(3, 1, 2)]
    h_t = [torch.ones(3, 1, 2), torch.ones(3, 1, 2) * 3]
    student = FixedModel([[0.0, 0.0]], states=h_s, scores=[s_att])
    teacher = FixedModel([[0.0, 0.0]], states=h_t, scores=[t_att])
    crit = _criterion(teacher, intermediate_distill=True)
    loss, n, log = crit(student, _sample(tokens, [0]))
    att = (1 + 0 + 0 + 0 + 4 + 0 + 0 + 4 + 0) / 9  # masked column contributes 0 in both
    rep = 1.0 + 4.0
    assert log["att_loss"].item() == pytest.approx(att)
    assert log["rep_loss"].item() == pytest.approx(rep)
    assert loss.item() == pytest.approx(att + rep)
    assert "pred_loss" not in log
    loss.backward()
    assert torch.isfinite(student.scores[0].grad).all()
    assert (student.scores[0].grad[..., 2] == 0).all()


def test_attention_mse_equals_the_mean_square_of_both_masked_tensors_exactly():
    """Padded keys hold -inf in both models' scores; the loss and its gradient are those of MSE(A_s', A_t') with
    both zeroed there, bit for bit."""
    from ibert_plugin.criterions.distill import masked_attention_mse

    g = torch.Generator().manual_seed(0)
    pad = torch.zeros(3, 16, dtype=torch.bool)
    pad[1, 12:], pad[2, 5:] = True, True
    s_att = [torch.randn(3, 4, 16, 16, generator=g).masked_fill(pad[:, None, None], -math.inf).requires_grad_()
             for _ in range(2)]
    t_att = [torch.randn(3, 4, 16, 16, generator=g).masked_fill(pad[:, None, None], -math.inf) for _ in range(2)]
    loss = masked_attention_mse(s_att, t_att, pad)
    loss.backward()
    ref_in = [a.detach().clone().requires_grad_() for a in s_att]
    m = pad[:, None, None, :]
    ref = sum(torch.nn.functional.mse_loss(a.masked_fill(m, 0.0), b.masked_fill(m, 0.0)) for a, b in zip(ref_in, t_att))
    ref.backward()
    assert torch.equal(loss, ref) and torch.isfinite(loss)
    for a, r in zip(s_att, ref_in):
        assert torch.equal(a.grad, r.grad) and (a.grad[1, ..., 12:] == 0).all()


def test_both_flags_sum_and_metrics_are_logged():
    s_att, t_att = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    student = FixedModel([[0.0, 0.0], [0.0, 0.0]], states=[torch.zeros(2, 2, 4)], scores=[s_att])
    teacher = FixedModel([[0.0, 0.0], [0.0, 0.0]], states=[torch.ones(2, 2, 4)], scores=[t_att])
    crit = _criterion(teacher, pred_distill=True, intermediate_distill=True)
    loss, n, log = crit(student, _sample([[0, 5], [0, 6]], [0, 1]))
    pred = math.log(2) / 2  # uniform vs uniform: -(0.5 ln .5) * 2 classes / 2
    assert loss.item() == pytest.approx(2 * (pred + 1.0 + 1.0), rel=1e-6)
    with metrics.aggregate() as agg:
        TernaryDistillCriterion.reduce_metrics([log])
        vals = agg.get_smoothed_values()
    for k in ("loss", "pred_loss", "att_loss", "rep_loss", "accuracy"):
        assert k in vals, k
    assert vals["loss"] == pytest.approx(vals["pred_loss"] + vals["att_loss"] + vals["rep_loss"], abs=2e-3)
    assert vals["rep_loss"] == pytest.approx(1.0 / math.log(2), abs=1e-3)


def test_teacher_is_frozen_eval_and_outside_the_module_tree():
    student = FixedModel([[0.5, -0.5]], states=[torch.randn(2, 1, 3)], scores=[torch.randn(1, 1, 2, 2)])
    teacher = FixedModel([[1.0, 0.0]], states=[torch.randn(2, 1, 3)], scores=[torch.randn(1, 1, 2, 2)])
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    crit = _criterion(teacher, pred_distill=True, intermediate_distill=True)
    crit.train()
    teacher.train()  # even if someone flips it back, the forward runs the teacher in eval mode
    loss, _, _ = crit(student, _sample([[0, 5]], [0]))
    loss.backward()
    assert teacher.seen_training == [False]
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert student.logits.grad is not None and student.states[0].grad is not None
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])
    assert len(list(crit.parameters())) == 0 and len(crit.state_dict()) == 0
    assert "_teacher" not in dict(crit.named_modules()) and crit.teacher is teacher
    assert not any(k.startswith("_teacher") for k in student.state_dict())


def test_missing_attention_scores_is_a_clear_error():
    student = FixedModel([[0.0, 0.0]], states=[torch.zeros(1, 1, 2)], scores=[])
    teacher = FixedModel([[0.0, 0.0]], states=[torch.zeros(1, 1, 2)], scores=[])
    crit = _criterion(teacher, intermediate_distill=True)
    with pytest.raises(ValueError, match="attn_scores"):
        crit(student, _sample([[0, 5]], [0]))


def test_lat_quantizers_take_adam_beta2_and_eps_from_the_fairseq_command_line():
    """The shipped pipeline (a legacy fairseq model sees the whole command line): LAT's v is Adam's v."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.models import ARCH_MODEL_REGISTRY

    from ibert_plugin.quant.ternary import LATWeightQuantizer
    from ibert_plugin.wiring.checkpoint import _StubTask

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        "data", "--task", "sentence_prediction", "--criterion", "sentence_prediction", "--num-classes", "2",
        "--arch", "ibert_roberta_tiny", "--quant-mode", "ternarybert", "--weight-bits", "2",
        "--weight-quant-method", "lat", "--optimizer", "adam", "--adam-betas", "(0.9, 0.97)", "--adam-eps", "1e-7"])
    cfg = convert_namespace_to_omegaconf(args)
    model = ARCH_MODEL_REGISTRY["ibert_roberta_tiny"].build_model(cfg.model, _StubTask(64))
    lat = [m for m in model.modules() if isinstance(m, LATWeightQuantizer)]
    assert lat and all((m.beta2, m.eps) == (0.97, 1e-7) for m in lat)
