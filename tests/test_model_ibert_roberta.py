"""The fairseq wiring: FP equivalence with fairseq roberta, checkpoint loading, integer dataflow and training."""
import pytest
import torch

import ibert_plugin  # noqa: F401  (fairseq checkpoints pickle argparse.Namespace: allow-listed by the plugin)
from model_helpers import (
    TINY_DIMS,
    build_model,
    fairseq_train,
    make_dictionary,
    make_tiny_glue,
    random_batch,
)

HEAD = "sentence_classification_head"


@pytest.fixture(scope="module")
def dictionary():
    return make_dictionary()


@pytest.fixture(scope="module")
def fp_roberta(dictionary):
    model = build_model("roberta", dictionary, extra=TINY_DIMS)
    # trained LayerNorms are not the identity: give each its own gain/offset so scales differ between layers
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.copy_((0.5 + torch.rand(p.shape, generator=g)) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=g))
    return model


def _logits(model, tokens, **kw):
    with torch.no_grad():
        return model(tokens, classification_head_name=HEAD, **kw)


def test_fp_mode_matches_fairseq_roberta(dictionary, fp_roberta):
    ours = build_model("ibert_roberta_tiny", dictionary, extra=["--quant-mode", "none"], seed=1)
    ours.load_state_dict(fp_roberta.state_dict(), strict=True)
    tokens = random_batch(dictionary)
    ref, ref_extra = _logits(fp_roberta, tokens, return_all_hiddens=True)
    out, extra = _logits(ours, tokens, return_all_hiddens=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    assert len(extra["inner_states"]) == len(ref_extra["inner_states"]) == 3
    for a, b in zip(extra["inner_states"], ref_extra["inner_states"]):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


def test_fp_checkpoint_loads_strictly_into_quantized_modes(dictionary, fp_roberta):
    state = fp_roberta.state_dict()
    for extra in (["--quant-mode", "symmetric"], ["--quant-mode", "symmetric", "--weight-bits", "2"],
                  ["--quant-mode", "ternarybert", "--weight-bits", "2"]):
        model = build_model("ibert_roberta_tiny", dictionary, extra=extra, seed=2)
        model.load_state_dict(dict(state), strict=True)  # missing quant buffers are filled, params must match
        for name, p in model.named_parameters():
            assert torch.equal(p, state[name]), name


def test_missing_parameter_is_still_an_error(dictionary, fp_roberta):
    state = dict(fp_roberta.state_dict())
    del state["encoder.sentence_encoder.layers.0.fc1.weight"]
    model = build_model("ibert_roberta_tiny", dictionary, extra=["--quant-mode", "symmetric"])
    with pytest.raises(RuntimeError, match="fc1.weight"):
        model.load_state_dict(state, strict=True)


def _calibrated_symmetric(dictionary, fp_roberta, extra=()):
    model = build_model("ibert_roberta_tiny", dictionary, extra=["--quant-mode", "symmetric", *extra])
    model.load_state_dict(fp_roberta.state_dict(), strict=True)
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model(random_batch(dictionary, seed=seed), classification_head_name=HEAD)
    return model.eval()


def test_symmetric_model_is_close_to_fp_and_ranges_freeze(dictionary, fp_roberta):
    model = _calibrated_symmetric(dictionary, fp_roberta)
    tokens = random_batch(dictionary, seed=7)
    ranges = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("x_min", "x_max"))}
    assert ranges and all(v.abs().sum() > 0 for k, v in ranges.items() if k.endswith("x_max"))
    out, _ = _logits(model, tokens)
    ref, _ = _logits(fp_roberta, tokens)
    assert torch.isfinite(out).all()
    # First-order bound from the quantization steps: every 8-bit rounding point between the embedding table and the
    # head (each 8-bit QuantAct, the softmax output, each per-channel weight, the two embedding tables) perturbs its
    # tensor by at most half a step = range / (2 * 127); the encoder's LayerNorms keep each layer's output at the
    # scale of the logits, so the logit error stays below K / 254 of the largest logit (measured here: ~1/10 of it).
    from ibert_plugin.quant.modules import IntSoftmax, QuantAct, QuantLinear

    enc = model.encoder.sentence_encoder
    k = 2 + sum(isinstance(m, QuantAct) and m.bits == 8 or isinstance(m, (IntSoftmax, QuantLinear))
                for m in enc.modules())
    assert k == 2 + 2 * 14
    err = (out - ref).abs().max()
    assert err <= k / 254 * ref.abs().max(), (err, k)
    assert err > 0  # really quantized
    for k, v in model.state_dict().items():
        if k in ranges:
            assert torch.equal(v, ranges[k]), f"{k} changed in eval mode"


def test_each_layer_receives_the_previous_layer_scale(dictionary, fp_roberta):
    model = _calibrated_symmetric(dictionary, fp_roberta)
    layers = model.encoder.sentence_encoder.layers
    seen = {}

    def grab_out(name):
        def hook(module, inputs, output):
            seen[name] = output[1]
        return hook

    def grab_in(name):
        def hook(module, inputs):
            seen[name] = inputs[1]
        return hook

    handles = [layers[0].final_layer_norm.register_forward_hook(grab_out("ln0")),
               layers[1].input_act.register_forward_pre_hook(grab_in("in1")),
               model.encoder.sentence_encoder.layernorm_embedding.register_forward_hook(grab_out("emb")),
               layers[0].input_act.register_forward_pre_hook(grab_in("in0"))]
    _logits(model, random_batch(dictionary))
    for h in handles:
        h.remove()
    assert seen["in1"] is seen["ln0"]
    assert seen["in0"] is seen["emb"]
    assert not torch.equal(seen["ln0"], seen["emb"])


