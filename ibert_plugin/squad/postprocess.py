"""Span logits -> answer texts (BERT ``write_predictions`` on character offsets).

Per feature, the ``n_best_size`` highest start and end logits over the window's *context* tokens form candidate
spans ``(i, j)`` with ``i <= j``, ``j - i + 1 <= max_answer_length`` and ``i`` in its best window (max context); a
span scores ``start[i] + end[j]`` and its text is the original context between the tokens' character offsets. Per
example, the best candidate over all its windows is the answer. v2.0: the null score is ``start[0] + end[0]`` (the
``<s>`` position), minimised over the windows; the prediction is ``""`` when
``null - best_non_null > null_score_diff_threshold``. ``null_odds`` keeps that difference per question (the official
v2.0 script's ``--na-prob-file`` input).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np

from .data import Example
from .features import Feature


def feature_candidates(feat: Feature, start: np.ndarray, end: np.ndarray, n_best_size: int,
                       max_answer_length: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Valid candidate spans of one feature: ``(scores [k], first token [k], last token [k])``, context-relative.

    Args:
        start, end: float logits over the feature's positions ``[T]`` (padding already cut off).
    """
    n = len(feat.offsets)
    c0 = feat.ctx_start
    s = np.asarray(start[c0:c0 + n], dtype=np.float64)
    e = np.asarray(end[c0:c0 + n], dtype=np.float64)
    k = min(n_best_size, n)
    if k == 0:
        z = np.zeros(0)
        return z, z.astype(np.int64), z.astype(np.int64)
    si = np.argsort(-s, kind="stable")[:k]
    ei = np.argsort(-e, kind="stable")[:k]
    i, j = np.meshgrid(si, ei, indexing="ij")
    ok = (j >= i) & (j - i + 1 <= max_answer_length) & feat.max_context[i]
    return (s[i] + e[j])[ok], i[ok], j[ok]


def predict(examples: Sequence[Example], features: Sequence[Feature], start_logits: Sequence[np.ndarray],
            end_logits: Sequence[np.ndarray], version_2: bool = False, n_best_size: int = 20,
            max_answer_length: int = 30, null_score_diff_threshold: float = 0.0
            ) -> Tuple[Dict[str, str], Dict[str, float]]:
    """Answers for every example that has at least one scored feature.

    Args:
        start_logits, end_logits: per feature (same order as ``features``), float ``[T_f]``; a feature with
            ``None`` logits is skipped.

    Returns:
        ``(predictions {qid: text}, null_odds {qid: null - best_non_null})``; ``null_odds`` only for v2.0.
    """
    best: Dict[int, Tuple[float, str]] = {}
    null: Dict[int, float] = {}
    for f, st, en in zip(features, start_logits, end_logits):
        if st is None:
            continue
        ex = examples[f.example_index]
        if version_2:
            score_null = float(st[0]) + float(en[0])
            null[f.example_index] = min(null.get(f.example_index, np.inf), score_null)
        best.setdefault(f.example_index, (-np.inf, ""))
        scores, i, j = feature_candidates(f, st, en, n_best_size, max_answer_length)
        if len(scores):
            b = int(np.argmax(scores))
            if scores[b] > best[f.example_index][0]:
                text = ex.context[int(f.offsets[i[b], 0]):int(f.offsets[j[b], 1])].strip()
                best[f.example_index] = (float(scores[b]), text)
    preds: Dict[str, str] = {}
    odds: Dict[str, float] = {}
    for ei, (score, text) in best.items():
        qid = examples[ei].qid
        if version_2:
            diff = null[ei] - score if np.isfinite(score) else np.inf
            odds[qid] = float(diff) if np.isfinite(diff) else 1e9
            preds[qid] = "" if diff > null_score_diff_threshold else text
        else:
            preds[qid] = text
    return preds, odds

