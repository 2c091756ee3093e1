"""The official SQuAD metrics (``evaluate-v1.1.py`` and ``evaluate-v2.0.py``), as functions.

* :func:`normalize_answer`: lower case, drop punctuation, drop the articles a/an/the, collapse whitespace.
* v1.1 (:func:`evaluate_v1`): exact match and token F1, each the max over the gold answers; a question without a
  prediction scores 0; both reported x100 over all questions.
* v2.0 (:func:`evaluate_v2`): gold answers that normalise to ``""`` are dropped and an unanswerable question has
  the single gold answer ``""``; an empty prediction or gold gives F1 = EM = (both empty). Reported as ``exact``,
  ``f1``, ``total`` plus ``HasAns_*`` / ``NoAns_*`` breakdowns. As in TernaryBERT (no ``--na-prob-file``: all
  no-answer probabilities 0 with threshold 1.0), the raw scores are reported.
* :func:`best_null_threshold`: the v2.0 script's ``best_f1`` / ``best_f1_thresh`` sweep over the null odds, used to
  choose ``--null_score_diff_threshold`` on a selection set (``select``) and apply it to held-out data.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Dict, Iterable, List, Tuple

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """Official normalisation: lower, remove punctuation, remove articles, fix whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def f1_v1(prediction: str, ground_truth: str) -> float:
    """v1.1 token F1 (0 when nothing overlaps, also for two empty strings)."""
    p, g = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def exact_v1(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_v2(prediction: str, gold: str) -> float:
    """v2.0 token F1: if either side has no tokens, 1 when both have none, else 0."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def evaluate_v1(gold: Dict[str, List[str]], predictions: Dict[str, str]) -> Dict[str, float]:
    """Official v1.1 scores.

    Args:
        gold: question id -> gold answer texts (every question of the dev set).
        predictions: question id -> predicted text; missing ids score 0.

    Returns:
        ``{"exact_match", "f1", "total"}`` (percentages).
    """
    em = f1 = 0.0
    for qid, answers in gold.items():
        if qid not in predictions:
            continue
        pred = predictions[qid]
        em += max(exact_v1(pred, a) for a in answers)
        f1 += max(f1_v1(pred, a) for a in answers)
    n = len(gold)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n, "total": n}


def evaluate_v2(gold: Dict[str, List[str]], predictions: Dict[str, str]) -> Dict[str, float]:
    """Official v2.0 scores (raw, no-answer threshold not applied; see module docstring).

    Args:
        gold: question id -> gold answer texts, ``[]`` for an unanswerable question.
        predictions: question id -> predicted text (``""`` = no answer); missing ids score 0.

    Returns:
        ``exact``, ``f1``, ``total`` and, where present, ``HasAns_exact/f1/total``, ``NoAns_exact/f1/total``.
    """
    exact: Dict[str, float] = {}
    f1: Dict[str, float] = {}
    has_ans = []
    for qid, answers in gold.items():
        golds = [a for a in answers if normalize_answer(a)]
        (has_ans if golds else []).append(qid)
        if not golds:
            golds = [""]
        if qid not in predictions:
            continue
        pred = predictions[qid]
        exact[qid] = max(float(normalize_answer(a) == normalize_answer(pred)) for a in golds)
        f1[qid] = max(f1_v2(pred, a) for a in golds)
    has = set(has_ans)
    out = _totals(exact, f1, gold.keys())
    if has:
        out.update({f"HasAns_{k}": v for k, v in _totals(exact, f1, [q for q in gold if q in has]).items()})
    no = [q for q in gold if q not in has]
    if no:
        out.update({f"NoAns_{k}": v for k, v in _totals(exact, f1, no).items()})
    return out


def best_null_threshold(gold: Dict[str, List[str]], texts: Dict[str, str],
                        null_odds: Dict[str, float]) -> Tuple[float, float]:
    """The null-score threshold that maximises v2.0 F1 on ``gold`` (the official v2.0 script's ``best_f1`` sweep).

    A question is answered with ``texts[qid]`` when ``null_odds[qid] <= threshold`` and abstains (``""``) otherwise,
    the rule of :func:`ibert_plugin.squad.postprocess.predict`. Every distinct odds value is tried (ties move
    together, so the rule reproduces the score), plus "abstain everywhere".

    Args:
        gold: question id -> gold answer texts, ``[]`` for an unanswerable question.
        texts: question id -> best non-null answer text (``predict`` with an infinite threshold).
        null_odds: question id -> ``null - best_non_null`` score difference.

    Returns:
        ``(best F1 in percent over every question of gold, threshold)``; the smallest threshold reaching the best.
    """
    qids = [q for q in gold if q in texts and q in null_odds]
    if not qids or not gold:
        return 0.0, 0.0
    # answering a question instead of abstaining changes the F1 sum by text_f1 - null_f1
    golds = {q: [a for a in gold[q] if normalize_answer(a)] or [""] for q in qids}
    null_f1 = {q: max(f1_v2("", a) for a in golds[q]) for q in qids}
    text_f1 = {q: max(f1_v2(texts[q], a) for a in golds[q]) for q in qids}
    order = sorted(qids, key=lambda q: null_odds[q])
    cur = sum(null_f1.values())
    best, thresh = cur, min(null_odds[q] for q in qids) - 1.0
    i = 0
    while i < len(order):
        v = null_odds[order[i]]
        while i < len(order) and null_odds[order[i]] == v:
            cur += text_f1[order[i]] - null_f1[order[i]]
            i += 1
        if cur > best:
            best, thresh = cur, v
    return 100.0 * best / len(gold), float(thresh)


def _totals(exact: Dict[str, float], f1: Dict[str, float], qids: Iterable[str]) -> Dict[str, float]:
    qids = list(qids)
    n = len(qids)
    return {"exact": 100.0 * sum(exact.get(q, 0.0) for q in qids) / n,
            "f1": 100.0 * sum(f1.get(q, 0.0) for q in qids) / n, "total": n}


def evaluate(gold: Dict[str, List[str]], predictions: Dict[str, str], version_2: bool) -> Dict[str, float]:
    """v1.1 or v2.0 scores with uniform keys ``exact`` and ``f1`` (v1.1's ``exact_match`` renamed)."""
    if version_2:
        return evaluate_v2(gold, predictions)
    r = evaluate_v1(gold, predictions)
    return {"exact": r["exact_match"], "f1": r["f1"], "total": r["total"]}
