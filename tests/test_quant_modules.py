"""Modules: QuantAct ranges and requantization, QuantLinear / QuantEmbedding in every mode, float twins and
force_dequant equivalences, STE gradients, TernaryBERT activation quantizer, weight registry, state dicts."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ibert_plugin.quant import (
    DynamicActQuant,
    IntGELU,
    IntLayerNorm,
    IntSoftmax,
    QuantAct,
    QuantConfig,
    QuantEmbedding,
    QuantLinear,
    SymWeightQuantizer,
    build_weight_quantizer,
)
from ibert_plugin.quant.primitives import dyadic, quantize, symmetric_scale
from ibert_plugin.quant.weight import WeightQuantizer, register_weight_quantizer

SYM = QuantConfig(quant_mode="symmetric")
SYM_LN32 = SYM.replace(ln_var_bits=32)  # upstream's variance bound: 22-bit inputs of a few channels need a shift
NONE = QuantConfig()
TB = QuantConfig(quant_mode="ternarybert", weight_bits=2, weight_method="twn")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _is_int(t):
    return torch.equal(t, torch.round(t))


# ---------------------------------------------------------------------------------------------------------------
# QuantAct
# ---------------------------------------------------------------------------------------------------------------
def test_quant_act_first_call_init_ema_in_train_frozen_in_eval():
    act = QuantAct(8, SYM)
    assert act.x_min.shape == act.x_max.shape == (1,) and act.x_max.item() == 0
    x1 = torch.tensor([[-1.0, 0.5], [2.0, 0.0]])
    act.train()
    q, s = act(x1)
    assert act.x_min.item() == -1.0 and act.x_max.item() == 2.0  # first call copies
    assert torch.equal(s, torch.tensor([2.0]) / 127) and q.dtype == torch.float32 and _is_int(q)
    assert torch.equal(q, quantize(x1, s, 8))
    x2 = torch.tensor([-3.0, 4.0])
    act(x2)
    assert act.x_min.item() == pytest.approx(0.95 * -1 + 0.05 * -3)
    assert act.x_max.item() == pytest.approx(0.95 * 2 + 0.05 * 4)
    act.eval()
    before = (act.x_min.clone(), act.x_max.clone())
    q, s = act(torch.tensor([100.0, -100.0, 0.3]))
    assert torch.equal(act.x_min, before[0]) and torch.equal(act.x_max, before[1])
    assert q.tolist()[:2] == [127.0, -127.0] and torch.equal(s, symmetric_scale(*before, 8))


def test_quant_act_running_minmax_momentum():
    act = QuantAct(8, SYM.replace(act_momentum=-1)).train()
    act(torch.tensor([-1.0, 1.0]))
    act(torch.tensor([-0.5, 3.0]))
    assert (act.x_min.item(), act.x_max.item()) == (-1.0, 3.0)


def test_quant_act_requant_per_channel_equals_hand_computation():
    g = _gen(0)
    acc = torch.randint(-2**28, 2**28, (5, 3), generator=g).to(torch.float64)
    s_in = torch.tensor([1e-7, -2e-7, 3e-8])  # negative channel scale (e.g. after LayerNorm gamma < 0)
    act = QuantAct(8, SYM).train()
    q, s = act(acc, s_in)
    real = acc * s_in.double()
    assert act.x_min.item() == pytest.approx(real.min().item()) and act.x_max.item() == pytest.approx(real.max().item())
    for j in range(3):
        r = s_in[j].double() / s.double()
        mant, ex = torch.frexp(r)
        m = int(torch.sign(mant) * torch.floor(mant.abs() * 2**20 + 0.5))
        e = 20 - int(ex)
        expect = [max(-127, min(127, (int(z) * m + (1 << (e - 1))) >> e)) for z in acc[:, j].tolist()]
        assert q[:, j].tolist() == expect
    assert (q * s - real).abs().max() <= s.item() * 0.51


def test_quant_act_residual_identity_path_equals_hand_computation():
    g = _gen(1)
    acc = torch.randint(-2**25, 2**25, (4, 6), generator=g).to(torch.float64)
    s_acc = torch.rand(6, generator=g) * 1e-6 + 1e-7
    res = torch.randint(-127, 128, (4, 6), generator=g).float()
    s_res = torch.tensor([0.02])
    act = QuantAct(22, SYM).train()
    q, s = act(acc, s_acc, identity=res, identity_scale=s_res)
    real = acc * s_acc.double() + res.double() * s_res.double()
    assert act.x_max.item() == pytest.approx(real.max().item(), rel=1e-6)
    m, e = dyadic(s_acc.double() / s.double())
    m2, e2 = dyadic(s_res.double() / s.double())
    n = 2**21 - 1
    for i in range(4):
        for j in range(6):
            a = (int(acc[i, j]) * int(m[j]) + (1 << (int(e[j]) - 1))) >> int(e[j])
            b = (int(res[i, j]) * int(m2[0]) + (1 << (int(e2[0]) - 1))) >> int(e2[0])
            assert q[i, j].item() == max(-n, min(n, a + b))
    assert (q.double() * s.double() - real).abs().max() <= 2 * s.item()


def test_quant_act_mixed_real_and_quantized_operands_sum_reals():
    act = QuantAct(8, SYM).train()
    x = torch.tensor([0.5, -1.0, 2.0])
    idq, ids = torch.tensor([10.0, 20.0, -30.0]), torch.tensor([0.01])
    q, s = act(x, None, identity=idq, identity_scale=ids)
    assert torch.equal(q, quantize(x + idq * ids, s, 8))
    q2, s2 = act(idq, ids, identity=x)
    assert _is_int(q2) and s2.shape == (1,)


def test_quant_act_none_mode_is_identity_and_leaves_buffers():
    for cfg in (NONE, TB):
        act = QuantAct(8, cfg).train()
        x = torch.randn(3, 4)
        out, s = act(x)
        assert out is x and s is None
        out, s = act(torch.tensor([2.0]), torch.tensor([0.5]), identity=torch.tensor([1.0]))
        assert out.tolist() == [2.0] and s is None
        assert act.x_min.item() == 0 and act.x_max.item() == 0


def test_quant_act_gradient_straight_through():
    act = QuantAct(8, SYM).train()
    x = torch.randn(10, requires_grad=True)
    q, s = act(x)
    (q * s).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(10))


# ---------------------------------------------------------------------------------------------------------------
# QuantLinear
# ---------------------------------------------------------------------------------------------------------------
def test_quant_linear_none_mode_equals_nn_linear():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5)
    ql = QuantLinear(7, 5, cfg=NONE)
    ql.load_state_dict(lin.state_dict())
    x = torch.randn(3, 7)
    y, s = ql(x)
    assert s is None and torch.equal(y, lin(x))
    assert set(ql.state_dict()) == {"weight", "bias"}


def test_quant_linear_symmetric_is_exact_integer_accumulator():
    torch.manual_seed(1)
    ql = QuantLinear(16, 6, cfg=SYM)
    assert set(ql.state_dict()) == {"weight", "bias"}  # fairseq checkpoints load strictly
    x = torch.randn(4, 16)
    act = QuantAct(8, SYM).train()
    qx, sx = act(x)
    acc, s_acc = ql(qx, sx)
    assert acc.dtype == torch.float64 and s_acc.shape == (6,) and s_acc.dtype == torch.float32
    s_w = ql.weight.detach().abs().amax(1) / 127
    assert torch.equal(s_acc, s_w * sx)
    w_int = torch.round(ql.weight.detach() / s_w[:, None])
    b_int = torch.round(ql.bias.detach().double() / s_acc.double())
    expect = qx.to(torch.int64) @ w_int.to(torch.int64).t() + b_int.to(torch.int64)
    assert torch.equal(acc.to(torch.int64), expect)
    torch.testing.assert_close((acc * s_acc).float(), F.linear(qx * sx, ql.weight, ql.bias), atol=0.05, rtol=0.05)


def test_quant_linear_symmetric_rejects_real_or_per_channel_input():
    ql = QuantLinear(4, 3, cfg=SYM)
    with pytest.raises(ValueError, match="needs a quantized input"):
        ql(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"per-tensor input scale of shape \(1,\)"):
        ql(torch.ones(2, 4), torch.ones(4))


def test_quant_linear_ste_gradients_to_weight_and_bias():
    torch.manual_seed(2)
    ql = QuantLinear(12, 5, cfg=SYM)
    lin = nn.Linear(12, 5)
    lin.load_state_dict(ql.state_dict())
    x = torch.randn(6, 12)
    qx, sx = QuantAct(8, SYM).train()(x)
    w = torch.randn(6, 5)
    acc, s = ql(qx, sx)
    (acc * s * w).sum().backward()
    (lin(qx * sx) * w).sum().backward()
    torch.testing.assert_close(ql.bias.grad, lin.bias.grad)
    torch.testing.assert_close(ql.weight.grad, lin.weight.grad, rtol=1e-4, atol=1e-4)


def test_quant_linear_ternary_weights_in_symmetric_and_ternarybert_modes():
    torch.manual_seed(3)
    cfg = SYM.replace(weight_bits=2, weight_method="twn")
    ql = QuantLinear(10, 4, cfg=cfg)
    w_int, s_w = ql.weight_quantizer(ql.weight)
    assert set(w_int.unique().tolist()) <= {-1.0, 0.0, 1.0} and s_w.shape == (4,)
    qx, sx = QuantAct(8, cfg).train()(torch.randn(3, 10))
    acc, s = ql(qx, sx)
    assert _is_int(acc) and torch.equal(s, s_w * sx)
    # TernaryBERT: dynamic 8-bit input, ternary weights, float bias, real output
    tb = QuantLinear(10, 4, cfg=TB)
    tb.load_state_dict(ql.state_dict())
    x = torch.randn(3, 10, requires_grad=True)
    y, s = tb(x)
    assert s is None
    w_int, s_w = tb.weight_quantizer(tb.weight)
    xq, _ = DynamicActQuant(8, TB)(x)
    torch.testing.assert_close(y, F.linear(xq, w_int * s_w[:, None], tb.bias))
    y.sum().backward()
    assert tb.weight.grad is not None and tb.weight.grad.abs().sum() > 0 and x.grad is not None


# ---------------------------------------------------------------------------------------------------------------
# QuantEmbedding
# ---------------------------------------------------------------------------------------------------------------
def test_quant_embedding_modes():
    torch.manual_seed(4)
    ref = nn.Embedding(20, 8, padding_idx=1)
    ids = torch.tensor([[0, 1, 5], [19, 3, 1]])
    e = QuantEmbedding(20, 8, padding_idx=1, cfg=NONE)
    e.load_state_dict(ref.state_dict())
    out, s = e(ids)
    assert s is None and torch.equal(out, ref(ids))
    sym = QuantEmbedding(20, 8, padding_idx=1, cfg=SYM)
    sym.load_state_dict(ref.state_dict())
    q, s = sym(ids)
    s_ref = ref.weight.detach().abs().max() / 127
    assert s.shape == (1,) and torch.equal(s, s_ref.reshape(1))
    assert torch.equal(q, torch.round(ref.weight.detach() / s_ref)[ids]) and q.abs().max() <= 127
    (q * s).sum().backward()
    assert sym.weight.grad[5].abs().sum() > 0 and sym.weight.grad[2].abs().sum() == 0
    assert sym.weight.grad[1].abs().sum() == 0  # padding row


def test_quant_embedding_ternarybert_rowwise_equals_full_table_quantization():
    torch.manual_seed(5)
    emb = QuantEmbedding(30, 16, padding_idx=1, cfg=TB)
    ids = torch.tensor([[2, 7, 7, 29]])
    out, s = emb(ids)
    assert s is None
    w_int, scale = emb.weight_quantizer(emb.weight)  # whole table, row-wise
    assert scale.shape == (30,) and not torch.equal(scale[2], scale[7])
    torch.testing.assert_close(out, (w_int * scale[:, None])[ids], rtol=0, atol=0)
    emb8 = QuantEmbedding(30, 16, cfg=QuantConfig(quant_mode="ternarybert", weight_bits=8))
    out8, _ = emb8(ids)
    s8 = emb8.weight.detach().abs().amax(1) / 127
    torch.testing.assert_close(out8, (torch.round(emb8.weight.detach() / s8[:, None]) * s8[:, None])[ids])


# ---------------------------------------------------------------------------------------------------------------
# nonlinear modules: float twins and force_dequant
# ---------------------------------------------------------------------------------------------------------------
def test_float_modes_equal_fairseq_and_torch_twins():
    torch.manual_seed(6)
    x = torch.randn(2, 3, 5, 5)
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    p, s = IntSoftmax(NONE)(x, None, mask)
    ref = F.softmax(x.masked_fill(mask[:, None, None, :], float("-inf")).float(), dim=-1)
    assert s is None and torch.equal(p, ref)
    h = torch.randn(4, 9)
    y, s = IntGELU(NONE)(h)
    assert s is None and torch.equal(y, F.gelu(h.float()).type_as(h))
    ln = nn.LayerNorm(9)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2)
        ln.bias.normal_()
    iln = IntLayerNorm(9, cfg=NONE)
    iln.load_state_dict(ln.state_dict())
    assert set(iln.state_dict()) == {"weight", "bias"}
    y, s = iln(h)
    assert s is None and torch.equal(y, ln(h))


@pytest.mark.parametrize("fd", ["none", "gelu", "softmax", "layernorm", "nonlinear"])
def test_force_dequant_makes_each_op_equal_its_float_twin_only_when_selected(fd):
    torch.manual_seed(7)
    cfg = SYM.replace(force_dequant=fd)
    # GELU on a 32-bit accumulator with a fine per-channel scale
    acc = torch.randint(-2**14, 2**14, (4, 6)).double()
    s_acc = torch.full((6,), 2e-4)
    y, s = IntGELU(cfg)(acc, s_acc)
    twin = F.gelu((acc * s_acc).float())
    assert (s is None and torch.equal(y, twin)) == (fd in ("gelu", "nonlinear"))
    if s is not None:
        assert (y * s - twin).abs().max() < 0.03
    # softmax on integer scores
    sc = torch.randint(-3000, 3000, (1, 2, 3, 7)).float()
    s_sc = torch.tensor([1e-3])
    p, s = IntSoftmax(cfg)(sc, s_sc)
    twin = F.softmax((sc * s_sc).float(), -1)
    assert (s is None and torch.equal(p, twin)) == (fd in ("softmax", "nonlinear"))
    if s is not None:
        assert (p * s - twin).abs().max() <= 1 / 256
    # LayerNorm on a 22-bit residual sum
    ln = IntLayerNorm(6, cfg=cfg)
    qx = torch.randint(-2**20, 2**20, (3, 6)).float()
    s_x = torch.tensor([1e-5])
    y, s = ln(qx, s_x)
    twin = F.layer_norm(qx * s_x, (6,), ln.weight, ln.bias, ln.eps)
    assert (s is None and torch.equal(y, twin)) == (fd in ("layernorm", "nonlinear"))
    if s is not None:
        assert (y * s - twin).abs().max() < 1e-3
    # QuantAct and QuantLinear stay quantized whatever force_dequant says
    assert QuantAct(8, cfg)(torch.randn(3))[1] is not None


def test_integer_modules_reject_real_inputs():
    for mod, args in ((IntGELU(SYM), (torch.randn(2, 3),)), (IntSoftmax(SYM), (torch.randn(1, 1, 2, 3),)),
                      (IntLayerNorm(3, cfg=SYM), (torch.randn(2, 3),))):
        with pytest.raises(ValueError, match="needs a quantized input"):
            mod(*args)


def test_int_layernorm_module_default_bound_needs_no_shift_for_22_bit_inputs():
    q = torch.round(torch.randn(4, 768) * 2**20).clamp(-2**21 + 1, 2**21 - 1)
    ln = IntLayerNorm(768, cfg=SYM).train()
    ln(q, torch.tensor([1e-6]))
    assert ln.shift.item() == 0
    ln32 = IntLayerNorm(768, cfg=SYM_LN32).train()
    ln32(q, torch.tensor([1e-6]))
    assert ln32.shift.item() >= 6  # sqrt(768 * 2^40) ~ 2^24.8 must come below 2^16
    with pytest.raises(ValueError, match="ln_var_bits"):
        SYM.replace(ln_var_bits=53)


def test_int_layernorm_module_shift_grows_in_train_frozen_in_eval_and_ste_to_gamma_beta():
    torch.manual_seed(8)
    ln = IntLayerNorm(32, cfg=SYM_LN32)
    assert "shift" in ln.state_dict()
    q = torch.round(torch.randn(4, 32) * 2**20).clamp(-2**21 + 1, 2**21 - 1)
    s = torch.tensor([1e-6])
    ln.eval()
    ln(q, s)
    assert ln.shift.item() == 0
    ln.train()
    y, s_out = ln(q, s)
    assert ln.shift.item() > 0
    w = torch.randn(4, 32)
    (y * s_out * w).sum().backward()
    ref = nn.LayerNorm(32, eps=0.0)
    ref.load_state_dict({k: v for k, v in ln.state_dict().items() if k != "shift"})
    (ref(q * s) * w).sum().backward()
    torch.testing.assert_close(ln.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ln.weight.grad, ref.weight.grad, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------------------------
# DynamicActQuant
# ---------------------------------------------------------------------------------------------------------------
def test_dynamic_act_quant_clip_grid_and_ste():
    x = torch.tensor([-4.0, -1.0, 0.0, 0.7, 2.5, 3.0], requires_grad=True)
    y, s = DynamicActQuant(8, TB)(x)
    assert s is None
    grid = 127 / 2.5
    torch.testing.assert_close(y.detach(), torch.round(x.detach().clamp(-2.5, 2.5) * grid) / grid)
    y.sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 0, 0]  # zeroed at and beyond the clip (upstream)
    mm = DynamicActQuant(8, TB.replace(act_range="minmax"))
    x = torch.tensor([-1.0, 0.25, 3.0], requires_grad=True)
    y, _ = mm(x)
    assert torch.allclose(y, x.detach(), atol=4 / 255 / 2 + 1e-6) and y[0].item() == -1.0
    y.sum().backward()
    assert x.grad.tolist() == [1, 1, 1]
    t = torch.randn(3)
    out, s = DynamicActQuant(8, SYM)(t, None)
    assert out is t and s is None


@pytest.mark.parametrize("clip, spread", [(2.5, 4.0), (10.0, 1.0)])
def test_dynamic_act_quant_is_upstreams_formula_bit_for_bit(clip, spread):
    """TernaryBERT's SymQuantizer written out (clamp, n / max|x_c|, round, divide; gradient 1 strictly inside the
    clip) against the module on a (B, H, T, T)-sized tensor, some of it beyond the clip (first case) or none (second:
    the scale then comes from max|x| itself)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 40, 40, generator=g) * spread).requires_grad_()
    clips = spread * 3 > clip
    if clips:  # values exactly at the clip are outside (strict inequalities, as upstream)
        x.data[0, 0, 0, :3] = torch.tensor([clip, -clip, 0.0])
    upstream_grad = torch.randn(x.shape, generator=g)
    y, _ = DynamicActQuant(8, TB.replace(clip_val=clip))(x)
    y.backward(upstream_grad)
    xd = x.detach()
    xc = xd.clamp(-clip, clip)
    s = 127 / xc.abs().max()
    assert torch.equal(y.detach(), torch.round(xc * s) / s)
    inside = (xd > -clip) & (xd < clip)
    assert torch.equal(x.grad, upstream_grad * inside.float())
    assert clips == bool((~inside).any()) and (not clips or x.grad[0, 0, 0, :2].eq(0).all())


