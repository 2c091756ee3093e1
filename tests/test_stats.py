"""Paired bootstrap interval of an accuracy gap (ibert_plugin.stats)."""
import numpy as np
import pytest

from ibert_plugin.stats import paired_bootstrap, paired_bootstrap_scores


def test_identical_predictions_have_a_zero_width_interval():
    c = np.random.default_rng(1).random(500) < 0.8
    g = paired_bootstrap(c, c, resamples=2000)
    assert (g.gap, g.low, g.high, g.disagreements) == (0.0, 0.0, 0.0, 0)
    assert not g.significant and g.describe().endswith("noise")


def test_interval_matches_the_normal_approximation_of_the_paired_difference():
    rng = np.random.default_rng(2)
    n = 1000
    a = rng.random(n) < 0.82
    b = a.copy()
    flip = rng.choice(n, 60, replace=False)  # 60 disagreements: 45 where b loses, 15 where b wins
    a[flip[:45]], b[flip[:45]] = True, False
    a[flip[45:]], b[flip[45:]] = False, True
    g = paired_bootstrap(a, b, resamples=10000, seed=0)
    d = b.astype(float) - a.astype(float)
    assert g.gap == pytest.approx(100 * d.mean()) and g.gap == pytest.approx(-3.0)
    half = 1.96 * 100 * d.std(ddof=0) / np.sqrt(n)  # the bootstrap percentile interval converges to this
    assert g.low == pytest.approx(g.gap - half, abs=0.25) and g.high == pytest.approx(g.gap + half, abs=0.25)
    assert g.significant and g.disagreements == 60


def test_small_gap_on_few_disagreements_is_noise_and_seed_is_fixed():
    a = np.ones(1000, dtype=bool)
    a[:180] = False
    b = a.copy()
    b[0] = True  # one sentence better: +0.1 point
    g1, g2 = paired_bootstrap(a, b), paired_bootstrap(a, b)
    assert g1 == g2 and g1.gap == pytest.approx(0.1)
    assert g1.low <= 0.0 <= g1.high and not g1.significant


def test_rejects_unpaired_inputs():
    with pytest.raises(ValueError, match="same sentences"):
        paired_bootstrap([True, False], [True])
    with pytest.raises(ValueError, match="at least one"):
        paired_bootstrap([], [])


def test_real_valued_scores_match_the_accuracy_version_on_zero_one_scores():
    rng = np.random.default_rng(3)
    a = rng.random(400) < 0.7
    b = rng.random(400) < 0.6
    g = paired_bootstrap(a, b, resamples=3000, seed=5)
    s = paired_bootstrap_scores(100.0 * a, 100.0 * b, resamples=3000, seed=5)
    assert (s.gap, s.low, s.high, s.disagreements) == pytest.approx((g.gap, g.low, g.high, g.disagreements))


def test_real_valued_scores_interval_follows_the_normal_approximation():
    rng = np.random.default_rng(4)
    a = rng.uniform(0, 100, 2000)
    b = np.clip(a + rng.normal(-2.0, 10.0, 2000), 0, 100)  # F1-like scores, b about 2 points lower
    s = paired_bootstrap_scores(a, b, resamples=10000, seed=0)
    d = b - a
    half = 1.96 * d.std(ddof=0) / np.sqrt(d.size)
    assert s.gap == pytest.approx(d.mean())
    assert s.low == pytest.approx(d.mean() - half, abs=0.15) and s.high == pytest.approx(d.mean() + half, abs=0.15)
    assert s.significant


def test_real_valued_scores_reject_bad_input():
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap_scores([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap_scores([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        paired_bootstrap_scores([], [])
