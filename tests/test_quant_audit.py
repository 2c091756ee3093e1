"""Integer-only audit of the shipped ``ibert_roberta`` model: clean when calibrated, and catches broken modules.

The audited network is the fairseq model a user trains (``ibert_roberta_tiny`` with a classification head, built
through fairseq's parser), not a stand-alone encoder.
"""
import pytest
import torch
from torch import nn

from ibert_plugin.quant import IntGELU, QuantAct, QuantConfig, QuantLinear
from ibert_plugin.quant.audit import integer_audit
from model_helpers import build_model, make_dictionary, random_batch

SYM = QuantConfig(quant_mode="symmetric")
HEAD = "sentence_classification_head"
DICT = make_dictionary()


def _calibrated(extra=(), seed=0):
    model = build_model("ibert_roberta_tiny", DICT, extra=["--quant-mode", "symmetric", *extra], seed=seed).train()
    with torch.no_grad():
        for s in range(3):
            model(random_batch(DICT, seed=s), classification_head_name=HEAD)
    return model.eval()


def _audit(model):
    return integer_audit(model, random_batch(DICT, seed=9), classification_head_name=HEAD)


def _layer(model, i=0):
    return model.encoder.sentence_encoder.layers[i]


def test_audit_clean_on_integer_encoder_and_mode_restored():
    model = _calibrated()
    model.train()
    report = _audit(model)
    report.assert_clean()
    assert report.checked > 50 and report.modules > 30 and not report.notes
    assert model.training  # previous mode restored
    ranges = [m.x_max.clone() for m in model.modules() if isinstance(m, QuantAct)]
    _audit(model)
    assert all(torch.equal(a, m.x_max) for a, m in zip(ranges, [m for m in model.modules() if isinstance(m, QuantAct)]))


def test_audit_notes_force_dequant_float_ops_without_violations():
    report = _audit(_calibrated(("--force-dequant", "gelu")))
    report.assert_clean()
    assert any("float fallback" in n for n in report.notes)


class _NonInteger(QuantAct):
    def forward(self, *args, **kwargs):
        q, s = super().forward(*args, **kwargs)
        return q * 1.5, s


class _OutOfRange(QuantAct):
    def forward(self, *args, **kwargs):
        q, s = super().forward(*args, **kwargs)
        return q * 2, s


class _ZeroScale(QuantAct):
    def forward(self, *args, **kwargs):
        q, s = super().forward(*args, **kwargs)
        return q, s * 0


def _swap(model, attr, cls):
    owner = _layer(model)
    *path, name = attr.split(".")
    for p in path:
        owner = getattr(owner, p)
    old = getattr(owner, name)
    new = cls(old.bits, old.cfg)
    new.load_state_dict(old.state_dict())
    setattr(owner, name, new)
    return model


@pytest.mark.parametrize(
    "attr, cls, needle",
    [
        ("fc2_act", _NonInteger, "not integer-valued"),
        ("self_attn.q_act", _OutOfRange, "outside the declared range"),
        ("self_attn.attn_act", _ZeroScale, "scale is not finite and nonzero"),
    ],
)
def test_audit_catches_broken_quantizers(attr, cls, needle):
    model = _swap(_calibrated(), attr, cls)
    report = _audit(model)
    assert not report.clean
    assert any(needle in v.message and v.module.endswith(attr) for v in report.violations), report.violations
    with pytest.raises(AssertionError, match=needle):
        report.assert_clean()


class _FloatGELU(IntGELU):
    """Broken i-GELU: dequantizes, applies a float tanh-GELU and hands back a real tensor."""

    def forward(self, x, scale=None):
        real = (x * scale).float()
        return 0.5 * real * (1 + torch.tanh(0.79788456 * (real + 0.044715 * real**3))), None


def test_audit_catches_float_op_between_quantizers():
    model = _calibrated()
    _layer(model, 1).gelu = _FloatGELU(SYM)
    report = _audit(model)
    kinds = {(v.module, v.message.split(":")[0]) for v in report.violations}
    assert any(m.endswith("layers.1.gelu") and "real tensor" in msg for m, msg in kinds), report.violations
    # a float op applied to a real tensor before a QuantAct is flagged at the QuantAct too
    model = _calibrated()

    class Tanh(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, scale):
            return torch.tanh(x * scale), None

    layer = _layer(model)
    layer.gelu = Tanh(layer.gelu)  # not a quant module: nothing vouches for its real output
    report = _audit(model)
    assert any(v.module.endswith("layers.0.fc2_act") and "float-only op" in v.message for v in report.violations)


def test_audit_records_forward_errors_and_empty_models():
    model = _calibrated()

    class Dequant(nn.Module):
        def forward(self, x, scale):
            return x * scale, None

    _layer(model).fc1_act = Dequant()  # QuantLinear fc1 now receives a real tensor and raises
    report = _audit(model)
    msgs = " | ".join(str(v) for v in report.violations)
    assert "QuantLinear" in msgs and "real tensor" in msgs and "<forward>" in msgs
    empty = integer_audit(nn.Linear(3, 3), torch.randn(2, 3))
    assert empty.checked == 0 and not empty.violations
    with pytest.raises(AssertionError, match="no quantized tensor"):
        empty.assert_clean()


def test_audit_on_single_linear_catches_wide_inputs():
    lin = QuantLinear(4, 2, cfg=SYM)
    report = integer_audit(lin, torch.full((1, 4), 300.0), torch.tensor([0.01]))
    assert any("declared bound 127" in v.message for v in report.violations)
