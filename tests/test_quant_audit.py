"""Integer-only audit: clean on an integer encoder stack, and catches deliberately broken modules."""
import pytest
import torch
from torch import nn

from benchmarks.qat_overhead import EncoderStack
from ibert_plugin.quant import IntGELU, QuantAct, QuantConfig, QuantLinear
from ibert_plugin.quant.audit import integer_audit

SYM = QuantConfig(quant_mode="symmetric")


def _calibrated(cfg=SYM, seed=0):
    torch.manual_seed(seed)
    model = EncoderStack(cfg, layers=2, dim=32, heads=4, ffn=64).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 7, 32), torch.zeros(2, 7, dtype=torch.bool))
    return model.eval()


def _batch():
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, -2:] = True
    return x, mask


def test_audit_clean_on_integer_encoder_and_mode_restored():
    model = _calibrated()
    model.train()
    report = integer_audit(model, *_batch())
    report.assert_clean()
    assert report.checked > 50 and report.modules > 30 and not report.notes
    assert model.training  # previous mode restored
    ranges = [m.x_max.clone() for m in model.modules() if isinstance(m, QuantAct)]
    integer_audit(model, *_batch())
    assert all(torch.equal(a, m.x_max) for a, m in zip(ranges, [m for m in model.modules() if isinstance(m, QuantAct)]))


def test_audit_notes_force_dequant_float_ops_without_violations():
    report = integer_audit(_calibrated(SYM.replace(force_dequant="gelu")), *_batch())
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
    layer = model.layers[0]
    old = getattr(layer, attr)
    new = cls(old.bits, old.cfg)
    new.load_state_dict(old.state_dict())
    setattr(layer, attr, new)
    return model


@pytest.mark.parametrize(
    "attr, cls, needle",
    [
        ("fc2_act", _NonInteger, "not integer-valued"),
        ("q_act", _OutOfRange, "outside the declared range"),
        ("attn_act", _ZeroScale, "scale is not finite and nonzero"),
    ],
)
def test_audit_catches_broken_quantizers(attr, cls, needle):
    model = _swap(_calibrated(), attr, cls)
    report = integer_audit(model, *_batch())
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
    model.layers[1].gelu = _FloatGELU(SYM)
    report = integer_audit(model, *_batch())
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

    layer = model.layers[0]
    gelu = layer.gelu
    layer.gelu = Tanh(gelu)  # not a quant module: nothing vouches for its real output
    report = integer_audit(model, *_batch())
    assert any(v.module.endswith("layers.0.fc2_act") and "float-only op" in v.message for v in report.violations)


def test_audit_records_forward_errors_and_empty_models():
    model = _calibrated()

    class Dequant(nn.Module):
        def forward(self, x, scale):
            return x * scale, None

    model.layers[0].fc1_act = Dequant()  # QuantLinear fc1 now receives a real tensor and raises
    report = integer_audit(model, *_batch())
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
