"""The integer engine reproduces the QAT model's eval-mode integers at every module output of every layer."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_helpers as mh  # noqa: E402
from ibert_plugin.engine import EngineError, convert, qat_compare  # noqa: E402

BASE_1L = ["--encoder-layers", "1", "--encoder-embed-dim", "768", "--encoder-ffn-embed-dim", "3072",
           "--encoder-attention-heads", "12"]


def _calibrated(d, dims, wb, seed=0):
    model = mh.build_model("ibert_roberta", d, extra=dims + ["--quant-mode", "symmetric", "--weight-bits", wb],
                           seed=seed)
    return mh.calibrate(model, [mh.random_batch(d, bsz=4, tgt_len=16, seed=s) for s in range(3)])


def _compare(eng, model, tokens):
    outs, bad, logits = qat_compare.compare(eng, model, tokens)
    return outs, sorted(bad), logits


@pytest.mark.parametrize("wb", ["7", "8", "2"])
def test_tiny_all_layers_bit_exact(wb):
    d = mh.make_dictionary()
    model = _calibrated(d, mh.TINY_DIMS, wb)
    eng = convert.from_model(model, threads=2)
    fast = eng.selftest.fast_routes
    if wb == "8":
        expect = "fbgemm8" if "fbgemm8" in fast else "u8u8"
    else:
        expect = "u8u8" if not fast else (fast[0] if wb == "2" else [r for r in fast if r != "fbgemm16"][0])
    assert eng.routes[0]["fc1"] == expect
    tokens = mh.random_batch(d, bsz=3, tgt_len=14, seed=9)
    outs, bad, logits = _compare(eng, model, tokens)
    assert len(outs) == 2 + 13 * 2 and not bad, bad
    # the float head on the integer features gives the QAT model's logits, exactly
    assert torch.equal(eng.classify(tokens), logits)


@pytest.mark.parametrize("route,wb", [("ort", "7"), ("ort", "2"), ("u8u8", "2")])
def test_other_routes_bit_exact(route, wb):
    """The ORT-only and exact-16-bit fallbacks give the same integers as the QAT model."""
    d = mh.make_dictionary()
    model = _calibrated(d, mh.TINY_DIMS, wb)
    eng = convert.from_model(model, threads=2, route=route)
    assert set(eng.routes[0].values()) == ({"u8s8"} if route == "ort" and eng.selftest.ok["u8s8"] else {"u8u8"})
    _, bad, _ = _compare(eng, model, mh.random_batch(d, bsz=2, tgt_len=11, seed=3))
    assert not bad, bad


def test_roberta_base_shape_one_layer_bit_exact():
    d = mh.make_dictionary()
    model = _calibrated(d, BASE_1L, "7")
    eng = convert.from_model(model, threads=2)
    outs, bad, _ = _compare(eng, model, mh.random_batch(d, bsz=2, tgt_len=20, seed=4))
    assert len(outs) == 15 and not bad, bad


def test_bad_inputs_are_engine_errors(tmp_path):
    d = mh.make_dictionary()
    fp = mh.build_model("ibert_roberta", d, extra=mh.TINY_DIMS + ["--quant-mode", "none"])
    with pytest.raises(EngineError, match="symmetric"):
        convert.from_model(fp)
    with pytest.raises(EngineError, match="not found"):
        convert.from_checkpoint(str(tmp_path / "missing.pt"))
    uncal = mh.build_model("ibert_roberta", d, extra=mh.TINY_DIMS + ["--quant-mode", "symmetric", "--weight-bits", "7"])
    with pytest.raises(EngineError, match="uninitialised"):
        convert.from_model(uncal)
