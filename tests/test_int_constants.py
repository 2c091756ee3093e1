"""Every constant the engine compiles equals the one the QAT forward actually used (50-seed sweep).

The QAT side is recorded, not recomputed: during an eval forward of the calibrated model, the arguments of the integer
kernels the modules call (``requant_clamp``'s dyadic ``(m, e)``, ``exact_int_matmul``'s integer weights and 32-bit
bias, the i-GELU / i-exp / IntLayerNorm constants handed to their autograd functions) and every module's output scale
are captured per module; the compiled :class:`~ibert_plugin.engine.intmodel.IntModel` must hold exactly those values
(``torch.equal``). Models: tiny ``ibert_roberta`` (2 x 64) with ``model_helpers.perturb`` (non-zero and large
biases, gamma of both signs and exact zeros, beta, log-normal channel scales; some FC1 accumulator scales near
1e-6), calibrated on padded batches of mixed lengths, 8-bit / 7-bit / ternary weights by seed. Every fifth seed also
checks that the engine's logits equal the QAT model's exactly (the head input ``float(q * S)`` on both sides).
"""
import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_helpers as mh  # noqa: E402
from ibert_plugin.engine import convert  # noqa: E402
from ibert_plugin.engine.engine import IntegerEngine  # noqa: E402
from ibert_plugin.quant import modules as QM  # noqa: E402
from ibert_plugin.quant import nonlinear as NL  # noqa: E402

SEEDS = range(50)
WIDTHS = ("8", "7", "2")


class _Recorder:
    """Captures, per QAT module, the integer constants its forward hands to the kernels (eval forward)."""

    def __init__(self, model, monkeypatch):
        self.rec, self.current = {}, []
        enc = model.encoder.sentence_encoder
        self.hooks = []
        for name, mod in enc.named_modules():
            if isinstance(mod, QM.QUANT_MODULE_TYPES):
                self.hooks.append(mod.register_forward_pre_hook(self._pre(name)))
                self.hooks.append(mod.register_forward_hook(self._post(name)))
        self._wrap(monkeypatch, QM, "requant_clamp", lambda a: {"m": a[1], "e": a[2], "m_id": a[5], "e_id": a[6]})
        self._wrap(monkeypatch, QM, "exact_int_matmul", lambda a, kw: {"w_int": a[1], "b_int": kw.get("bias")},
                   kwargs=True)
        self._wrap_apply(monkeypatch, NL._IntGELU, lambda a: {"shift": a[1], "b_int": a[2], "c_int": a[3],
                                                               "one": a[4]})
        self._wrap_apply(monkeypatch, NL._IntSoftmax, lambda a: {"exp": NL.ExpConstants(a[2], a[3], a[4], a[5])})
        self._wrap_apply(monkeypatch, NL._IntLayerNorm, lambda a: {"shift": int(a[3]), "b_int": a[4].b_int})

    def _pre(self, name):
        def hook(mod, args):
            self.current.append(name)
            self.rec.setdefault(name, {})["in_scale"] = args[1] if len(args) > 1 else None
        return hook

    def _post(self, name):
        def hook(mod, args, out):
            self.current.pop()
            self.rec[name]["out_scale"] = out[1]
        return hook

    def _store(self, values):
        if self.current:
            self.rec[self.current[-1]].update({k: v.detach().clone() if torch.is_tensor(v) else v
                                               for k, v in values.items()})

    def _wrap(self, mp, mod, fn_name, pick, kwargs=False):
        orig = getattr(mod, fn_name)

        def wrapped(*a, **kw):
            self._store(pick(a, kw) if kwargs else pick(a))
            return orig(*a, **kw)
        mp.setattr(mod, fn_name, wrapped)

    def _wrap_apply(self, mp, fn_cls, pick):
        orig = fn_cls.apply

        def wrapped(*a):
            self._store(pick(a))
            return orig(*a)
        mp.setattr(fn_cls, "apply", wrapped)

    def remove(self):
        for h in self.hooks:
            h.remove()


def _flat(x):
    if isinstance(x, (tuple, list)):
        return torch.cat([_flat(v) for v in x])
    return torch.as_tensor(x).double().reshape(-1)


def _eq(a, b):
    return torch.equal(_flat(a), _flat(b))


