"""Paired statistics: each statistic against hand or exact computations, then calibration and power by simulation.

Every simulation is seeded, so the suite is deterministic; the tolerances are nonetheless set from
Monte-Carlo standard errors so that they would hold for most seeds, not just the chosen one.
"""

import dataclasses
import itertools
import math
import warnings
from fractions import Fraction
from statistics import NormalDist

import numpy as np
import pytest

from jtc_lens.harness import stats
from jtc_lens.harness.stats import (
    LayerComparison,
    compare,
    holm,
    mcnemar_exact_pvalue,
    pair_by_id,
    paired_bootstrap_ci,
    sign_flip_pvalue,
)

ALPHA = 0.05


def mc_se(p: float, reps: int) -> float:
    return math.sqrt(p * (1 - p) / reps)


# ---------------------------------------------------------------------------------------------
# pair_by_id


def test_pair_by_id_aligns_shuffled_ids():
    ids_a = ["d0", "d1", "d2", "d3", "d4"]
    a = [0.0, 1.0, 2.0, 3.0, 4.0]
    order = [3, 0, 4, 2, 1]
    ids_b = [ids_a[k] for k in order]
    b = [10.0 + k for k in order]  # item k of B is worth 10 + k
    ids, pa, pb = pair_by_id(ids_a, a, ids_b, b)
    assert ids == ids_a
    np.testing.assert_array_equal(pa, a)
    np.testing.assert_array_equal(pb, np.array(a) + 10)


def test_pair_by_id_rejects_different_item_sets():
    with pytest.raises(ValueError) as err:
        pair_by_id(["x", "y", "z", "w"], [1, 2, 3, 4], ["x", "y", "q"], [1, 2, 3])
    message = str(err.value)
    assert "2 id(s) only in A" in message and "'z'" in message and "'w'" in message
    assert "1 id(s) only in B" in message and "'q'" in message


def test_pair_by_id_error_quotes_only_a_few_examples():
    ids_a = [f"item{i}" for i in range(100)]
    with pytest.raises(ValueError) as err:
        pair_by_id(ids_a, np.zeros(100), ids_a[:10], np.zeros(10))
    message = str(err.value)
    assert "90 id(s) only in A" in message and "..." in message
    assert "item99" not in message


@pytest.mark.parametrize("side", ["A", "B"])
def test_pair_by_id_rejects_duplicate_ids(side):
    unique, repeated = ["a", "b", "c"], ["a", "b", "b"]
    ids_a, ids_b = (repeated, unique) if side == "A" else (unique, repeated)
    with pytest.raises(ValueError, match=rf"1 item id\(s\) occur more than once in {side}.*'b'"):
        pair_by_id(ids_a, [1, 2, 3], ids_b, [1, 2, 3])


def test_pair_by_id_checks_item_contents_when_given():
    ids_a, ids_b = ["x", "y", "z"], ["z", "x", "y"]
    same = pair_by_id(ids_a, [1, 2, 3], ids_b, [3, 1, 2], ["hx", "hy", "hz"], ["hz", "hx", "hy"])
    assert same[0] == ids_a
    with pytest.raises(ValueError, match=r"different contents under the same item ids: 1 of 3 item\(s\) differ, e.g. \['y'\]"):
        pair_by_id(ids_a, [1, 2, 3], ids_b, [3, 1, 2], ["hx", "hy", "hz"], ["hz", "hx", "EDITED"])
    with pytest.raises(ValueError, match="one side only"):
        pair_by_id(ids_a, [1, 2, 3], ids_b, [3, 1, 2], ["hx", "hy", "hz"], None)


def test_compare_refuses_items_whose_contents_differ():
    ids = ["a", "b", "c", "d"]
    x = np.arange(8.0).reshape(4, 2)
    rows = compare(ids, x, ids, x + 1, "kl", n_resamples=200, contents_a=list("ABCD"), contents_b=list("ABCD"))
    assert len(rows) == 2
    with pytest.raises(ValueError, match=r"2 of 4 item\(s\) differ, e.g. \['b', 'd'\]"):
        compare(ids, x, ids, x + 1, "kl", n_resamples=200, contents_a=list("ABCD"), contents_b=list("AXCY"))


