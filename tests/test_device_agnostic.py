"""Device-agnosticism of the QAT numerics, proven on CPU (no GPU needed): the training step and the eval forward run
on PyTorch's ``meta`` device under :class:`DeviceGuard`, which fails on any host synchronisation (``.item()``,
``bool(t)``, ``.tolist()``, ``torch.equal`` ...) and on any tensor made on, or read from, another device.

The ``meta`` device carries shapes and dtypes but no values, so every operation that would need the values on the
host (a CUDA sync) raises, and a tensor built without ``device=`` lands on the CPU, where the guard sees it. Code that
passes here runs on CUDA without host round trips in forward or backward. The fused C++ QAT kernels are CPU-only:
their dispatch must leave meta (and CUDA) tensors to the PyTorch path, checked here too.
"""
from __future__ import annotations

import traceback
from types import SimpleNamespace

import pytest
import torch
from fairseq.criterions.sentence_prediction import SentencePredictionConfig, SentencePredictionCriterion
from fairseq.data import Dictionary
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import model_helpers as mh
from ibert_plugin.criterions.distill import TernaryDistillConfig, TernaryDistillCriterion
from ibert_plugin.quant import fused
from ibert_plugin.quant import nonlinear as NL
from ibert_plugin.quant.primitives import requant_clamp

HEAD = "sentence_classification_head"
META = torch.device("meta")
aten = torch.ops.aten

#: ATen ops that copy a tensor's values to the host (a device synchronisation on CUDA).
HOST_SYNC_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
                 aten.allclose.default}


class DeviceGuard(TorchDispatchMode):
    """Records every op that synchronises with the host, produces a tensor off ``device`` or reads a non-scalar
    tensor from another device, with the innermost ``ibert_plugin`` / fairseq frame that called it."""

    def __init__(self, device: torch.device = META):
        super().__init__()
        self.device = device
        self.violations = []
        self.ops = 0

    def _record(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2]
                  if "ibert_plugin" in f.filename or "fairseq" in f.filename]
        where = f"{frames[-1].filename.split('site-packages/')[-1]}:{frames[-1].lineno} ({frames[-1].line})" \
            if frames else "?"
        self.violations.append(f"{what} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func in HOST_SYNC_OPS:
            self._record(f"host synchronisation {func}")
        for t in tree_leaves((args, kwargs)):
            # 0-dim CPU tensors are scalars PyTorch moves with the kernel launch (wrapped Python numbers)
            if isinstance(t, torch.Tensor) and t.device != self.device and t.dim() > 0:
                self._record(f"{func} reads a {tuple(t.shape)} tensor on {t.device}")
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device != self.device:
                self._record(f"{func} made a tensor on {t.device}")
        return out

    def assert_clean(self) -> None:
        assert self.ops > 0, "DeviceGuard saw no operation"
        assert not self.violations, "device-agnosticism violated:\n  " + "\n  ".join(dict.fromkeys(self.violations))


def _guarded(fn, *args):
    """``fn(*args)`` under a :class:`DeviceGuard`; an exception from the meta device (a host read of values it does
    not have) is a violation too."""
    guard = DeviceGuard()
    with guard:
        try:
            out = fn(*args)
        except (RuntimeError, NotImplementedError) as e:  # e.g. "Tensor.item() cannot be called on meta tensors"
            guard.violations.append(f"raised {type(e).__name__}: {str(e).splitlines()[0]}")
            out = None
    return guard, out


# ----------------------------------------------------------------------------------------------- the guard itself
def test_guard_flags_host_syncs_and_tensors_built_without_device():
    x = torch.ones(4, device=META)
    plants = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.sum() > 0),
        "factory without device=": lambda: x + torch.zeros(4),
        "cpu()": lambda: x.cpu(),
        "tolist": lambda: x.tolist(),
        "CPU constant": lambda: x * torch.arange(4.0),
    }
    for name, fn in plants.items():
        guard, _ = _guarded(fn)
        assert guard.violations, f"the guard missed {name}"
    ok, out = _guarded(lambda: (x * 2.0 + torch.zeros(4, device=x.device)).exp2().sum())
    ok.assert_clean()
    assert out.device == META


