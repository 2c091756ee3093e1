"""benchmarks/squad_accuracy.py: the data subsets it writes and the per-question F1 its intervals resample."""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("squad_accuracy", REPO / "benchmarks" / "squad_accuracy.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _article(title, questions):
    return {"title": title, "paragraphs": [{"context": "Paris is in France.", "qas": questions}]}


def _q(qid, answers, impossible=False):
    q = {"id": qid, "question": "where?", "answers": [{"text": t, "answer_start": 0} for t in answers]}
    if impossible:
        q["is_impossible"] = True
    return q


def _write_task(root: Path, task: str, version: str):
    (root / task).mkdir(parents=True)
    train = [_article(f"t{i}", [_q(f"t{i}q{j}", ["Paris"]) for j in range(3)]) for i in range(5)]
    dev = [_article(f"d{i}", [_q(f"d{i}a", ["Paris"]), _q(f"d{i}n", [], impossible=True)]) for i in range(4)]
    for name, arts in (("train.json", train), ("dev.json", dev)):
        (root / task / name).write_text(json.dumps({"version": version, "data": arts}))


def test_article_indices_accept_lists_ranges_and_all_and_refuse_the_rest():
    assert bench._article_indices("1,2", 10) == [1, 2]
    assert bench._article_indices("0-3,7", 10) == [0, 1, 2, 3, 7]
    assert bench._article_indices("all", 3) == [0, 1, 2]
    for bad in ("x", "3-a", "12", ""):
        with pytest.raises(SystemExit, match="error: --dev-articles"):
            bench._article_indices(bad, 10)


def test_subsets_are_disjoint_whole_articles_and_keep_the_v2_version(tmp_path):
    _write_task(tmp_path / "data", "SQUAD2", "v2.0")
    info = bench.write_subsets(tmp_path / "data", tmp_path / "out", "1-2", 4, task="SQUAD2")
    docs = {n: json.loads((tmp_path / "out" / n).read_text()) for n in ("train.json", "select.json", "test.json")}
    assert all(d["version"] == "v2.0" for d in docs.values())
    titles = {n: [a["title"] for a in d["data"]] for n, d in docs.items()}
    assert titles == {"train.json": ["t0", "t1", "t2"], "select.json": ["t3", "t4"], "test.json": ["d1", "d2"]}
    assert info["select.json"]["questions"] == 6 and info["test.json"] == {
        "articles": 2, "questions": 4, "unanswerable": 2,
        "source": "Disfl-QA held-out contexts (SQUAD2/dev.json), articles 1-2"}


def test_per_question_f1_scores_unanswerable_questions_as_the_official_v2_script(tmp_path):
    _write_task(tmp_path / "data", "SQUAD2", "v2.0")
    test = tmp_path / "data" / "SQUAD2" / "dev.json"
    pred = {"d0a": "Paris", "d0n": "", "d1a": "in Paris France", "d1n": "Paris", "d2a": "", "d2n": ""}
    (tmp_path / "p.json").write_text(json.dumps(pred))  # d3a, d3n missing: 0 each
    f1 = bench.per_question_f1(test, tmp_path / "p.json", version_2=True)
    assert f1 == pytest.approx([100.0, 100.0, 50.0, 0.0, 0.0, 100.0, 0.0, 0.0])


def test_per_question_f1_v1_takes_the_max_over_gold_answers(tmp_path):
    doc = {"version": "1.1", "data": [_article("a", [_q("x", ["the Eiffel Tower", "Paris"]), _q("y", ["France"]),
                                                      _q("z", ["Paris"])])]}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    (tmp_path / "p.json").write_text(json.dumps({"x": "Paris", "y": "in France"}))
    assert bench.per_question_f1(tmp_path / "t.json", tmp_path / "p.json") == pytest.approx([100.0, 200 / 3, 0.0])
