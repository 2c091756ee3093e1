"""IntegerEngine's calling contract: length-bucketed prediction equals the QAT model's logits in input order,
returned tensors own their memory, and the engine leaves torch's global thread count alone."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_helpers as mh  # noqa: E402
from ibert_plugin.engine import EngineError, convert, qat_compare  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    d = mh.make_dictionary()
    model = mh.build_model("ibert_roberta", d, extra=mh.TINY_DIMS + ["--quant-mode", "symmetric",
                                                                     "--weight-bits", "7"])
    mh.perturb(model, 3)
    mh.calibrate(model, mh.wide_batches(d, 3))
    return d, model


def _rows(d, n=11, seed=5):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        L = int(torch.randint(3, 30, (1,), generator=g))
        r = torch.randint(d.nspecial, len(d) - 1, (L,), generator=g)
        r[0], r[-1] = d.bos(), d.eos()
        rows.append(r)
    return rows


def test_predict_batches_equals_qat_logits_in_input_order(tiny):
    d, model = tiny
    n0 = torch.get_num_threads()
    eng = convert.from_model(model, threads=1 if n0 != 1 else 2)
    assert torch.get_num_threads() == n0  # the engine's thread count is per call, not global
    rows = _rows(d)
    got = eng.predict_batches(rows, batch_size=4)
    assert torch.get_num_threads() == n0
    # reference: the QAT model on the rows in input order, file-order batches padded to their longest row
    ref, ref_cls = [], []
    last = f"layers.{len(model.encoder.sentence_encoder.layers) - 1}.final_layer_norm"
    for s in range(0, len(rows), 3):
        outs, logits = qat_compare.qat_outputs(model, mh.pad_rows(d, rows[s: s + 3]))
        ref.append(logits)
        ref_cls.append(outs[last][:, 0])
    ref, ref_cls = torch.cat(ref).to(got.dtype), torch.cat(ref_cls)
    # the integers a row gets do not depend on its batch: CLS outputs of length-sorted batches == the QAT model's
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for s in range(0, len(order), 4):
        idx = order[s: s + 4]
        q, _, _ = eng.encode(mh.pad_rows(d, [rows[i] for i in idx]))
        assert torch.equal(q[:, 0].double(), ref_cls[idx])
    # the float head sees the same integers; only BLAS blocking (it depends on the batch size) may move last bits
    assert torch.allclose(got, ref, rtol=0, atol=1e-6)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    # a row alone (no padding at all) gives the same logits
    assert torch.allclose(eng.predict_batches(rows[4:5], batch_size=8), got[4:5], rtol=0, atol=1e-6)
    with pytest.raises(EngineError, match="batch_size"):
        eng.predict_batches(rows, batch_size=0)
    with pytest.raises(EngineError, match="empty"):
        eng.predict_batches([rows[0], []], batch_size=2)


def test_encode_output_is_not_overwritten_by_later_calls(tiny):
    d, model = tiny
    eng = convert.from_model(model, threads=1)
    rows = _rows(d, n=4, seed=9)
    a = mh.pad_rows(d, rows[:2])
    b = mh.pad_rows(d, rows[2:])
    qa, _, _ = eng.encode(a)
    keep = qa.clone()
    eng.encode(b)
    eng.encode(a)  # same shape: the same work buffers again
    assert torch.equal(qa, keep)


def test_classify_empty_batch_is_an_engine_error(tiny):
    d, model = tiny
    eng = convert.from_model(model, threads=1)
    for shape in ((0, 5), (3, 0)):
        with pytest.raises(EngineError, match=rf"classify needs a non-empty \[batch, time\] token tensor, got shape "
                                              rf"\[{shape[0]}, {shape[1]}\]"):
            eng.classify(torch.full(shape, d.pad(), dtype=torch.long))


def test_all_padding_rows_warn(tiny):
    d, model = tiny
    eng = convert.from_model(model, threads=1)
    toks = torch.nn.utils.rnn.pad_sequence(_rows(d, n=3), batch_first=True, padding_value=d.pad())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # real rows: no warning
        eng.classify(toks)
    toks[1] = d.pad()
    with pytest.warns(RuntimeWarning, match="1 of 3 rows are all padding"):
        eng.classify(toks)
