"""TWN / LAT ternary weight quantizers (TernaryBERT): values, formulas, granularity, guards, STE, LAT curvature."""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ibert_plugin.quant.config import QuantConfig
from ibert_plugin.quant.ternary import (
    LATWeightQuantizer,
    TWNWeightQuantizer,
    lat_ternarize,
    twn_ternarize,
)

LAT_CFG = QuantConfig(weight_bits=2, weight_method="lat", lat_beta2=0.98, lat_eps=1e-6)


def Cfg():  # noqa: N802  (the one QuantConfig, LAT fields set away from their defaults)
    return LAT_CFG


def _dequant(w_int, scale):
    return w_int * scale.reshape(-1, 1)


def test_twn_layerwise_values_and_formulas_by_hand():
    w = torch.tensor([[0.1, -0.9, 0.5, 0.0], [1.2, -0.2, -0.6, 0.3]])
    w_int, scale = TWNWeightQuantizer(Cfg())(w)
    # hand: mean|w| = 3.8 / 8 = 0.475, Delta = 0.3325; above: 0.9, 0.5, 1.2, 0.6 -> alpha = 3.2 / 4 = 0.8
    assert torch.equal(w_int, torch.tensor([[0.0, -1, 1, 0], [1, 0, -1, 0]]))
    assert scale.shape == (2,) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, torch.full((2,), 0.8), rtol=0, atol=1e-7)
    vals = set(_dequant(w_int, scale).unique().tolist())
    assert vals <= {-scale[0].item(), 0.0, scale[0].item()}


def test_twn_rowwise_matches_per_row_numpy():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 13, generator=g)
    w_int, scale = TWNWeightQuantizer(Cfg(), rowwise=True)(w)
    wn = w.clamp(-2.5, 2.5).numpy()  # clipped first, as upstream
    for r in range(7):
        a = np.abs(wn[r])
        delta = 0.7 * a.mean()
        mask = a > delta
        np.testing.assert_allclose(scale[r].item(), a[mask].mean(), rtol=1e-6)
        np.testing.assert_array_equal(w_int[r].numpy(), np.sign(wn[r]) * mask)
    assert len(set(scale.tolist())) == 7  # per row, unlike layer-wise
    lw_int, lscale = TWNWeightQuantizer(Cfg())(w)
    assert len(set(lscale.tolist())) == 1 and lscale.shape == (7,)
    assert set(w_int.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_all_zero_row_gives_zero_alpha_no_nan():
    w = torch.randn(4, 16)
    w[2] = 0.0
    for q in (TWNWeightQuantizer(Cfg(), rowwise=True), LATWeightQuantizer(Cfg(), rowwise=True)):
        w_int, scale = q(w)
        assert torch.isfinite(scale).all() and torch.isfinite(w_int).all()
        assert scale[2] == 0 and (w_int[2] == 0).all()
    b, alpha = lat_ternarize(w, torch.rand(4, 16) + 0.1, rowwise=True)
    assert alpha[2] == 0 and torch.isfinite(alpha).all()
    b, alpha = twn_ternarize(torch.zeros(3, 5))
    assert alpha == 0 and (b == 0).all()


def test_clip_before_ternarize_and_ste_gradient_zero_outside_clip():
    w = torch.tensor([[3.0, -4.0, 0.5, -0.5, 2.4, 2.5, -2.5, 0.01]], requires_grad=True)
    q = TWNWeightQuantizer(Cfg())
    w_int, scale = q(w)
    # clipped: |w| = 2.5, 2.5, .5, .5, 2.4, 2.5, 2.5, .01 -> mean 1.61, Delta 1.127 -> alpha = (2.5*4 + 2.4) / 5
    torch.testing.assert_close(scale, torch.tensor([12.4 / 5]), rtol=1e-6, atol=0)
    assert not scale.requires_grad
    upstream = torch.arange(1.0, 9.0).reshape(1, 8)
    (_dequant(w_int, scale) * upstream).sum().backward()
    expected = torch.where(w.detach().abs() < 2.5, upstream, torch.zeros_like(upstream))
    torch.testing.assert_close(w.grad, expected, rtol=1e-6, atol=1e-6)
    assert w.grad[0, 0] == 0 and w.grad[0, 1] == 0 and w.grad[0, 5] == 0 and w.grad[0, 6] == 0


def test_lat_falls_back_to_twn_before_any_gradient():
    w = torch.randn(5, 9)
    a, sa = TWNWeightQuantizer(Cfg())(w)
    b, sb = LATWeightQuantizer(Cfg())(w)
    assert torch.equal(a, b) and torch.equal(sa, sb)


def _alternating_numpy(w, d, iters=50):
    """Unweighted/weighted reference of the LAT alternation, started from TWN."""
    a = np.abs(w)
    b = (a > 0.7 * a.mean()).astype(np.float64)
    for _ in range(iters):
        alpha = (d * a * b).sum() / (d * b).sum()
        b = (a > alpha / 2).astype(np.float64)
    return np.sign(w) * b, (d * a * b).sum() / (d * b).sum()


def test_lat_uniform_curvature_is_the_l2_fixed_point_and_scale_invariant():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 10, generator=g)
    ref_b, ref_alpha = _alternating_numpy(w.double().numpy(), np.ones((6, 10)))
    for c in (1e-3, 1.0, 7.0):
        b, alpha = lat_ternarize(w, torch.full_like(w, c), iters=20)
        np.testing.assert_array_equal(b.numpy(), ref_b)
        np.testing.assert_allclose(alpha.item(), ref_alpha, rtol=1e-6)
    # a weight where TWN already is the fixed point: LAT == TWN exactly
    w2 = torch.tensor([[1.0, 1.0, -1.0, -1.0, 0.1, -0.1]])
    tb, ta = twn_ternarize(w2)
    lb, la = lat_ternarize(w2, torch.full_like(w2, 3.0))
    assert torch.equal(tb, lb) and torch.equal(ta, la) and ta.item() == pytest.approx(1.0)


