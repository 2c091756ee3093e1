"""Packing the real ``ibert_roberta`` model: exact logits after reload (ternary TWN/LAT, I-BERT int8), sizes."""
import pytest
import torch

from ibert_plugin.quant.packing import FrozenWeightQuantizer, find_weight_quantizers, pack_model
from ibert_plugin.wiring.checkpoint import load_packed_model
from model_helpers import build_model, make_dictionary, random_batch

HEAD = "sentence_classification_head"


@pytest.fixture(scope="module")
def dictionary():
    return make_dictionary()


def _train_a_step(model, tokens):
    """One SGD step so LAT has curvature and weights are not at init."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    logits, _ = model(tokens, classification_head_name=HEAD)
    logits.pow(2).sum().backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize(
    "extra",
    [
        ["--quant-mode", "ternarybert", "--weight-bits", "2"],
        ["--quant-mode", "ternarybert", "--weight-bits", "2", "--weight-quant-method", "lat"],
        ["--quant-mode", "ternarybert", "--weight-bits", "2", "--ternary-linear", "row"],
        ["--quant-mode", "ternarybert", "--weight-bits", "8"],
        ["--quant-mode", "symmetric", "--weight-bits", "8"],
    ],
    ids=["tern-twn", "tern-lat", "tern-twn-row", "tern-w8", "ibert-int8"],
)
def test_packed_reload_gives_identical_logits(dictionary, tmp_path, extra):
    torch.manual_seed(0)
    model = build_model("ibert_roberta_tiny", dictionary, extra=extra)
    tokens = random_batch(dictionary, bsz=3, tgt_len=12)
    _train_a_step(model, tokens)
    if "lat" in extra:
        lat = [m for m in model.modules() if type(m).__name__ == "LATWeightQuantizer"]
        assert lat and all(int(m.lat_steps) == 1 for m in lat)
    with torch.no_grad():
        ref = model(tokens, classification_head_name=HEAD)[0]
    packed = pack_model(model, {"model": model.args})
    path = tmp_path / "m.packed.pt"
    torch.save(packed, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    encodings = {e["encoding"] for e in loaded["quantized"].values()}
    if "2" in extra:
        assert "ternary2" in encodings
        emb = loaded["quantized"]["encoder.sentence_encoder.embed_tokens.weight"]
        assert emb["scale"].numel() == emb["shape"][0]  # row-wise alpha
        fc1 = loaded["quantized"]["encoder.sentence_encoder.layers.0.fc1.weight"]
        if "row" in extra:  # one alpha per output row, and the rows do differ
            assert fc1["scale"].numel() == fc1["shape"][0] and fc1["scale"].unique().numel() > 1
        else:
            assert fc1["scale"].numel() == 1  # layer-wise alpha
    else:
        assert encodings == {"int8"}
    reloaded = load_packed_model(path)
    assert all(isinstance(reloaded.get_submodule(q), FrozenWeightQuantizer)
               for q in find_weight_quantizers(reloaded).values())
    with torch.no_grad():
        out = reloaded(tokens, classification_head_name=HEAD)[0]
    assert torch.equal(out, ref)  # atol = 0
    # the latent weights differ from the trained ones, their quantized values do not
    w = "encoder.sentence_encoder.layers.1.self_attn.q_proj.weight"
    if "2" in extra:
        assert not torch.equal(reloaded.get_parameter(w), model.get_parameter(w))


def test_fp_model_has_nothing_to_pack(dictionary):
    model = build_model("ibert_roberta_tiny", dictionary, extra=["--quant-mode", "none"])
    with pytest.raises(ValueError, match="not a quantized model"):
        pack_model(model)


def test_omit_lm_head_and_fp16_positions(dictionary, tmp_path):
    model = build_model("ibert_roberta_tiny", dictionary, extra=["--quant-mode", "ternarybert", "--weight-bits", "2"])
    tokens = random_batch(dictionary)
    with torch.no_grad():
        ref = model(tokens, classification_head_name=HEAD)[0]
    packed = pack_model(model, {"model": model.args}, omit_prefixes=("encoder.lm_head.",))
    assert packed["omitted"] and all(k.startswith("encoder.lm_head.") for k in packed["omitted"])
    assert "encoder.lm_head.weight" in packed["tied"]  # tied to the embedding: kept, costs nothing
    torch.save(packed, tmp_path / "p.pt")
    reloaded = load_packed_model(tmp_path / "p.pt")
    with torch.no_grad():
        assert torch.equal(reloaded(tokens, classification_head_name=HEAD)[0], ref)