def test_guard_sees_backward_of_custom_functions():
    """Backward runs under the guard too: a host sync planted in an autograd Function's backward is caught."""

    class Planted(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * torch.ones(g.shape)  # no device=

    x = torch.ones(3, device=META, requires_grad=True)
    guard, _ = _guarded(lambda: Planted.apply(x).sum().backward())
    assert any("cpu" in v for v in guard.violations), guard.violations


# --------------------------------------------------------------------------------------- the fused-kernel dispatch
class _Forbidden:
    """Stands in for the compiled kernels: any use fails the test."""

    def __init__(self):
        self.calls = 0

    def __getattr__(self, name):
        def call(*a):
            self.calls += 1
            raise AssertionError(f"fused CPU kernel {name} called")
        return call


def test_fused_kernels_leave_non_cpu_tensors_to_the_pytorch_path(monkeypatch):
    spy = _Forbidden()
    monkeypatch.setattr(fused, "_MOD", spy)
    monkeypatch.setenv("IBERT_QAT_KERNELS", "1")
    f64 = torch.float64
    z = torch.zeros(6, 8, dtype=f64, device=META)
    m = torch.full((8,), 2.0 ** 19, dtype=f64, device=META)
    e = torch.full((8,), 30.0, dtype=f64, device=META)
    assert fused.usable(z) is None and fused.for_requant(z, m, e) is None and fused.for_gelu(z, m) is None

    def run():
        q = requant_clamp(z, m, e, 8, z, m, e)
        g, s = NL.int_gelu(z, torch.full((8,), 1e-3, device=META))
        return q, g, s

    guard, out = _guarded(run)
    guard.assert_clean()
    assert spy.calls == 0 and all(t.device == META for t in out)
    # the same operands on the CPU do reach the kernels (the spy is live: this test can fail)
    with pytest.raises(AssertionError, match="fused CPU kernel"):
        requant_clamp(torch.zeros(6, 8, dtype=f64), torch.full((8,), 2.0 ** 19, dtype=f64),
                      torch.full((8,), 30.0, dtype=f64), 8)
    assert spy.calls == 1


# -------------------------------------------------------------------------------- the model: train step and eval
MODES = {
    "w8a8": ["--quant-mode", "symmetric"],
    "w8a8_force_dequant": ["--quant-mode", "symmetric", "--force-dequant", "nonlinear"],
    "int_ternary": ["--quant-mode", "symmetric", "--weight-bits", "2", "--weight-quant-method", "twn"],
    "ternarybert_twn": ["--quant-mode", "ternarybert", "--weight-bits", "2", "--weight-quant-method", "twn"],
    "ternarybert_lat": ["--quant-mode", "ternarybert", "--weight-bits", "2", "--weight-quant-method", "lat"],
    "ternarybert_minmax": ["--quant-mode", "ternarybert", "--weight-bits", "2", "--act-range", "minmax"],
}


def _task(dictionary):
    labels = Dictionary()
    for lab in ("0", "1"):
        labels.add_symbol(lab)
    return SimpleNamespace(label_dictionary=labels, source_dictionary=dictionary)


def _meta_model(dictionary, extra, seed=0):
    return mh.build_model("ibert_roberta_tiny", dictionary, extra=extra, seed=seed).to(META)


def _meta_sample(dictionary, bsz=3, tgt_len=12):
    tokens = mh.random_batch(dictionary, bsz=bsz, tgt_len=tgt_len).to(META)
    return {"net_input": {"src_tokens": tokens, "src_lengths": torch.empty(bsz, dtype=torch.long, device=META)},
            "target": torch.empty(bsz, 1, dtype=torch.long, device=META), "ntokens": bsz * tgt_len,
            "nsentences": bsz}


@pytest.fixture(scope="module")
def dictionary():
    return mh.make_dictionary()


@pytest.mark.parametrize("mode", list(MODES))
def test_training_step_on_meta(dictionary, mode):
    """Forward, loss and backward of one training step (ranges, LayerNorm shifts and LAT curvature update) with
    the criterion the recipe uses: ``sentence_prediction`` for I-BERT QAT, ``ternary_distill`` (prediction and
    intermediate distillation from an FP teacher) for TernaryBERT."""
    model = _meta_model(dictionary, MODES[mode]).train()
    task = _task(dictionary)
    if mode.startswith("ternarybert"):
        teacher = _meta_model(dictionary, ["--quant-mode", "none"], seed=1)
        crit = TernaryDistillCriterion(TernaryDistillConfig(pred_distill=True, intermediate_distill=True), task,
                                       teacher=teacher)
    else:
        crit = SentencePredictionCriterion(SentencePredictionConfig(), task)
    sample = _meta_sample(dictionary)

    def step():
        loss, _, log = crit(model, sample)
        loss.backward()
        return loss

    guard, loss = _guarded(step)
    guard.assert_clean()
    assert loss.device == META
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.device == META for g in grads if g is not None)
    assert sum(g is not None for g in grads) > len(grads) // 2  # the backward reached the encoder
    if mode == "ternarybert_lat":  # the LAT curvature followed the weights onto the device
        lat = [m for m in model.modules() if hasattr(m, "lat_v")]
        assert lat and all(m.lat_v.device == META and m.lat_v.numel() > 0 for m in lat)


@pytest.mark.parametrize("mode", list(MODES))
def test_eval_forward_on_meta(dictionary, mode):
    """The quantized model's eval forward (frozen ranges) with every hidden state and attention score returned."""
    model = _meta_model(dictionary, MODES[mode]).eval()
    tokens = _meta_sample(dictionary)["net_input"]["src_tokens"]

    def forward():
        with torch.no_grad():
            return model(tokens, features_only=True, classification_head_name=HEAD, return_all_hiddens=True,
                         return_attn_scores=True)

    guard, out = _guarded(forward)
    guard.assert_clean()
    logits, extra = out
    assert logits.device == META and logits.shape == (3, 2)
    assert all(h.device == META for h in extra["inner_states"])


def test_packed_model_eval_forward_on_meta(dictionary):
    """A reloaded packed model (frozen ternary weights from :mod:`~ibert_plugin.quant.packing`) evaluates on meta."""
    from ibert_plugin.quant.packing import find_weight_quantizers, freeze_weight_quantizers

    model = mh.build_model("ibert_roberta_tiny", dictionary, extra=MODES["ternarybert_twn"])
    entries = {p: {"quantizer": q, "shape": list(model.get_parameter(p).shape)}
               for p, q in find_weight_quantizers(model).items()}
    assert entries
    model = freeze_weight_quantizers(model, entries).to(META).eval()
    tokens = _meta_sample(dictionary)["net_input"]["src_tokens"]

    def forward():
        with torch.no_grad():
            return model(tokens, features_only=True, classification_head_name=HEAD)

    guard, out = _guarded(forward)
    guard.assert_clean()
    assert out[0].device == META