def test_integer_audit_passes_on_symmetric_model(dictionary, fp_roberta):
    from ibert_plugin.quant.audit import integer_audit

    for extra in ((), ("--weight-bits", "7"), ("--weight-bits", "2")):
        model = _calibrated_symmetric(dictionary, fp_roberta, extra)
        report = integer_audit(model, random_batch(dictionary, seed=3), classification_head_name=HEAD)
        report.assert_clean()
        assert report.checked > 20


def test_ternarybert_mode_returns_scores_and_hiddens(dictionary, fp_roberta):
    model = build_model("ibert_roberta_tiny", dictionary, extra=["--quant-mode", "ternarybert", "--weight-bits", "2"])
    model.load_state_dict(fp_roberta.state_dict(), strict=True)
    tokens = random_batch(dictionary)
    out, extra = _logits(model, tokens, return_all_hiddens=True, return_attn_scores=True)
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    assert len(extra["inner_states"]) == 3 and len(extra["attn_scores"]) == 2
    scores = extra["attn_scores"][0]
    assert scores.shape == (3, 4, 12, 12)
    assert torch.isinf(scores[2, :, :, -1]).all() and torch.isfinite(scores[0]).all()


@pytest.mark.slow  # end-to-end fairseq-train: left out by `make test-fast`
@pytest.mark.parametrize("mode", ["symmetric", "ternarybert"])
def test_fairseq_train_user_dir_quantized(tmp_path, mode):
    data = make_tiny_glue(tmp_path / "data")
    fp = fairseq_train(data, tmp_path / "fp", extra=["--quant-mode", "none"], max_update=4)
    assert "done training" in (fp.stderr + fp.stdout).lower()
    extra = ["--quant-mode", mode, "--restore-file", str(tmp_path / "fp" / "checkpoint_best.pt"),
             "--reset-optimizer", "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler"]
    if mode == "ternarybert":
        extra += ["--weight-bits", "2"]
    q = fairseq_train(data, tmp_path / mode, extra=extra, max_update=4)
    log = (q.stderr + q.stdout).lower()
    assert "loaded checkpoint" in log and "done training" in log
    state = torch.load(tmp_path / mode / "checkpoint_last.pt", map_location="cpu")
    if mode == "symmetric":
        # ranges were calibrated by training and saved; the LayerNorm overflow shift travels with them
        assert state["model"]["encoder.sentence_encoder.layers.0.input_act.x_max"].item() > 0
        assert "encoder.sentence_encoder.layers.1.final_layer_norm.shift" in state["model"]


@pytest.mark.parametrize("extra", [
    ("--quant-mode", "symmetric"),
    ("--quant-mode", "ternarybert", "--weight-bits", "2", "--weight-quant-method", "lat"),
])
def test_eval_reuses_quantized_weights_until_they_change(dictionary, fp_roberta, extra):
    from ibert_plugin.quant.modules import QuantLinear

    model = build_model("ibert_roberta_tiny", dictionary, extra=list(extra))
    model.load_state_dict(fp_roberta.state_dict(), strict=True)
    model.train()
    with torch.no_grad():
        model(random_batch(dictionary), classification_head_name=HEAD)  # calibrate the ranges
    model.eval()
    calls = []
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.weight_quantizer.register_forward_hook(lambda mod, inp, out: calls.append(mod))
    n_linear = sum(isinstance(m, QuantLinear) for m in model.modules())
    tokens = random_batch(dictionary, seed=4)
    first, _ = _logits(model, tokens)
    assert len(calls) == n_linear
    again, _ = _logits(model, tokens)
    assert len(calls) == n_linear and torch.equal(first, again)  # second eval forward: no re-quantization
    fc1 = model.encoder.sentence_encoder.layers[0].fc1
    with torch.no_grad():
        fc1.weight.mul_(-1.0)  # a parameter change (as an optimizer step or load_state_dict makes) invalidates
    changed, _ = _logits(model, tokens)
    assert len(calls) == n_linear + 1 and not torch.equal(changed, first)
    model.load_state_dict(fp_roberta.state_dict(), strict=False)
    restored, _ = _logits(model, tokens)
    assert torch.equal(restored, first)
    model.train()  # training re-quantizes every forward (the STE needs the graph)
    before = len(calls)
    model(tokens, classification_head_name=HEAD)[0].sum().backward()
    assert len(calls) == before + n_linear


def test_attention_scores_are_built_only_when_requested(dictionary, fp_roberta):
    model = build_model("ibert_roberta_tiny", dictionary, extra=["--quant-mode", "ternarybert", "--weight-bits", "2"])
    model.load_state_dict(fp_roberta.state_dict(), strict=True)
    tokens = random_batch(dictionary)
    plain, extra = _logits(model, tokens)
    assert "attn_scores" not in extra
    enc = model.encoder.sentence_encoder(tokens)
    assert enc["attn_scores"] == []
    layer = model.encoder.sentence_encoder.layers[0]
    x = torch.randn(tokens.shape[1], tokens.shape[0], 64)
    (_, _), scores = layer(x, None, tokens.eq(dictionary.pad()))
    assert scores is None
    with_scores, extra = _logits(model, tokens, return_attn_scores=True)
    assert torch.equal(plain, with_scores) and len(extra["attn_scores"]) == 2
