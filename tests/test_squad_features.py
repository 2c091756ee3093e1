"""SQuAD reading and feature building: offsets, sliding windows, answers across window boundaries, unicode,
whitespace-only differences, and bad input as one clear error."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ibert_plugin.squad.data import SquadError, read_squad
from ibert_plugin.squad.features import OffsetTokenizer, build_features, window_starts

REPO = Path(__file__).resolve().parents[1]


def _tok(kind: str) -> OffsetTokenizer:
    from fairseq.data import Dictionary

    d_dir = REPO / "data" / ("minilm" if kind == "wordpiece" else "gpt2_bpe")
    d = Dictionary.load(str(d_dir / "dict.txt"))
    d.add_symbol("<mask>")
    return OffsetTokenizer(d_dir, d)


@pytest.fixture(scope="module", params=["wordpiece", "gpt2"])
def tok(request):
    t = _tok(request.param)
    assert t.kind == request.param
    return t


def _write(path: Path, context: str, qas) -> Path:
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}),
                    encoding="utf-8")
    return path


def _answer_text(ex, f):
    s, e = f.start - f.ctx_start, f.end - f.ctx_start
    return ex.context[f.offsets[s, 0]:f.offsets[e, 1]].strip()


def test_window_starts_by_hand():
    assert window_starts(10, 4, 3) == [0, 3, 6]          # 6 + 4 = 10 covers the end
    assert window_starts(11, 4, 3) == [0, 3, 6, 9]
    assert window_starts(3, 4, 3) == [0]
    assert window_starts(12, 4, 8) == [0, 4, 8]          # the stride never skips tokens


def test_offsets_unicode_and_whitespace(tok, tmp_path):
    context = "The  Café\tMüller opened in\n1921 in Zürich — “naïve” façade, 5 km²."
    qas = [{"id": "a", "question": "Where?",
            "answers": [{"text": "Zürich", "answer_start": context.index("Zürich")}]},
           # whitespace-only difference: surrounding spaces, offset at the leading space
           {"id": "b", "question": "When?", "answers": [{"text": "\n1921 ", "answer_start": context.index("\n1921")}]},
           {"id": "c", "question": "Which café?",
            "answers": [{"text": "Café\tMüller", "answer_start": context.index("Café")}]}]
    ex = read_squad(_write(tmp_path / "u.json", context, qas))
    assert [e.answers[0][0] for e in ex] == ["Zürich", "1921", "Café\tMüller"]
    feats = build_features(ex, tok, max_seq_length=64, doc_stride=16, max_query_length=8)
    assert len(feats) == 3
    for e, f in zip(ex, feats):
        assert f.tokens[0] == tok.bos and f.tokens[-1] == tok.eos
        n = len(f.offsets)
        assert f.ctx_start + n + 1 == len(f.tokens)
        covered = np.zeros(len(e.context), dtype=bool)
        for s, t in f.offsets:
            assert 0 <= s < t <= len(e.context)
            covered[s:t] = True
        assert all(covered[i] for i, ch in enumerate(e.context) if not ch.isspace())  # every character kept
        assert (np.diff(f.offsets[:, 0]) >= 0).all()      # offsets follow the text (bytes of one char share it)
        if tok.kind == "wordpiece":
            assert all(e.context[s:t].strip() for s, t in f.offsets)  # BERT drops whitespace; GPT-2 keeps it
        assert _answer_text(e, f) == e.answers[0][0]


def test_windows_and_answer_crossing_a_boundary(tok, tmp_path):
    words = [f"word{i}" for i in range(60)]
    context = " ".join(words)
    answer = "word20 word21 word22"
    ex = read_squad(_write(tmp_path / "w.json", context,
                           [{"id": "q", "question": "what?", "answers": [{"text": answer,
                                                                          "answer_start": context.index(answer)}]}]))
    feats = build_features(ex, tok, max_seq_length=32, doc_stride=8, max_query_length=8)
    n_ctx = len(tok.encode_batch([context])[0][0])
    first, last = feats[0], feats[-1]
    assert first.offsets[0, 0] == 0 and last.offsets[-1, 1] == len(context)
    assert all(len(f.tokens) <= 32 for f in feats)
    # every context token is the max-context token of exactly one window
    per_token = np.zeros(n_ctx, dtype=int)
    ans_s, ans_e = context.index(answer), context.index(answer) + len(answer)
    labelled = partial = 0
    for f in feats:
        start = int(np.searchsorted(tok.encode_batch([context])[0][1][:, 0], f.offsets[0, 0]))
        per_token[start:start + len(f.offsets)] += f.max_context
        inside = (f.offsets[:, 1] > ans_s) & (f.offsets[:, 0] < ans_e)
        covers = f.offsets[0, 0] <= ans_s and f.offsets[-1, 1] >= ans_e
        if covers:
            labelled += 1
            assert _answer_text(ex[0], f) == answer
        else:
            assert f.start == f.end == 0                  # partial or absent answer -> the <s> null label
            partial += bool(inside.any())
    assert (per_token == 1).all()
    assert labelled >= 1 and partial >= 1                 # the answer does cross a window boundary


def test_long_question_is_cut(tok, tmp_path):
    context = "alpha beta gamma delta"
    ex = read_squad(_write(tmp_path / "q.json", context,
                           [{"id": "q", "question": "why " * 100, "answers": [{"text": "gamma", "answer_start": 11}]}]))
    (f,) = build_features(ex, tok, max_seq_length=40, doc_stride=8, max_query_length=5)
    assert f.ctx_start == 1 + 5 + tok.separators
    assert _answer_text(ex[0], f) == "gamma"


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [ {"title": ')
    with pytest.raises(SquadError, match="bad.json: not valid JSON"):
        read_squad(bad)
    ctx = "Denver Broncos won."
    off = _write(tmp_path / "off.json", ctx, [{"id": "q7", "question": "who?",
                                               "answers": [{"text": "Broncos", "answer_start": 3}]}])
    with pytest.raises(SquadError, match=r"question q7: answer 'Broncos' not at answer_start 3"):
        read_squad(off)
    v2 = _write(tmp_path / "v2.json", ctx, [{"id": "q8", "question": "who?", "answers": [], "is_impossible": True}])
    with pytest.raises(SquadError, match="q8 is_impossible but --version_2_with_negative is off"):
        read_squad(v2)
    assert read_squad(v2, version_2=True)[0].is_impossible
    # the command line: one error line, exit 2, no traceback
    from ibert_plugin.recipes.squad import run_squad

    for name, path in (("json", bad), ("offset", off)):
        d = tmp_path / name / "SQUAD1"
        d.mkdir(parents=True)
        (d / "train.json").write_bytes(path.read_bytes())
        (d / "dev.json").write_bytes(path.read_bytes())
        rc = run_squad(["--task", "SQUAD1", "--arch", "tiny", "--data_dir", str(tmp_path / name), "--stages", "fp",
                        "--output_dir", str(tmp_path / "o")])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
        assert str(d / "train.json") in errors[0]
    assert not (tmp_path / "o").exists()                  # nothing trained, nothing written
