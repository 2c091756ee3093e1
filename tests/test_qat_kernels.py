"""The fused CPU QAT kernels (``quant/qat_kernels.cpp``) against the PyTorch reference path they replace
(``IBERT_QAT_KERNELS=0``): the same integers bit for bit, from the primitive up to a whole model's training step."""
import pytest
import torch

import model_helpers as mh
from ibert_plugin.quant import fused
from ibert_plugin.quant import nonlinear as NL
from ibert_plugin.quant.primitives import dyadic, requant_clamp

f64 = torch.float64


@pytest.fixture(scope="module")
def kernels():
    k = fused.load()
    assert k is not None, f"fused QAT kernels did not build: {fused.error()}"
    return k


class _Counting:
    """The kernel module, counting its calls."""

    def __init__(self, mod):
        self.mod, self.calls = mod, 0

    def __getattr__(self, name):
        fn = getattr(self.mod, name)

        def counted(*a):
            self.calls += 1
            return fn(*a)
        return counted


def _both(monkeypatch, fn):
    """``fn()`` on the fused path (which must run), then on the PyTorch reference path (which must not call it)."""
    spy = _Counting(fused.load())
    monkeypatch.setattr(fused, "_MOD", spy)
    fast = fn()
    assert spy.calls > 0
    n = spy.calls
    monkeypatch.setenv("IBERT_QAT_KERNELS", "0")
    assert fused.usable(torch.zeros(1)) is None
    ref = fn()
    assert spy.calls == n
    monkeypatch.delenv("IBERT_QAT_KERNELS")
    return fast, ref


def _ratios(g, n, lo, hi):
    """Dyadic (m, e) of log-uniform ratios in [2^lo, 2^hi]."""
    return dyadic(torch.exp2(torch.rand(n, generator=g, dtype=f64) * (hi - lo) + lo))


@pytest.mark.parametrize("bits", [8, 22])
@pytest.mark.parametrize("z_bits,ratio_range", [(31, (-40, -20)), (50, (-60, -35)), (51, (-95, -25)), (20, (-10, 5)),
                                                  (12, (18, 40)), (45, (20, 22))])
def test_requant_clamp_matches_reference(kernels, monkeypatch, bits, z_bits, ratio_range):
    """Integer accumulators up to 2^50 (i-GELU outputs), fine and coarse ratios (shifts up to the cap, lifted
    multipliers at e = 1), per-channel and per-tensor constants, saturation, with and without a residual operand of
    the other dtype; the fused result is a fresh float32 tensor equal to the reference's."""
    g = torch.Generator().manual_seed(z_bits + bits)
    C = 37
    z = torch.randint(-2 ** z_bits, 2 ** z_bits, (5, 11, C), generator=g).to(f64)
    z[0, 0, :4] = torch.tensor([0.0, 1.0, -1.0, float(2 ** z_bits - 1)])
    m, e = _ratios(g, C, *ratio_range)
    m1, e1 = _ratios(g, 1, *ratio_range)
    z_id = torch.randint(-2 ** 20, 2 ** 20, (5, 11, C), generator=g).float()
    mi, ei = _ratios(g, 1, -12, 0)
    for args in ((z, m, e), (z, m1, e1), (z, m, e, bits, z_id, mi, ei), (z_id, m1, e1), (z_id, m, e, bits, z, m1, e1)):
        call = (lambda a=args: requant_clamp(*a)) if len(args) > 3 else (lambda a=args: requant_clamp(*a, bits))
        fast, ref = _both(monkeypatch, call)
        assert fast.dtype == ref.dtype == torch.float32
        assert torch.equal(fast, ref)
    sat = requant_clamp(z, m, e, bits)
    assert float(sat.abs().max()) <= 2 ** (bits - 1) - 1