# ---------------------------------------------------------------------------------------------------------------
# weight quantizers and registry
# ---------------------------------------------------------------------------------------------------------------
def test_sym_weight_quantizer_and_registry():
    w = torch.randn(5, 9, requires_grad=True)
    q = build_weight_quantizer(QuantConfig(weight_bits=4))
    assert isinstance(q, SymWeightQuantizer) and q.bits == 4 and q.per_channel
    w_int, scale = q(w)
    assert scale.shape == (5,) and scale.dtype == torch.float32 and w_int.abs().max() <= 7 and _is_int(w_int)
    (w_int * scale[:, None]).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(5, 9))
    pt = SymWeightQuantizer(8, per_channel=False)
    _, s = pt(w)
    assert s.shape == (5,) and bool((s == s[0]).all())
    with pytest.raises(ValueError, match="unknown weight quantizer 'nope'"):
        build_weight_quantizer(QuantConfig(), method="nope")
    tw = build_weight_quantizer(QuantConfig(weight_bits=2, weight_method="twn"))
    assert tw.bits == 2

    @register_weight_quantizer("test_dummy")
    class Dummy(WeightQuantizer):
        def __init__(self, cfg=None, rowwise=False):
            super().__init__()
            self.rowwise = rowwise

        def forward(self, weight):
            return torch.sign(weight), weight.new_ones(weight.shape[0])

    assert isinstance(build_weight_quantizer(QuantConfig(), rowwise=True, method="test_dummy"), Dummy)
    with pytest.raises(ValueError, match="already registered"):
        register_weight_quantizer("test_dummy")(SymWeightQuantizer)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------