def _differences(im, rec, model):
    """Names of the compiled constants that differ from the recorded QAT ones."""
    bad = []

    def check(name, got, want):
        if not _eq(got, want):
            bad.append(name)

    enc = model.encoder.sentence_encoder
    ids = torch.arange(enc.embed_tokens.num_embeddings)
    tok_rows, s_tok = QM.QuantEmbedding.forward(enc.embed_tokens, ids)
    check("token_table", im.token_table, tok_rows)
    check("s_tok", im.info["s_tok"], s_tok)
    ea = rec["embed_act"]

    def ratio(got):
        return (got.multiplier, got.shift)

    check("token_requant", ratio(im.token_requant), torch.cat([ea["m"], ea["e"]]))
    check("position_requant", ratio(im.position_requant), torch.cat([ea["m_id"], ea["e_id"]]))

    def ln(prefix, got, r):
        check(prefix + ".shift", got.shift, r["shift"])
        check(prefix + ".bias", got.bias, r["b_int"])
        check(prefix + ".out_scale", got.out_scale, r["out_scale"])

    def per_channel(name, got, r, n):
        check(name + ".multiplier", got.multiplier, r["m"].expand(n))
        check(name + ".shift", got.shift, r["e"].expand(n))

    ln("layernorm_embedding", im.emb_ln, rec["layernorm_embedding"])
    D = im.token_table.shape[1]
    for i, L in enumerate(im.layers):
        p = f"layers.{i}."
        R = {k[len(p):]: v for k, v in rec.items() if k.startswith(p)}
        per_channel(p + "input_requant", L.input_requant, R["input_act"], D)
        check(p + "input_scale", L.input_scale, R["input_act"]["out_scale"])
        for j, n in enumerate(("q", "k", "v")):
            lin, act = R[f"self_attn.{n}_proj"], R[f"self_attn.{n}_act"]
            rows = slice(j * D, (j + 1) * D)
            check(p + n + "_proj.weight", L.qkv.weight[rows], lin["w_int"])
            check(p + n + "_proj.bias", L.qkv.bias[rows], lin["b_int"])
            check(p + n + "_proj.acc_scale", L.qkv.acc_scale[rows], lin["out_scale"].expand(D))
            check(p + n + "_act.multiplier", L.qkv_requant.multiplier[rows], act["m"].expand(D))
            check(p + n + "_act.shift", L.qkv_requant.shift[rows], act["e"].expand(D))
            check(p + n + "_act.out_scale", L.qkv_scales[j], act["out_scale"])
        sm = R["self_attn.softmax"]
        check(p + "score_scale", L.score_scale, sm["in_scale"])
        size = int(30 * -float(sm["exp"].x0)) + 1
        table = NL._int_exp(-torch.arange(size, dtype=torch.float64), sm["exp"])
        check(p + "exp_table", L.exp_table[torch.arange(size).clamp(max=L.exp_table.numel() - 1)], table)
        aa = R["self_attn.attn_act"]
        check(p + "context_requant", ratio(L.context_requant), torch.cat([aa["m"], aa["e"]]))
        check(p + "context_scale", L.context_scale, aa["out_scale"])
        for field, name in (("out_proj", "self_attn.out_proj"), ("fc1", "fc1"), ("fc2", "fc2")):
            lin, got = R[name], getattr(L, field)
            check(p + name + ".weight", got.weight, lin["w_int"])
            check(p + name + ".bias", got.bias, lin["b_int"])
            check(p + name + ".acc_scale", got.acc_scale, lin["out_scale"].expand(got.acc_scale.numel()))
        for pre, name in (("attn", "attn_residual_act"), ("ffn", "ffn_residual_act")):
            r = R[name]
            per_channel(p + name, getattr(L, pre + "_residual_requant"), r, D)
            check(p + name + ".id", ratio(getattr(L, pre + "_identity_requant")), torch.cat([r["m_id"], r["e_id"]]))
        ln(p + "self_attn_layer_norm", L.attn_ln, R["self_attn_layer_norm"])
        ln(p + "final_layer_norm", L.ffn_ln, R["final_layer_norm"])
        check(p + "fc1_act", ratio(L.fc1_input_requant), torch.cat([R["fc1_act"]["m"], R["fc1_act"]["e"]]))
        check(p + "fc1_input_scale", L.fc1_input_scale, R["fc1_act"]["out_scale"])
        for field, got in (("shift", L.gelu_shift), ("b_int", L.gelu_b), ("c_int", L.gelu_c), ("one", L.gelu_one)):
            check(p + "gelu." + field, got, R["gelu"][field])
        check(p + "fc2_act", ratio(L.fc2_input_requant), torch.cat([R["fc2_act"]["m"], R["fc2_act"]["e"]]))
        check(p + "fc2_input_scale", L.fc2_input_scale, R["fc2_act"]["out_scale"])
    last = f"layers.{len(im.layers) - 1}.final_layer_norm"
    check("out_scale", im.out_scale, rec[last]["out_scale"])
    return bad


