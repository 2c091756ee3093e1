"""The engine reproduces the QAT model's integers on the imported pretrained MiniLM, on real RT-SENT text.

``data/minilm/model.pt`` (built by ``python -m ibert_plugin.assets build``) loaded into ``ibert_roberta_minilm``
(6 x 384, FFN 1536, 12 heads) in symmetric mode with 8-bit, 7-bit or integer-only ternary (``--weight-bits 2``)
weights, calibrated in train mode on RT-SENT train sentences (two batches of 16 at their real lengths, one of 4 rows
of joined sentences up to 128 tokens), then compared on a padded 8 x 128 batch of dev sentences joined to lengths
128 ... 11: every hooked module output (padding rows masked) and the logits, with ``torch.equal``.
"""
import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import model_helpers as mh  # noqa: E402
from ibert_plugin.engine import convert, qat_compare  # noqa: E402

TEST_LENGTHS = (128, 128, 113, 90, 64, 40, 23, 11)


@functools.lru_cache(maxsize=None)
def _data():
    d = mh.minilm_dictionary()
    train, dev = mh.rt_sent_sentences("train"), mh.rt_sent_sentences("dev")
    calib = [mh.pad_rows(d, mh.wordpiece_rows(d, train[i * 16:(i + 1) * 16])) for i in range(2)]
    calib.append(mh.pad_rows(d, mh.wordpiece_rows(d, train[32:], lengths=(128, 96, 64, 128))))
    test = mh.pad_rows(d, mh.wordpiece_rows(d, dev, lengths=TEST_LENGTHS))
    return d, calib, test


@functools.lru_cache(maxsize=None)
def _compare(wb):
    """(number of hooked outputs, {module: differing integers}, QAT logits, engine logits, layer-0 routes)."""
    d, calib, test = _data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # QAT forwards: many small ops crawl in a 2-thread OpenMP pool on a busy host
    try:
        model = mh.calibrate(mh.minilm_model(d, wb), calib)
        eng = convert.from_model(model, threads=1)
        outs, bad, logits = qat_compare.compare(eng, model, test)
        return len(outs), bad, logits, eng.classify(test), eng.routes[0]
    finally:
        torch.set_num_threads(threads)


def test_batches_are_real_padded_text():
    d, calib, test = _data()
    assert test.shape == (8, 128)
    lengths = test.ne(d.pad()).sum(1).tolist()
    assert lengths == list(TEST_LENGTHS)
    assert int(test.eq(d.unk()).sum()) < 0.02 * sum(lengths)  # WordPiece covers the text
    assert max(c.shape[1] for c in calib[:2]) < 128  # real sentence lengths, not only joined rows


@pytest.mark.slow
@pytest.mark.parametrize("wb", ["8", "7", "2"])
def test_minilm_every_module_bit_exact(wb):
    n_outs, bad, _, _, routes = _compare(wb)
    assert n_outs == 2 + 6 * len(qat_compare.HOOKED)
    assert not bad, f"weight bits {wb}, routes {routes}: differing integers per module {bad}"


@pytest.mark.parametrize("wb", ["8", "7", "2"])
def test_minilm_logits_equal(wb):
    _, _, logits, eng_logits, _ = _compare(wb)
    assert torch.equal(eng_logits, logits), f"max |diff| {float((eng_logits - logits.float()).abs().max())}"