def test_state_dict_round_trip_of_quantization_buffers():
    torch.manual_seed(9)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = QuantAct(8, SYM)
            self.fc = QuantLinear(8, 8, cfg=SYM)
            self.res = QuantAct(22, SYM)
            self.ln = IntLayerNorm(8, cfg=SYM_LN32)

        def forward(self, x):
            q, s = self.act(x)
            y, sy = self.res(*self.fc(q, s), identity=q, identity_scale=s)
            return self.ln(y, sy)

    a = Block().train()
    for _ in range(3):
        a(torch.randn(5, 8) * 1000)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert {"act.x_min", "act.x_max", "res.x_min", "res.x_max", "ln.shift"} <= set(sd)
    b = Block()
    b.load_state_dict(sd, strict=True)
    a.eval()
    b.eval()
    x = torch.randn(4, 8) * 1000
    qa, sa = a(x)
    qb, sb = b(x)
    assert torch.equal(qa, qb) and torch.equal(sa, sb)
    assert a.ln.shift.item() > 0 and torch.equal(a.ln.shift, b.ln.shift)


# ---------------------------------------------------------------------------------------------------------------
# exact attention at every activation width the config allows in symmetric mode
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_bits", [8, 12, 13])
def test_symmetric_attention_matmuls_are_exact_at_every_allowed_width(act_bits):
    """Scores and context equal int64 matmuls of the QuantAct integers (plain float32 GEMMs are not exact beyond
    8 bits: 12-bit q.k^T partial sums reach 2^28)."""
    from ibert_plugin.models.ibert_roberta import QuantSelfAttention

    torch.manual_seed(0)
    cfg = QuantConfig(quant_mode="symmetric", act_bits=act_bits)
    att = QuantSelfAttention(32, 2, 0.0, cfg)
    for lin in (att.q_proj, att.k_proj, att.v_proj):
        lin.weight.data *= 20
    act = QuantAct(act_bits, cfg)
    x = torch.randn(40, 2, 32) * 3
    seen = {}
    att.softmax.register_forward_pre_hook(lambda m, a: seen.__setitem__("scores", a[0]))
    att.attn_act.register_forward_pre_hook(lambda m, a: seen.__setitem__("ctx", a[0]))
    for name in ("q_act", "k_act", "v_act"):
        getattr(att, name).register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, o[0]))
    att.softmax.register_forward_hook(lambda m, a, o: seen.__setitem__("p", o[0]))
    att.train()
    act.train()
    att(*act(x), None)
    att.eval()
    act.eval()
    att(*act(x), None)

    def heads(t):  # T x B x C -> B x H x T x D, int64
        return t.reshape(40, 2, 2, 16).permute(1, 2, 0, 3).to(torch.int64)

    q, k, v = heads(seen["q_act"]), heads(seen["k_act"]), heads(seen["v_act"])
    assert q.abs().max() > 2 ** (act_bits - 2)  # wide operands indeed
    assert torch.equal(seen["scores"].to(torch.int64), q @ k.transpose(-1, -2))
    ctx = (seen["p"].to(torch.int64) @ v).permute(2, 0, 1, 3).reshape(40, 2, 32)
    assert torch.equal(seen["ctx"].to(torch.int64), ctx)


def test_config_refuses_symmetric_activations_that_cannot_be_exact():
    with pytest.raises(ValueError, match="act_bits 14 is not supported in symmetric mode"):
        QuantConfig(quant_mode="symmetric", act_bits=14)
    QuantConfig(quant_mode="ternarybert", act_bits=16)  # fake quantization: no integer GEMM
    from ibert_plugin.quant.primitives import exact_int_matmul

    with pytest.raises(ValueError, match="cannot be exact"):
        exact_int_matmul(torch.ones(2, 3), torch.ones(4, 3), a_bits=14, b_bits=14)
