"""Official SQuAD v1.1 / v2.0 metrics and span post-processing against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest

from ibert_plugin.squad.data import Example
from ibert_plugin.squad.features import Feature
from ibert_plugin.squad.metrics import evaluate, evaluate_v1, evaluate_v2, f1_v1, f1_v2, normalize_answer
from ibert_plugin.squad.postprocess import predict


def test_normalize_answer():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("Theater") == "theater"       # 'the' only as a word
    assert normalize_answer("  ") == ""


def test_v1_by_hand():
    gold = {"q1": ["the Denver Broncos", "Denver Broncos"], "q2": ["Santa Clara, California"], "q3": ["1990"],
            "q4": ["cat"], "q5": ["five"]}
    preds = {"q1": "Broncos", "q2": "Clara California", "q3": "1991", "q4": "a Cat."}   # q5 missing: scores 0
    # q1: P 1, R 1/2 -> 2/3; q2: P 1, R 2/3 -> 0.8; q3: 0; q4: exact; q5: 0
    r = evaluate_v1(gold, preds)
    assert r["total"] == 5
    assert r["exact_match"] == pytest.approx(100 * 1 / 5)
    assert r["f1"] == pytest.approx(100 * (2 / 3 + 0.8 + 0 + 1 + 0) / 5)
    assert f1_v1("", "") == 0.0 and f1_v2("", "") == 1.0  # the two scripts differ on empty strings


def test_v2_by_hand():
    gold = {"q1": ["Broncos"], "q2": [], "q3": [], "q4": ["the cat", "a cat"], "q5": ["the"]}
    preds = {"q1": "Denver Broncos", "q2": "", "q3": "something", "q4": "", "q5": ""}
    # q5's only gold normalises to "" -> it counts as unanswerable, and "" is right.
    # q1: P 1/2, R 1 -> 2/3; q2: 1; q3: 0; q4: 0 (empty prediction, gold "cat"); q5: 1
    r = evaluate_v2(gold, preds)
    assert r["total"] == 5 and r["HasAns_total"] == 2 and r["NoAns_total"] == 3
    assert r["exact"] == pytest.approx(100 * 2 / 5)
    assert r["f1"] == pytest.approx(100 * (2 / 3 + 1 + 0 + 0 + 1) / 5)
    assert r["HasAns_exact"] == 0.0 and r["HasAns_f1"] == pytest.approx(100 * (2 / 3) / 2)
    assert r["NoAns_exact"] == pytest.approx(100 * 2 / 3) and r["NoAns_f1"] == pytest.approx(100 * 2 / 3)
    assert evaluate(gold, preds, version_2=True) == r
    assert set(evaluate({"a": ["x"]}, {"a": "x"}, version_2=False)) == {"exact", "f1", "total"}


def _feature(context, spans, ctx_start=3, example_index=0, max_context=None):
    offs = np.asarray(spans, dtype=np.int64)
    mc = np.ones(len(offs), bool) if max_context is None else np.asarray(max_context)
    T = ctx_start + len(offs) + 1
    return Feature(example_index, np.zeros(T, np.int64), ctx_start, offs, mc, 0, 0)


def test_predict_spans_length_limit_and_null_threshold():
    context = "alpha beta gamma delta"
    spans = [(0, 5), (6, 10), (11, 16), (17, 22)]
    ex = [Example("q", "?", context, [("beta", 6, 10)], ["beta"])]
    f = _feature(context, spans)
    T = len(f.tokens)
    start, end = np.zeros(T), np.zeros(T)
    start[3 + 1], end[3 + 2] = 5.0, 5.0                  # best span "beta gamma" (10.0)
    start[3 + 3], end[3 + 0] = 9.5, 9.5                  # end before start: never a candidate
    start[1], end[1] = 20.0, 20.0                        # question position: never a candidate
    preds, _ = predict(ex, [f], [start], [end])
    assert preds == {"q": "beta gamma"}
    preds, _ = predict(ex, [f], [start], [end], max_answer_length=1)
    assert preds["q"] in ("beta", "gamma", "delta")       # two-token spans excluded
    # v2.0: null = start[0] + end[0] = 11 vs best 10: diff 1 -> "" at threshold 0, the span at threshold 1.5
    start[0], end[0] = 7.0, 4.0
    preds, odds = predict(ex, [f], [start], [end], version_2=True)
    assert preds == {"q": ""} and odds["q"] == pytest.approx(1.0)
    preds, _ = predict(ex, [f], [start], [end], version_2=True, null_score_diff_threshold=1.5)
    assert preds == {"q": "beta gamma"}


def test_predict_uses_max_context_window_and_best_over_windows():
    context = "alpha beta gamma delta"
    spans = [(0, 5), (6, 10), (11, 16), (17, 22)]
    ex = [Example("q", "?", context, [("gamma", 11, 16)], ["gamma"])]
    w1 = _feature(context, spans[:3], max_context=[True, True, False])
    w2 = _feature(context, spans[1:], max_context=[False, True, True])
    s1, e1 = np.zeros(len(w1.tokens)), np.zeros(len(w1.tokens))
    s1[3 + 2], e1[3 + 2] = 50.0, 50.0                    # "gamma" in w1, but w1 is not its max-context window
    s1[3 + 0] = s1[3 + 1] = -100.0                      # (start alpha/beta, end gamma) stay valid but poor
    s2, e2 = np.zeros(len(w2.tokens)), np.zeros(len(w2.tokens))
    s2[3 + 1], e2[3 + 1] = 3.0, 3.0                      # "gamma" in w2 (its max-context window)
    preds, _ = predict(ex, [w1, w2], [s1, s2], [e1, e2])
    assert preds == {"q": "gamma"}


def test_best_null_threshold_by_hand():
    from ibert_plugin.squad.metrics import best_null_threshold

    gold = {"a": ["x y"], "b": [], "c": ["z"]}
    texts = {"a": "x y", "b": "w", "c": "q"}
    odds = {"a": -1.0, "b": 0.5, "c": 2.0}
    # abstain everywhere: F1 sum 1 (b); answer a (t=-1): 2; then b: 1; then c: 1 -> best 2 of 3 at t = -1
    f1, t = best_null_threshold(gold, texts, odds)
    assert f1 == pytest.approx(200 / 3) and t == -1.0
    # the rule "abstain when odds > t" reproduces the best score
    preds = {q: "" if odds[q] > t else texts[q] for q in gold}
    assert evaluate_v2(gold, preds)["f1"] == pytest.approx(f1)
    # every text wrong: abstaining everywhere is best, threshold below every odds value
    f1, t = best_null_threshold(gold, {"a": "no", "b": "w", "c": "q"}, odds)
    assert f1 == pytest.approx(100 / 3) and t < -1.0
    # tied odds move together: a (+1) and b (-1) share 0.0, so answering both gains nothing over abstaining
    f1, t = best_null_threshold(gold, texts, {"a": 0.0, "b": 0.0, "c": 2.0})
    assert f1 == pytest.approx(100 / 3) and t < 0.0
    # partial F1 counts: "x" against "x y" is P 1, R 1/2 -> 2/3
    f1, t = best_null_threshold({"a": ["x y"]}, {"a": "x"}, {"a": 3.0})
    assert f1 == pytest.approx(200 / 3) and t == 3.0