def test_pair_by_id_rejects_length_mismatch_and_nan():
    with pytest.raises(ValueError, match="differ in length"):
        pair_by_id(["a", "b"], [1.0], ["a", "b"], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-finite"):
        pair_by_id(["a", "b"], [1.0, np.nan], ["a", "b"], [1.0, 2.0])


# ---------------------------------------------------------------------------------------------
# sign-flip test


def exact_sign_flip(d: np.ndarray) -> float:
    """P(|mean of sign-flipped d| >= |observed mean|) over all 2**n sign patterns."""
    signs = np.array(list(itertools.product([1.0, -1.0], repeat=len(d))))
    null = (signs * d).mean(axis=1)
    observed = abs(d.mean())
    return float(np.mean(np.abs(null) >= observed - 1e-12))


@pytest.mark.parametrize(
    "d",
    [
        [0.5, -1.5, 2.0, 1.0, 1.5, -0.5, 1.0, 2.5],
        [1.0, 1.0, -1.0, 0.0, 2.0, 0.0, 1.0, 1.0],  # ties and zero differences
        [0.3, -0.2, 0.1, -0.4, 0.25, -0.05, 0.15, -0.1],  # near the null
    ],
)
def test_sign_flip_equals_exact_enumeration_for_8_items(d):
    d = np.array(d)
    b = np.linspace(-1, 1, d.size)
    expected = exact_sign_flip(d)
    # 2**8 = 256 <= n_resamples: every sign pattern is enumerated, so the seed does not matter
    assert sign_flip_pvalue(b + d, b) == pytest.approx(expected, abs=1e-12)
    assert sign_flip_pvalue(b + d, b, seed=123) == pytest.approx(expected, abs=1e-12)
    assert sign_flip_pvalue(b + d, b, n_resamples=256) == pytest.approx(expected, abs=1e-12)


def test_sign_flip_sampled_is_close_to_exact_and_seeded():
    rng = np.random.default_rng(7)
    d = rng.normal(0.4, 1.0, 14)
    expected = exact_sign_flip(d)  # 2**14 patterns, more than the 2000 sampled below
    p = sign_flip_pvalue(d, np.zeros_like(d), n_resamples=2000, seed=1)
    assert abs(p - expected) <= 3 * mc_se(expected, 2000) + 1 / 2001
    assert p == sign_flip_pvalue(d, np.zeros_like(d), n_resamples=2000, seed=1)


def test_sign_flip_all_zero_differences_is_one():
    a = np.array([0.3, 1.2, -4.0, 2.5])
    assert sign_flip_pvalue(a, a.copy()) == 1.0


def test_sign_flip_is_symmetric_in_a_and_b():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=9), rng.normal(size=9)
    assert sign_flip_pvalue(a, b) == pytest.approx(sign_flip_pvalue(b, a), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# McNemar


def binary_pairs(a_only: int, b_only: int, both: int, neither: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """0/1 arrays with the given cell counts, in a shuffled order."""
    a = np.array([1] * a_only + [0] * b_only + [1] * both + [0] * neither)
    b = np.array([0] * a_only + [1] * b_only + [1] * both + [0] * neither)
    order = np.random.default_rng(seed).permutation(a.size)
    return a[order], b[order]


def test_mcnemar_equals_hand_binomial():
    a, b = binary_pairs(a_only=9, b_only=2, both=30, neither=12)
    expected = 2 * sum(math.comb(11, k) for k in range(3)) / 2**11
    assert expected == pytest.approx(0.0654296875)
    assert mcnemar_exact_pvalue(a, b) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact_pvalue(b, a) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "a_only, b_only, expected",
    [(5, 0, 2 / 2**5), (3, 3, 1.0), (4, 3, 1.0), (0, 0, 1.0), (1, 0, 1.0)],
)
def test_mcnemar_small_cases(a_only, b_only, expected):
    a, b = binary_pairs(a_only, b_only, both=4, neither=4)
    assert mcnemar_exact_pvalue(a, b) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_accepts_booleans_and_rejects_non_binary():
    a, b = binary_pairs(6, 1, 3, 3)
    assert mcnemar_exact_pvalue(a.astype(bool), b.astype(bool)) == mcnemar_exact_pvalue(a, b)
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact_pvalue([1, 0, 0.5], [0, 0, 1])


# ---------------------------------------------------------------------------------------------
# Holm


def test_holm_hand_example():
    # sorted: 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; running max 0.02, 0.03, 0.06, 0.06
    adjusted, reject = holm([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_array_equal(reject, [True, False, False, True])


def step_down(p: np.ndarray, alpha: float) -> np.ndarray:
    """Holm's procedure as stated: reject in increasing order of p while p_(k) <= alpha / (m - k), k from 0."""
    m = len(p)
    reject = np.zeros(m, dtype=bool)
    for k, i in enumerate(np.argsort(p, kind="stable")):
        if p[i] > alpha / (m - k):
            break
        reject[i] = True
    return reject


def test_holm_matches_the_step_down_procedure_and_its_properties():
    rng = np.random.default_rng(11)
    for _ in range(200):
        m = int(rng.integers(1, 15))
        # a mixture of tiny and ordinary p-values so that both outcomes occur
        p = np.where(rng.random(m) < 0.4, rng.random(m) * 0.01, rng.random(m))
        for alpha in (0.05, 0.1):
            adjusted, reject = holm(p, alpha)
            np.testing.assert_array_equal(reject, step_down(p, alpha))
            order = np.argsort(p, kind="stable")
            assert np.all(np.diff(adjusted[order]) >= 0)  # monotone in p
            assert np.all(adjusted >= p) and np.all(adjusted <= 1)
            assert np.all(adjusted <= np.minimum(1, m * p) + 1e-15)  # never worse than Bonferroni


def test_holm_edge_cases():
    adjusted, reject = holm([0.03])
    assert adjusted.tolist() == [0.03] and reject.tolist() == [True]
    adjusted, reject = holm([0.6, 0.7, 0.9])
    assert adjusted.tolist() == [1.0, 1.0, 1.0] and not reject.any()
    adjusted, reject = holm([])
    assert adjusted.size == 0 and reject.size == 0
    for bad in ([0.1, np.nan], [1.2], [-0.1]):
        with pytest.raises(ValueError):
            holm(bad)


# ---------------------------------------------------------------------------------------------
# bootstrap interval


def test_bootstrap_ci_contains_true_difference():
    rng = np.random.default_rng(5)
    b = rng.normal(size=400)
    a = b + rng.normal(0.5, 1.0, 400)
    low, high = paired_bootstrap_ci(a, b, n_resamples=2000, seed=9)
    assert low < 0.5 < high
    assert high - low == pytest.approx(2 * 1.96 / math.sqrt(400), rel=0.2)


def bca_by_hand(d: np.ndarray, n_resamples: int, seed: int, confidence: float = 0.95):
    """BCa and percentile intervals of mean(d), written out (Efron 1987) with numpy resamples and the
    standard normal of the standard library: bias correction z0 from the share of bootstrap means below
    the estimate, acceleration from the jackknife's third moment."""
    rng = np.random.default_rng(seed)
    n = d.size
    means = np.concatenate([d[rng.integers(0, n, size=(20_000, n))].mean(axis=1) for _ in range(n_resamples // 20_000)])
    normal = NormalDist()
    z0 = normal.inv_cdf(float(np.mean(means < d.mean())))
    jack = (d.sum() - d) / (n - 1)
    dev = jack.mean() - jack
    accel = (dev**3).sum() / (6 * (dev**2).sum() ** 1.5)
    ends = ((1 - confidence) / 2, (1 + confidence) / 2)
    bca = [np.quantile(means, normal.cdf(z0 + (z0 + z) / (1 - accel * (z0 + z)))) for z in map(normal.inv_cdf, ends)]
    return tuple(bca), tuple(np.quantile(means, ends))


def test_bootstrap_ci_is_bca_by_an_independent_computation():
    # Strongly skewed differences, where BCa and the percentile interval differ (by about 0.06 and 0.11 here).
    # Over seeds, the code's endpoints with 20000 resamples spread by a standard deviation of 0.005 and 0.010
    # (measured over 30 seeds), the hand computation's with 400000 by a fifth of that: 0.03 is 3 standard deviations.
    d = np.random.default_rng(5).exponential(size=25) ** 2
    low, high = paired_bootstrap_ci(d, np.zeros_like(d), n_resamples=20_000, seed=9)
    (bca_low, bca_high), (pct_low, pct_high) = bca_by_hand(d, 400_000, seed=1)
    assert abs(low - bca_low) < 0.03 and abs(high - bca_high) < 0.03, ((low, high), (bca_low, bca_high))
    assert bca_low - pct_low > 0.05 and bca_high - pct_high > 0.05  # so the check tells BCa from percentile


def test_bootstrap_ci_constant_differences():
    b = np.arange(20, dtype=float)
    assert paired_bootstrap_ci(b + 0.25, b) == (0.25, 0.25)
    assert paired_bootstrap_ci([1.0], [3.0]) == (-2.0, -2.0)


def test_bootstrap_ci_falls_back_when_bca_is_undefined():
    # two items and three resamples: some seeds draw resamples all below the observed mean,
    # where BCa is undefined; the interval must still be finite and ordered, without warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(20):
            low, high = paired_bootstrap_ci([1.0, 0.0], [0.0, 0.0], n_resamples=3, seed=seed)
            assert np.isfinite(low) and np.isfinite(high) and 0.0 <= low <= high <= 1.0


def test_bootstrap_ci_coverage():
    reps, n, delta = 200, 40, 0.3
    rng = np.random.default_rng(21)
    covered = 0
    for r in range(reps):
        d = rng.standard_t(5, n) + delta  # heavier tails than normal
        low, high = paired_bootstrap_ci(d, np.zeros(n), n_resamples=1000, seed=r)
        covered += low <= delta <= high
    # bootstrap intervals run short of nominal at small n (they use the plug-in variance and normal
    # rather than t quantiles): about 92% here over 2000 replications, hence an allowance of 0.04
    assert covered / reps >= 0.95 - 3 * mc_se(0.95, reps) - 0.04


# ---------------------------------------------------------------------------------------------
# compare


def continuous_family(rng: np.random.Generator, n: int, layers: int, delta: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Paired per-item values (items x layers) with shared item difficulty and layer-correlated projector noise.

    A and B have the same distribution when delta = 0; a - b has mean delta otherwise. Skewed
    (exponential) noise mimics surprisal-like metrics.
    """
    item = rng.normal(size=(n, 1))
    depth = np.linspace(2.0, 0.5, layers)[None, :]
    def one_projector():
        persistent = rng.exponential(size=(n, 1))  # how hard this projector finds the item, at every layer
        return item + depth + 0.6 * persistent + 0.8 * rng.exponential(size=(n, layers))
    return one_projector() + delta, one_projector()


def binary_family(rng: np.random.Generator, n: int, layers: int) -> tuple[np.ndarray, np.ndarray]:
    """Paired 0/1 values from a latent-threshold model; A and B are exchangeable within each item."""
    item = rng.normal(size=(n, 1))
    threshold = np.linspace(1.0, -1.0, layers)[None, :]
    def one_projector():
        return (item + 0.5 * rng.normal(size=(n, 1)) + 0.7 * rng.normal(size=(n, layers)) > threshold).astype(float)
    return one_projector(), one_projector()


def test_compare_continuous_fields_and_consistency():
    rng = np.random.default_rng(0)
    a, b = continuous_family(rng, 30, 4, delta=0.5)
    ids = [f"doc{i}" for i in range(30)]
    rows = compare(ids, a, ids, b, "surprisal", n_resamples=500, seed=3)
    assert [r.layer for r in rows] == [0, 1, 2, 3]
    for k, r in enumerate(rows):
        assert isinstance(r, LayerComparison)
        assert r.test == "sign-flip" and r.metric == "surprisal" and r.correction == "holm"
        assert r.family_size == 4 and r.n == 30 and r.alpha == ALPHA and r.confidence == pytest.approx(0.95)
        assert r.mean_a == pytest.approx(a[:, k].mean()) and r.mean_b == pytest.approx(b[:, k].mean())
        assert r.diff == pytest.approx(r.mean_a - r.mean_b)
        assert r.ci_low <= r.diff <= r.ci_high
        assert r.significant == (r.p_holm <= ALPHA)
    adjusted, _ = holm([r.p_value for r in rows])
    np.testing.assert_allclose([r.p_holm for r in rows], adjusted)
    assert compare(ids, a, ids, b, "surprisal", n_resamples=500, seed=3) == rows  # deterministic


def test_compare_aligns_ids_and_accepts_dicts():
    rng = np.random.default_rng(1)
    a, b = continuous_family(rng, 25, 3, delta=0.3)
    ids = [f"doc{i}" for i in range(25)]
    order = rng.permutation(25)
    ids_b = [ids[k] for k in order]
    reference = compare(ids, a, ids, b, "kl", n_resamples=500)
    shuffled = compare(ids, a, ids_b, b[order], "kl", n_resamples=500)
    assert shuffled == reference
    as_dicts = compare(ids, {l: a[:, l] for l in range(3)}, ids_b, {l: b[order, l] for l in range(3)}, "kl", n_resamples=500)
    assert as_dicts == reference


def test_compare_binary_uses_mcnemar():
    rng = np.random.default_rng(2)
    a, b = binary_family(rng, 50, 3)
    ids = list(range(50))
    for metric in ("p@1", "accuracy"):  # chosen by the values, whatever the name
        rows = compare(ids, a, ids, b, metric, n_resamples=500)
        assert {r.test for r in rows} == {"mcnemar-exact"}
        assert [r.p_value for r in rows] == [mcnemar_exact_pvalue(a[:, k], b[:, k]) for k in range(3)]


def test_compare_fractional_precision_uses_sign_flip():
    # per-item Precision@k averaged over several scored positions is not 0/1
    rng = np.random.default_rng(3)
    a = rng.integers(0, 5, size=(40, 2)) / 4
    b = rng.integers(0, 5, size=(40, 2)) / 4
    rows = compare(list(range(40)), a, list(range(40)), b, "p@5", n_resamples=500)
    assert {r.test for r in rows} == {"sign-flip"}


def test_compare_to_dict_and_frozen():
    ids = ["a", "b", "c", "d"]
    a = {np.int64(7): [0.1, 0.5, 0.2, 0.9], np.int64(3): [0.3, 0.3, 0.1, 0.2]}
    b = {np.int64(3): [0.2, 0.1, 0.4, 0.3], np.int64(7): [0.0, 0.2, 0.2, 0.5]}
    rows = compare(ids, a, ids, b, "entropy", n_resamples=500)
    assert [r.layer for r in rows] == [7, 3]  # A's order
    d = rows[0].to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(LayerComparison)}
    assert type(d["layer"]) is int and d["family_size"] == 2 and d["correction"] == "holm"
    with pytest.raises(dataclasses.FrozenInstanceError):
        rows[0].p_value = 0.0


def test_compare_rejects_bad_input():
    ids = ["a", "b", "c"]
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="different layers"):
        compare(ids, {0: [1, 2, 3], 1: [1, 2, 3]}, ids, {0: [1, 2, 3], 2: [1, 2, 3]}, "kl")
    with pytest.raises(ValueError, match="3 item ids"):
        compare(ids, np.zeros((2, 3)), ids, np.zeros((2, 3)), "kl")  # layers x items
    with pytest.raises(ValueError, match="2-D"):
        compare(ids, np.zeros(3), ids, np.zeros(3), "kl")
    with pytest.raises(ValueError, match="only in B"):
        compare(ids, x, ["a", "b", "z"], x, "kl")
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact_pvalue(x[:, 0] + 0.5, x[:, 0])


# ---------------------------------------------------------------------------------------------
# calibration under the null: family-wise error rate after Holm, against its exact value
#
# Under the global null (no layer differs), Holm rejects some layer exactly when its first step does:
# the smallest of the m p-values is at most alpha / m (every later step needs a rejection before it).
# With independent layers, P(no rejection) = prod_j P(p_j > alpha / m), so
#     FWER = 1 - (1 - pi)^m,   pi = P(p <= alpha / m) for one layer.
# A continuous, exactly uniform p-value has pi = alpha / m, giving 1 - (1 - alpha/m)^m (0.04917 for m = 3).
# Our p-values are discrete, and pi is computed exactly for each below:
# - sign flips with R random sign patterns (scipy's permutation test): p = 2 min(G + 1, R + 1 - G) / (R + 1),
#   G the number of patterns whose mean is at least the observed one. Under the null the observed pattern
#   is one more uniform draw, so (continuous data: no ties) G is uniform on 0..R and
#   pi = 2 floor((alpha/m)(R + 1) / 2) / (R + 1); R = 249 gives pi = 4/250 = 0.016, FWER = 1 - 0.984^3 = 0.04724.
#   The attainable p-values, 2j/250, stay clear of alpha/m: 3 x 0.016 = 0.048 and 3 x 0.024 = 0.072.
# - exact McNemar: pi summed over the discordant count D ~ Binomial(n, 2q) and the split k ~ Binomial(D, 1/2),
#   rejecting when 2 P(Binomial(D, 1/2) <= min(k, D - k)) <= alpha / m.
#
# Band: the simulated rate of N families has standard error s = sqrt(f (1 - f) / N) about the exact f; the test
# accepts f +- 3 s. It must reject a procedure whose true rate is 0.07: that one's simulated rate falls below
# f + 3 s with probability Phi((f + 3 s - 0.07) / s1), s1 = sqrt(0.07 x 0.93 / N).
# - sign flips, f = 0.04724, N = 2600: s = 0.00416, accepted up to 0.0597; s1 = 0.0050, so a true 0.07 passes
#   with probability Phi(-2.06) = 2%.
# - McNemar, f = 0.0343 (n = 100, q = 0.25), N = 1000: s = 0.0058, accepted up to 0.0517; s1 = 0.0081, so a
#   true 0.07 passes with probability Phi(-2.27) = 1%.
# Each family costs two resampling tests per layer (the p-value and the bootstrap interval), 2 to 3 ms.


NULL_LAYERS = 3
NULL_RESAMPLES = 249


def sign_flip_rejection_probability(level: float, n_resamples: int) -> float:
    """P(p <= level) for the sign-flip p-value from n_resamples random patterns, under the null, continuous data."""
    half = level * (n_resamples + 1) / 2
    assert abs(half - round(half)) > 0.05, "level on an attainable p-value: float rounding would decide"
    return 2 * math.floor(half) / (n_resamples + 1)


def mcnemar_rejection_probability(n: int, q: float, level: float, m: int) -> float:
    """P(m x McNemar p <= m x level) for n items, each discordant either way with probability q, by exact sums."""
    target = Fraction(level).limit_denominator(10**6) * m
    total = 0.0
    for disc in range(n + 1):
        tails = list(itertools.accumulate(math.comb(disc, j) for j in range(disc + 1)))  # tails[j] = sum_{i <= j} C(disc, i)
        rejected = 0
        for k in range(disc + 1):
            p = min(Fraction(1), Fraction(2 * tails[min(k, disc - k)], 2**disc))
            # the code compares floats; no attainable p may sit close enough to the boundary for rounding to matter
            assert abs(float(m * p - target)) > 1e-9
            rejected += math.comb(disc, k) if m * p <= target else 0
        total += math.comb(n, disc) * (2 * q) ** disc * (1 - 2 * q) ** (n - disc) * rejected / 2**disc
    return total


def band(rate: float, expected: float, families: int) -> None:
    s = mc_se(expected, families)
    assert abs(rate - expected) <= 3 * s, f"family-wise error rate {rate:.4f}, exact {expected:.4f} +- {3 * s:.4f}"


def test_family_wise_error_rate_equals_its_exact_value_sign_flip():
    families, n = 2600, 40
    pi = sign_flip_rejection_probability(ALPHA / NULL_LAYERS, NULL_RESAMPLES)
    expected = 1 - (1 - pi) ** NULL_LAYERS
    assert expected == pytest.approx(1 - 0.984**3)
    rng = np.random.default_rng(2024)
    ids = [f"item{i}" for i in range(n)]
    any_rejected = 0
    for r in range(families):
        # A and B exchangeable, every layer independent of the others; skewed like surprisal or KL
        a, b = rng.exponential(size=(n, NULL_LAYERS)), rng.exponential(size=(n, NULL_LAYERS))
        rows = compare(ids, a, ids, b, "kl", n_resamples=NULL_RESAMPLES, seed=r)
        assert rows[0].test == "sign-flip"
        any_rejected += any(row.significant for row in rows)
    band(any_rejected / families, expected, families)


def test_family_wise_error_rate_equals_its_exact_value_mcnemar():
    families, n, q = 1000, 100, 0.25
    pi = mcnemar_rejection_probability(n, q, ALPHA / NULL_LAYERS, NULL_LAYERS)
    expected = 1 - (1 - pi) ** NULL_LAYERS
    assert 0.03 < expected < 0.04  # McNemar is exact but discrete, hence conservative
    rng = np.random.default_rng(2025)
    a_of, b_of = np.array([1, 0, 1, 0]), np.array([0, 1, 1, 0])  # cells: A only, B only, both, neither
    ids = [f"item{i}" for i in range(n)]
    any_rejected = 0
    for r in range(families):
        cell = rng.choice(4, size=(n, NULL_LAYERS), p=[q, q, 0.3, 0.7 - 2 * q])
        rows = compare(ids, a_of[cell], ids, b_of[cell], "p@1", n_resamples=NULL_RESAMPLES, seed=r)
        assert rows[0].test == "mcnemar-exact"
        any_rejected += any(row.significant for row in rows)
    band(any_rejected / families, expected, families)


def test_exact_rejection_probabilities_reduce_to_the_textbook_values():
    # a finer resampling grid approaches the continuous alpha / m; a larger n does the same for McNemar's discreteness
    assert sign_flip_rejection_probability(ALPHA / 3, 30_029) == pytest.approx(ALPHA / 3, rel=2e-3)
    assert 1 - (1 - ALPHA / 3) ** 3 == pytest.approx(0.049171, abs=1e-6)
    assert mcnemar_rejection_probability(30, 0.25, ALPHA / 3, 3) < ALPHA / 3


# ---------------------------------------------------------------------------------------------
# power against a planted effect


def test_sign_flip_power_matches_normal_approximation():
    reps, n, delta, sd = 300, 60, 0.3, 1.0
    normal = NormalDist()
    z = normal.inv_cdf(1 - ALPHA / 2)
    shift = delta * math.sqrt(n) / sd
    predicted = normal.cdf(shift - z) + normal.cdf(-shift - z)
    rng = np.random.default_rng(99)
    ids = list(range(n))
    hits = 0
    for r in range(reps):
        b = rng.normal(size=n)
        a = b + rng.normal(delta, sd, n)
        (row,) = compare(ids, a[:, None], ids, b[:, None], "xent", n_resamples=1000, seed=r)
        hits += row.significant
    power = hits / reps
    assert abs(power - predicted) <= 3 * mc_se(predicted, reps) + 0.05, (power, predicted)


def exact_mcnemar_power(n: int, p_a_only: float, p_b_only: float, alpha: float) -> float:
    """Power of the exact two-sided McNemar test, summing over discordant counts and their split.

    The p-value is written out from the symmetric Binomial(D, 1/2) tails with integer binomial
    coefficients, not taken from scipy, so this is an independent computation.
    """
    p_disc = p_a_only + p_b_only
    share = p_a_only / p_disc
    power = 0.0
    for disc in range(1, n + 1):
        tails = list(itertools.accumulate(math.comb(disc, j) for j in range(disc + 1)))
        p_count = math.comb(n, disc) * p_disc**disc * (1 - p_disc) ** (n - disc)
        for k in range(disc + 1):
            if min(1.0, 2 * tails[min(k, disc - k)] / 2**disc) <= alpha:
                power += p_count * math.comb(disc, k) * share**k * (1 - share) ** (disc - k)
    return power


def test_mcnemar_power_matches_exact_computation():
    reps, n = 400, 80
    probs = {"a_only": 0.15, "b_only": 0.05, "both": 0.5, "neither": 0.3}
    predicted = exact_mcnemar_power(n, probs["a_only"], probs["b_only"], ALPHA)
    assert 0.3 < predicted < 0.95  # an informative setting, neither trivial nor hopeless
    rng = np.random.default_rng(7)
    a_of = np.array([1, 0, 1, 0])
    b_of = np.array([0, 1, 1, 0])
    ids = [f"q{i}" for i in range(n)]
    hits = 0
    for r in range(reps):
        cell = rng.choice(4, size=n, p=list(probs.values()))
        (row,) = compare(ids, {"L5": a_of[cell]}, ids, {"L5": b_of[cell]}, "p@1", n_resamples=500, seed=r)
        assert row.test == "mcnemar-exact"
        hits += row.significant
    power = hits / reps
    assert abs(power - predicted) <= 3 * mc_se(predicted, reps), (power, predicted)


def test_module_names_its_tests():
    assert stats.MCNEMAR == "mcnemar-exact" and stats.SIGN_FLIP == "sign-flip"
