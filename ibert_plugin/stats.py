"""Paired bootstrap for accuracy gaps between two models scored on the same sentences (numpy only).

Efron & Tibshirani (1993), ch. 13 (percentile interval); Koehn (2004) for its use on paired system outputs: the test
sentences are resampled with replacement, the *same* resample is applied to both models, and the gap in accuracy is
recomputed on each resample. The 2.5th and 97.5th percentiles of the ``resamples`` gaps are the 95% interval. A gap
whose interval contains 0 is not distinguishable from noise on this test set.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Sequence

import numpy as np

__all__ = ["PairedGap", "paired_bootstrap", "paired_bootstrap_scores"]

#: Resamples and seed used by the demo and ``benchmarks/rt_sent_accuracy.py`` (fixed: the interval is reproducible).
DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0


@dataclass(frozen=True)
class PairedGap:
    """Accuracy gap ``b - a`` in points (percent) with its paired-bootstrap interval.

    Attributes:
        gap: observed ``100 * (acc_b - acc_a)``.
        low, high: bounds of the ``level`` percentile interval of the gap (points).
        level: interval coverage (0.95).
        n: number of paired sentences.
        resamples: bootstrap resamples drawn.
        disagreements: sentences where exactly one of the two models is right (only these move the gap).
    """

    gap: float
    low: float
    high: float
    level: float
    n: int
    resamples: int
    disagreements: int

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0 (the gap is not explained by resampling noise)."""
        return self.low > 0 or self.high < 0

    def describe(self) -> str:
        """``"-1.10 [-2.30, +0.10] noise"``-style text for tables."""
        verdict = "significant" if self.significant else "noise"
        return f"{self.gap:+.2f} [{self.low:+.2f}, {self.high:+.2f}] {verdict}"

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["significant"] = self.significant
        return d


def _bootstrap_mean(d: np.ndarray, resamples: int, level: float, seed: int):
    """Percentile interval of ``mean(d)`` over ``resamples`` resamples of its items with replacement."""
    if d.size == 0:
        raise ValueError("paired bootstrap needs at least one sentence")
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"resamples must be >= 1 and level in (0, 1), got {resamples}, {level}")
    n = d.size
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // n)  # bounded memory: chunk x n indices at a time
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = d[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(d.mean()), float(low), float(high)


def paired_bootstrap(
    correct_a: Sequence[bool],
    correct_b: Sequence[bool],
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = DEFAULT_SEED,
) -> PairedGap:
    """Paired bootstrap interval of ``accuracy(b) - accuracy(a)`` on the same sentences.

    Args:
        correct_a: per-sentence correctness of the reference model (e.g. FP32), length ``n``.
        correct_b: per-sentence correctness of the compared model, same sentences in the same order.
        resamples: number of bootstrap resamples (10,000).
        level: coverage of the percentile interval (0.95).
        seed: seed of ``numpy.random.default_rng`` (fixed so that tables are reproducible).

    Returns:
        :class:`PairedGap` in accuracy points.

    Raises:
        ValueError: lengths differ, no sentences, or arguments out of range.
    """
    a = np.asarray(correct_a, dtype=bool).reshape(-1)
    b = np.asarray(correct_b, dtype=bool).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same sentences: {a.size} vs {b.size} predictions")
    d = b.astype(np.int64) - a.astype(np.int64)  # per-sentence gap in {-1, 0, 1}
    gap, low, high = _bootstrap_mean(d, resamples, level, seed)
    return PairedGap(gap=100.0 * gap, low=100.0 * low, high=100.0 * high, level=level, n=int(d.size),
                     resamples=int(resamples), disagreements=int(np.count_nonzero(d)))


def paired_bootstrap_scores(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = DEFAULT_SEED,
) -> PairedGap:
    """Paired bootstrap interval of ``mean(b) - mean(a)`` for real-valued per-item scores (e.g. SQuAD token F1).

    Same resampling as :func:`paired_bootstrap`; the scores are taken in their own unit (pass F1 in points, 0..100)
    and ``disagreements`` counts the items whose two scores differ.

    Args:
        scores_a: per-item scores of the reference model, length ``n``.
        scores_b: per-item scores of the compared model, same items in the same order.
        resamples, level, seed: as in :func:`paired_bootstrap`.

    Raises:
        ValueError: lengths differ, no items, non-finite scores, or arguments out of range.
    """
    a = np.asarray(scores_a, dtype=np.float64).reshape(-1)
    b = np.asarray(scores_b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same items: {a.size} vs {b.size} scores")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired bootstrap scores must be finite")
    d = b - a
    gap, low, high = _bootstrap_mean(d, resamples, level, seed)
    return PairedGap(gap=gap, low=low, high=high, level=level, n=int(d.size), resamples=int(resamples),
                     disagreements=int(np.count_nonzero(d)))