def test_requant_clamp_non_integer_inputs(kernels, monkeypatch):
    """Training-time dropout makes carriers non-integer: float64 ones are rounded half to even first, float32 ones
    by the dyadic rounding itself, as in the reference."""
    g = torch.Generator().manual_seed(3)
    C = 16
    z64 = torch.randint(-2 ** 30, 2 ** 30, (40, C), generator=g).to(f64) / 0.9
    z64[0, :3] = torch.tensor([2.5, 3.5, -2.5])
    z32 = (torch.randint(-2 ** 14, 2 ** 14, (40, C), generator=g).float() / 0.9)
    m, e = _ratios(g, C, -30, -2)
    m2, e2 = _ratios(g, C, -8, 2)
    for z, mm, ee in ((z64, m, e), (z32, m2, e2)):
        fast, ref = _both(monkeypatch, lambda: requant_clamp(z, mm, ee, 22))
        assert torch.equal(fast, ref)


def test_requant_clamp_falls_back_off_the_fast_path(kernels):
    """A non-contiguous operand takes the reference path (same numbers); the gradient is the STE either way."""
    g = torch.Generator().manual_seed(4)
    z = torch.randint(-2 ** 30, 2 ** 30, (12, 8), generator=g).to(f64)
    m, e = _ratios(g, 12, -30, -20)
    zt = z.t()
    assert not zt.is_contiguous() and fused.usable(zt) is None
    assert torch.equal(requant_clamp(zt, m, e, 8), requant_clamp(zt.contiguous(), m, e, 8))
    zg = z.clone().requires_grad_()
    requant_clamp(zg, m[:8], e[:8], 8).sum().backward()
    assert torch.allclose(zg.grad, (m[:8] * torch.exp2(-e[:8])).expand(12, 8))


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_int_gelu_matches_reference(kernels, monkeypatch, per_channel, dtype):
    """i-GELU outputs and gradients on 32-bit accumulators (float32 ones below 2^24) at accumulator scales from 1e-9
    to 1e-1, including zero and the saturated erf."""
    g = torch.Generator().manual_seed(5)
    C = 29
    hi = 2 ** 31 if dtype == f64 else 2 ** 23
    q = torch.randint(-hi, hi, (7, 13, C), generator=g).to(dtype)
    q[0, 0, :3] = torch.tensor([0.0, 1.0, -1.0], dtype=dtype)
    s = torch.exp(torch.rand(C if per_channel else 1, generator=g) * (torch.log(torch.tensor(1e-1)) -
                                                                       torch.log(torch.tensor(1e-9)))) * 1e-9

    def run():
        x = q.clone().requires_grad_()
        y, s_out = NL.int_gelu(x, s)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
        return y.detach(), s_out, x.grad

    (y1, s1, g1), (y2, s2, g2) = _both(monkeypatch, run)
    assert y1.dtype == y2.dtype == f64
    assert torch.equal(y1, y2) and torch.equal(s1, s2) and torch.equal(g1, g2)
    with torch.no_grad():
        assert torch.equal(NL.int_gelu(q, s)[0], y1)  # the forward without the derivative


def test_model_training_step_identical_with_and_without_kernels(kernels, monkeypatch):
    """A symmetric-mode model: eval logits, the training loss and every parameter's gradient (dropout off) and the
    activation ranges the step updates are identical on both paths."""
    d = mh.make_dictionary()
    tokens = mh.random_batch(d, bsz=4, tgt_len=14, seed=1)

    def run():
        model = mh.build_model("ibert_roberta", d, extra=mh.TINY_DIMS + ["--quant-mode", "symmetric", "--dropout", "0",
                                                                          "--attention-dropout", "0"])
        model.train()
        out = model(tokens, classification_head_name="sentence_classification_head")[0]
        loss = out.float().pow(2).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        ranges = {n: b.clone() for n, b in model.named_buffers()}
        model.eval()
        with torch.no_grad():
            logits = model(tokens, classification_head_name="sentence_classification_head")[0]
        return loss.detach(), grads, ranges, logits

    (l1, g1, r1, o1), (l2, g2, r2, o2) = _both(monkeypatch, run)
    assert torch.equal(l1, l2) and torch.equal(o1, o2)
    assert g1.keys() == g2.keys() and len(g1) > 20
    assert all(torch.equal(g1[n], g2[n]) for n in g1)
    assert all(torch.equal(r1[n], r2[n]) for n in r1)
