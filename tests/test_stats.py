"""Paired statistics: each statistic against hand or exact computations, then calibration and power by simulation.

Every simulation is seeded, so the suite is deterministic; the tolerances are nonetheless set from
Monte-Carlo standard errors so that they would hold for most seeds, not just the chosen one.
"""

import dataclasses
import itertools
import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from harness import stats
from harness.stats import (
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


def test_bootstrap_ci_contains_true_difference_and_matches_scipy():
    rng = np.random.default_rng(5)
    b = rng.normal(size=400)
    a = b + rng.normal(0.5, 1.0, 400)
    low, high = paired_bootstrap_ci(a, b, n_resamples=2000, seed=9)
    assert low < 0.5 < high
    assert high - low == pytest.approx(2 * 1.96 / math.sqrt(400), rel=0.2)
    direct = sps.bootstrap((a - b,), np.mean, n_resamples=2000, method="BCa", rng=np.random.default_rng(9))
    assert (low, high) == pytest.approx((direct.confidence_interval.low, direct.confidence_interval.high))


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
# calibration under the null: family-wise error rate after Holm


REPS_NULL = 300
LAYERS = 10


@pytest.mark.parametrize("kind", ["continuous", "binary"])
def test_family_wise_error_rate_under_the_null(kind):
    rng = np.random.default_rng(2024 if kind == "continuous" else 2025)
    ids = [f"item{i}" for i in range(40)]
    any_rejected = 0
    for r in range(REPS_NULL):
        family = continuous_family if kind == "continuous" else binary_family
        a, b = family(rng, len(ids), LAYERS)
        rows = compare(ids, a, ids, b, "kl" if kind == "continuous" else "p@1", n_resamples=500, seed=r)
        assert {row.test for row in rows} == {"sign-flip" if kind == "continuous" else "mcnemar-exact"}
        any_rejected += any(row.significant for row in rows)
    fwer = any_rejected / REPS_NULL
    assert fwer <= ALPHA + 3 * mc_se(ALPHA, REPS_NULL)


# ---------------------------------------------------------------------------------------------
# power against a planted effect


def test_sign_flip_power_matches_normal_approximation():
    reps, n, delta, sd = 300, 60, 0.3, 1.0
    z = sps.norm.ppf(1 - ALPHA / 2)
    shift = delta * math.sqrt(n) / sd
    predicted = sps.norm.cdf(shift - z) + sps.norm.cdf(-shift - z)
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

    The p-value is written out from the symmetric Binomial(D, 1/2) tails rather than taken from
    binomtest, so this is an independent computation.
    """
    p_disc = p_a_only + p_b_only
    share = p_a_only / p_disc
    power = 0.0
    for disc in range(1, n + 1):
        k = np.arange(disc + 1)
        pvalues = np.minimum(1.0, 2 * sps.binom.cdf(np.minimum(k, disc - k), disc, 0.5))
        rejected = pvalues <= alpha
        power += sps.binom.pmf(disc, n, p_disc) * sps.binom.pmf(k[rejected], disc, share).sum()
    return float(power)


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