@pytest.fixture(scope="module")
def templates():
    d = mh.make_dictionary()
    return d, {wb: mh.build_model("ibert_roberta", d, extra=mh.TINY_DIMS + ["--quant-mode", "symmetric",
                                                                          "--weight-bits", wb]) for wb in WIDTHS}


@pytest.mark.slow
def test_compiled_constants_equal_the_qat_forward_over_50_seeds(templates, monkeypatch):
    d, tmpl = templates
    failures, logit_checks = {}, 0
    for seed in SEEDS:
        wb = WIDTHS[seed % 3]
        model = mh.perturbed_calibrated(tmpl[wb], d, seed)
        tokens = mh.random_batch(d, bsz=3, tgt_len=40, seed=500 + seed)
        with monkeypatch.context() as mp:
            rec = _Recorder(model, mp)
            with torch.no_grad():
                logits, _ = model(tokens, features_only=True, classification_head_name=mh.HEAD)
            rec.remove()
        im = convert.compile_model(model)
        bad = _differences(im, rec.rec, model)
        if seed % 5 == 0:
            eng = IntegerEngine(im, threads=1)  # (2 threads oversubscribe the QAT forwards that follow)
            logit_checks += 1
            if not torch.equal(eng.classify(tokens), logits.float()):
                bad.append("logits")
        if bad:
            failures[(seed, wb)] = bad
    assert logit_checks == 10
    assert not failures, failures


@pytest.mark.parametrize("patch", ["context_scale", "gelu_constants"])
def test_the_comparison_sees_a_converter_side_change(templates, monkeypatch, patch):
    """The check can fail: a context scale 2^-16 off, or i-GELU constants of the other coefficient set, used only
    when the converter collects the integer forms, show up as differing constants."""
    d, tmpl = templates
    from ibert_plugin.models import ibert_roberta as wiring

    model = mh.perturbed_calibrated(tmpl["7"], d, 3)
    tokens = mh.random_batch(d, bsz=2, tgt_len=20, seed=3)
    with monkeypatch.context() as mp:
        rec = _Recorder(model, mp)
        with torch.no_grad():
            model(tokens, features_only=True)
        rec.remove()
    with monkeypatch.context() as mp:
        if patch == "context_scale":
            orig = wiring.context_scale
            mp.setattr(wiring, "context_scale", lambda sp, sv: orig(sp, sv) * (1.0 + 2.0**-16))
            want = "context_requant"
        else:
            orig = QM.gelu_constants
            mp.setattr(QM, "gelu_constants", lambda sc, c: orig(sc, "refit"))
            want = "gelu.b_int"
        im = convert.compile_model(model)
    bad = _differences(im, rec.rec, model)
    assert any(b.endswith(want) for b in bad), bad


def test_refit_constants_flow_from_the_command_line_into_the_engine(templates):
    """``--nonlinear-constants refit`` reaches QuantConfig, the QAT forward and the compiled i-GELU / i-exp."""
    d, tmpl = templates
    model = mh.build_model("ibert_roberta", d, extra=mh.TINY_DIMS + ["--quant-mode", "symmetric", "--weight-bits",
                                                                     "8", "--nonlinear-constants", "refit"])
    assert model.encoder.qcfg.nonlinear_constants == "refit"
    paper = copy.deepcopy(tmpl["8"])
    paper.load_state_dict(model.state_dict())
    batches = mh.wide_batches(d, 1)
    im_r = convert.compile_model(mh.calibrate(model, batches))
    im_p = convert.compile_model(mh.calibrate(paper, batches))
    L_r, L_p = im_r.layers[0], im_p.layers[0]
    s = L_r.fc1.acc_scale
    assert torch.equal(L_r.gelu_b, NL.gelu_constants(s, "refit").b_int.to(torch.int64))
    assert not torch.equal(L_r.gelu_b, NL.gelu_constants(s, "paper").b_int.to(torch.int64))
    assert im_r.info["nonlinear_constants"] == "refit" and im_p.info["nonlinear_constants"] == "paper"
    assert torch.equal(L_r.exp_table, NL.exp_lut(L_r.score_scale, "refit"))
    assert torch.equal(L_p.exp_table, NL.exp_lut(L_p.score_scale, "paper"))
    assert not torch.equal(L_r.exp_table, NL.exp_lut(L_r.score_scale, "paper"))