def test_lat_alpha_moves_toward_high_curvature_weights():
    w = torch.tensor([[1.0, 1.0, 2.0, 2.0, 0.05, -0.05, 0.02, 0.0]])
    _, uniform = lat_ternarize(w, torch.ones_like(w))
    d_big = torch.tensor([[1.0, 1.0, 100.0, 100.0, 1.0, 1.0, 1.0, 1.0]])
    d_small = torch.tensor([[100.0, 100.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    _, toward_two = lat_ternarize(w, d_big)
    _, toward_one = lat_ternarize(w, d_small)
    assert uniform.item() == pytest.approx(1.5)
    assert toward_two.item() > 1.9 and toward_one.item() < 1.1
    # row-wise: each row follows its own curvature
    W = torch.cat([w, w])
    _, rows = lat_ternarize(W, torch.cat([d_big, d_small]), rowwise=True)
    assert rows[0] > 1.9 and rows[1] < 1.1


def test_lat_second_moment_is_adams_uncorrected_v():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 6))
    ref = torch.nn.Parameter(w.detach().clone())
    q = LATWeightQuantizer(Cfg())
    opt = torch.optim.Adam([ref], lr=0.0, betas=(0.9, 0.98))
    for step in range(3):
        target = torch.randn(4, 6)
        w_int, scale = q(w)
        loss = ((_dequant(w_int, scale) - target) ** 2).sum()
        w.grad = None
        loss.backward()
        ref.grad = w.grad.clone()
        opt.step()
        torch.testing.assert_close(q.lat_v, opt.state[ref]["exp_avg_sq"], rtol=1e-6, atol=1e-9)
    assert int(q.lat_steps) == 3
    w_int, scale = q(w)  # now loss-aware: consistent with the closed form on the stored curvature
    b, alpha = lat_ternarize(w.detach().clamp(-2.5, 2.5), q.lat_v.sqrt() + 1e-6, iters=5)
    assert torch.equal(w_int.detach(), b) and torch.equal(scale, alpha.expand(4))
    assert set(w_int.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_lat_buffers_round_trip_through_state_dict():
    w = torch.nn.Parameter(torch.randn(3, 4))
    q = LATWeightQuantizer(Cfg(), rowwise=True)
    w_int, s = q(w)
    (_dequant(w_int, s).sum()).backward()
    q2 = LATWeightQuantizer(Cfg(), rowwise=True)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.lat_v, q.lat_v) and int(q2.lat_steps) == 1
    a, sa = q(w.detach())
    b, sb = q2(w.detach())
    assert torch.equal(a, b) and torch.equal(sa, sb)


def test_registry_builds_twn_and_lat():
    from ibert_plugin.quant import weight

    assert isinstance(weight.build_weight_quantizer(QuantConfig(weight_bits=2, weight_method="twn")),
                      TWNWeightQuantizer)
    assert isinstance(weight.build_weight_quantizer(LAT_CFG), LATWeightQuantizer)
    assert {"sym", "twn", "lat"} <= set(weight.available_weight_quantizers())


def test_lat_takes_beta2_and_eps_from_the_optimizer_flags():
    from argparse import Namespace

    ns = Namespace(quant_mode="ternarybert", weight_bits=2, weight_quant_method="lat", optimizer="adam",
                   adam_betas="(0.9, 0.999)", adam_eps=1e-6)
    q = LATWeightQuantizer(QuantConfig.from_namespace(ns))
    assert (q.beta2, q.eps) == (0.999, 1e-6)
    ns.adam_betas, ns.adam_eps = "(0.9,0.98)", 1e-8
    q = LATWeightQuantizer(QuantConfig.from_namespace(ns))
    assert (q.beta2, q.eps) == (0.98, 1e-8)
    q = LATWeightQuantizer(QuantConfig.from_namespace(Namespace(weight_bits=2)))  # no optimizer flags: defaults
    assert (q.beta2, q.eps, q.iters) == (0.999, 1e-8, 5)
    with pytest.raises(ValueError, match="lat_beta2"):
        QuantConfig(lat_beta2=1.0)


class _ScalarReads(TorchDispatchMode):
    """Counts device-to-host scalar reads (``.item()``, ``int(tensor)``, ``if tensor:``)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rowwise", [False, True])
def test_lat_forward_and_backward_read_no_scalar_and_register_no_hook(rowwise):
    w = torch.nn.Parameter(torch.randn(6, 8))
    q = LATWeightQuantizer(Cfg(), rowwise=rowwise)
    for _ in range(2):  # before and after the first gradient (TWN, then loss-aware)
        with _ScalarReads() as mode:
            w_int, scale = q(w)
            _dequant(w_int, scale).pow(2).sum().backward()
        assert mode.reads == 0
        assert not w._backward_hooks
    assert int(q.lat_steps) == 2


def test_rowwise_twn_is_row_independent():
    """Quantizing gathered rows (embedding lookup path) gives the full table's rows bit for bit."""
    g = torch.Generator().manual_seed(3)
    table = torch.randn(50, 24, generator=g)
    q = TWNWeightQuantizer(Cfg(), rowwise=True)
    full_int, full_scale = q(table)
    ids = torch.tensor([7, 3, 3, 49, 0])
    part_int, part_scale = q(table[ids])
    assert torch.equal(part_int, full_int[ids]) and torch.equal(part_scale, full_scale[ids])


@pytest.mark.parametrize("method", ["twn", "lat"])
def test_quant_linear_row_granularity_ternarizes_each_output_row_alone(method):
    """``ternary_linear="row"``: a Linear's row r gets TWN's alpha of row r alone (checked in NumPy), in the fake-quant
    forward and in the integer form (per-channel accumulator scale alpha_r * S_in); "tensor" keeps one alpha."""
    from ibert_plugin.quant.modules import QuantLinear

    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 20, generator=g) * torch.logspace(-1, 0.3, 6).reshape(-1, 1)  # rows of different spread
    for mode in ("ternarybert", "symmetric"):
        row = QuantLinear(20, 6, cfg=QuantConfig(quant_mode=mode, weight_bits=2, weight_method=method,
                                                 ternary_linear="row"))
        tensor = QuantLinear(20, 6, cfg=QuantConfig(quant_mode=mode, weight_bits=2, weight_method=method))
        for m in (row, tensor):
            m.weight.data.copy_(w)
        w_int, scale = row.weight_quantizer(row.weight)
        wn = w.clamp(-2.5, 2.5).numpy()  # clipped at clip_val first
        for r in range(6):
            a = np.abs(wn[r])
            mask = a > 0.7 * a.mean()
            np.testing.assert_allclose(scale[r].item(), a[mask].mean(), rtol=1e-6)
            np.testing.assert_array_equal(w_int[r].detach().numpy(), np.sign(wn[r]) * mask)
        assert len(set(tensor.weight_quantizer(tensor.weight)[1].tolist())) == 1
        if mode == "symmetric":
            s_in = torch.tensor([0.05])
            form = row.int_form(s_in)
            torch.testing.assert_close(form.s_acc, scale.float() * 0.05, rtol=1e-6, atol=0)
            assert set(form.w_int.unique().tolist()) <= {-1, 0, 1} and form.w_bits == 2
