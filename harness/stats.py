"""Paired comparison of two projectors, layer by layer, with family-wise error control.

Two projectors A and B are scored on the same items, so every item gives a pair (a_i, b_i) and
the tests below work on the pairs, never on two independent samples.

Family: one family is one (model, distribution, metric, projector pair) taken over its layers.
Within a family the per-layer p-values are adjusted with Holm's step-down procedure at level
``alpha``, so the chance of declaring *any* layer different when no layer is (the family-wise
error rate) is at most ``alpha``. Different families (other models, distributions, metrics or
pairs) are not corrected against each other; whoever pools families must correct again.

Per layer:
- the estimate is the mean difference mean(a - b), with a paired bootstrap (BCa) interval at
  level ``1 - alpha``; the interval is per layer and not adjusted for multiplicity;
- the p-value is the exact McNemar test when every value of the family is 0/1 (Precision@k
  with one scored position per item), otherwise a sign-flip permutation test of the mean
  difference. Per-item Precision@k averaged over several scored positions is a fraction, not
  0/1, and is therefore tested by sign flips.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Union

import numpy as np
import scipy
from numpy.typing import ArrayLike
from scipy import stats

Seed = Union[int, np.random.Generator, None]
LayerValues = Union[ArrayLike, Mapping[Hashable, ArrayLike]]

MCNEMAR = "mcnemar-exact"
SIGN_FLIP = "sign-flip"
_EXAMPLES = 5  # ids quoted in an error message

# scipy renamed ``random_state`` to ``rng`` in 1.15; the project supports older releases too.
_RNG_KEYWORD = "rng" if tuple(int(x) for x in scipy.__version__.split(".")[:2]) >= (1, 15) else "random_state"
# Bootstrap and jackknife arrays are (batch, n_items): bound them to about this many elements.
_MAX_BATCH_ELEMENTS = 2_000_000


# ---------------------------------------------------------------------------------------------
# Pairing items


def _examples(ids: Sequence[Hashable]) -> str:
    shown = ", ".join(repr(i) for i in list(ids)[:_EXAMPLES])
    return f"[{shown}{', ...' if len(ids) > _EXAMPLES else ''}]"


def _duplicates(ids: Sequence[Hashable]) -> list[Hashable]:
    seen: set[Hashable] = set()
    repeated: dict[Hashable, None] = {}  # a dict keeps first-seen order for stable messages
    for i in ids:
        if i in seen:
            repeated[i] = None
        seen.add(i)
    return list(repeated)


def _alignment(ids_a: Sequence[Hashable], ids_b: Sequence[Hashable]) -> tuple[list[Hashable], np.ndarray, np.ndarray]:
    """Row indices into A and B of the same items, in A's order; any mismatch is an error.

    An inner join would quietly compare the projectors on different item sets (for example after
    one run lost items), so both sides must hold exactly the same ids, each once.
    """
    ids_a, ids_b = list(ids_a), list(ids_b)
    for side, ids in (("A", ids_a), ("B", ids_b)):
        repeated = _duplicates(ids)
        if repeated:
            raise ValueError(f"{len(repeated)} item id(s) occur more than once in {side}, e.g. {_examples(repeated)}")
    row_b = {item: k for k, item in enumerate(ids_b)}
    in_a = set(ids_a)
    only_a = [i for i in ids_a if i not in row_b]
    only_b = [i for i in ids_b if i not in in_a]
    if only_a or only_b:
        raise ValueError(
            "A and B were scored on different items: "
            f"{len(only_a)} id(s) only in A {_examples(only_a)}, {len(only_b)} id(s) only in B {_examples(only_b)}"
        )
    idx_b = np.array([row_b[i] for i in ids_a], dtype=np.intp)
    return ids_a, np.arange(len(ids_a), dtype=np.intp), idx_b


def _check_contents(ids: list[Hashable], idx_a: np.ndarray, idx_b: np.ndarray,
                    contents_a: Sequence[Hashable] | None, contents_b: Sequence[Hashable] | None) -> None:
    """Items paired by id must be the same items: an id reused for other text (an edited corpus file,
    another corpus version) would pair unrelated scores. ``contents_*`` are per-item content hashes."""
    if contents_a is None and contents_b is None:
        return
    if contents_a is None or contents_b is None:
        raise ValueError("item contents are known for one side only: cannot check that both scored the same items")
    if len(contents_a) != len(idx_a) or len(contents_b) != len(idx_b):
        raise ValueError(f"item contents and ids differ in length: A {len(contents_a)}/{len(idx_a)}, B {len(contents_b)}/{len(idx_b)}")
    differ = [ids[k] for k in range(len(ids)) if contents_a[idx_a[k]] != contents_b[idx_b[k]]]
    if differ:
        raise ValueError(f"A and B scored different contents under the same item ids: {len(differ)} of {len(ids)} item(s) "
                         f"differ, e.g. {_examples(differ)}")


def _finite_vector(values: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        # a NaN would silently drop out of (or poison) a mean; the caller must decide what it means
        raise ValueError(f"{name} has {int(np.sum(~np.isfinite(x)))} non-finite value(s)")
    return x


def pair_by_id(
    ids_a: Sequence[Hashable], values_a: ArrayLike, ids_b: Sequence[Hashable], values_b: ArrayLike,
    contents_a: Sequence[Hashable] | None = None, contents_b: Sequence[Hashable] | None = None,
) -> tuple[list[Hashable], np.ndarray, np.ndarray]:
    """Align two per-item arrays by item id: returns (ids in A's order, a, b) with a[i], b[i] of item ids[i].

    With ``contents_a``/``contents_b`` (a content hash per item), items of the same id must agree on it."""
    a = _finite_vector(values_a, "values_a")
    b = _finite_vector(values_b, "values_b")
    if len(a) != len(ids_a) or len(b) != len(ids_b):
        raise ValueError(
            f"ids and values differ in length: A {len(ids_a)} ids/{len(a)} values, B {len(ids_b)} ids/{len(b)} values"
        )
    ids, idx_a, idx_b = _alignment(ids_a, ids_b)
    _check_contents(ids, idx_a, idx_b, contents_a, contents_b)
    return ids, a[idx_a], b[idx_b]


def _paired_differences(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    a = _finite_vector(a, "a")
    b = _finite_vector(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in length: {a.shape[0]} and {b.shape[0]}")
    if a.size == 0:
        raise ValueError("no items to compare")
    return a - b


# ---------------------------------------------------------------------------------------------
# Estimate and interval


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _batch(n_items: int) -> int:
    return max(1, _MAX_BATCH_ELEMENTS // n_items)


def paired_bootstrap_ci(
    a: ArrayLike, b: ArrayLike, n_resamples: int = 10000, confidence: float = 0.95, seed: Seed = 0
) -> tuple[float, float]:
    """Bootstrap confidence interval of mean(a - b), resampling items (pairs) with replacement.

    BCa rather than percentile: the per-item differences are often skewed (heavy-tailed
    surprisal or KL, or 0/1 Precision@k differences where one projector is rarely ahead), and
    BCa corrects the percentile interval for bias and skewness, which gives coverage closer to
    nominal in exactly those cases at the cost of one jackknife pass.
    """
    d = _paired_differences(a, b)
    if np.all(d == d[0]):
        # every resample has the same mean, and BCa's jackknife acceleration would divide by zero
        return float(d[0]), float(d[0])
    rng = np.random.default_rng(seed)
    common = dict(n_resamples=n_resamples, confidence_level=confidence, vectorized=True, batch=_batch(d.size))
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # a failed BCa warns and returns NaN; that case is handled just below
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap((d,), _mean, method="BCa", **common, **{_RNG_KEYWORD: rng})
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (np.isfinite(low) and np.isfinite(high)):
        # BCa is undefined when the observed mean lies outside every bootstrap mean (tiny or
        # near-constant samples); the percentile interval of the same resamples is still defined.
        common["n_resamples"] = 0  # reuse the resamples already drawn, draw no more
        res = stats.bootstrap((d,), _mean, method="percentile", bootstrap_result=res, **common, **{_RNG_KEYWORD: rng})
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return low, high


# ---------------------------------------------------------------------------------------------
# Tests


def sign_flip_pvalue(a: ArrayLike, b: ArrayLike, n_resamples: int = 10000, seed: Seed = 0) -> float:
    """Two-sided paired permutation p-value for mean(a - b) = 0, by random sign flips of the differences.

    Under the null hypothesis that A and B are exchangeable within each item, each difference is
    as likely to be d_i as -d_i. scipy enumerates all 2**n sign patterns when 2**n <= n_resamples
    (an exact test), and otherwise samples them, adding one to the counts so the p-value stays valid.
    """
    d = _paired_differences(a, b)
    if not np.any(d):
        return 1.0  # every sign pattern gives the observed statistic
    rng = np.random.default_rng(seed)
    res = stats.permutation_test(
        (d,),
        _mean,
        permutation_type="samples",
        vectorized=True,
        n_resamples=n_resamples,
        batch=_batch(d.size),
        alternative="two-sided",
        **{_RNG_KEYWORD: rng},
    )
    return float(min(1.0, res.pvalue))


def _is_binary(x: np.ndarray) -> bool:
    return bool(np.all((x == 0) | (x == 1)))


def mcnemar_exact_pvalue(a: ArrayLike, b: ArrayLike) -> float:
    """Exact two-sided McNemar p-value for paired 0/1 outcomes.

    Only discordant items carry information about a difference; under the null each is equally
    likely to favour A or B, so the count favouring A is Binomial(discordant, 1/2).
    """
    d = _paired_differences(a, b)  # validates shape and finiteness
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not (_is_binary(a) and _is_binary(b)):
        raise ValueError("McNemar's test needs 0/1 values for both projectors")
    a_only = int(np.sum(d > 0))  # a=1, b=0
    b_only = int(np.sum(d < 0))  # a=0, b=1
    if a_only + b_only == 0:
        return 1.0
    return float(stats.binomtest(a_only, a_only + b_only, 0.5).pvalue)


# ---------------------------------------------------------------------------------------------
# Multiplicity


def holm(pvalues: ArrayLike, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Holm step-down adjusted p-values (monotone, at most 1) and reject flags at family-wise level alpha.

    scipy's ``false_discovery_control`` is Benjamini-Hochberg, which controls the false discovery
    rate, not the family-wise error rate, hence this implementation.
    """
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be one-dimensional, got shape {p.shape}")
    if np.any(np.isnan(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    m = p.size
    order = np.argsort(p, kind="stable")
    # the k-th smallest p-value (k from 0) is compared with alpha / (m - k); taking the running
    # maximum makes a rejection require every smaller p-value to be rejected first (step-down)
    scaled = (m - np.arange(m)) * p[order]
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted, adjusted <= alpha


# ---------------------------------------------------------------------------------------------
# A family of layers


@dataclass(frozen=True)
class LayerComparison:
    """A versus B at one layer, within a Holm-corrected family of layers (diff = mean(a - b))."""

    layer: Hashable
    n: int
    mean_a: float
    mean_b: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    p_holm: float
    significant: bool
    test: str
    metric: str
    alpha: float
    correction: str
    family_size: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if isinstance(self.layer, np.generic):
            out["layer"] = self.layer.item()  # plain Python values, ready for JSON
        return out


def _layer_columns(values: LayerValues, n_items: int, side: str) -> dict[Hashable, np.ndarray]:
    """Per-layer item vectors from a dict layer -> array or a 2-D (items x layers) array."""
    if isinstance(values, Mapping):
        columns = {layer: _finite_vector(v, f"{side}[{layer!r}]") for layer, v in values.items()}
    else:
        matrix = np.asarray(values, dtype=float)
        if matrix.ndim != 2:
            raise ValueError(f"{side} must be a dict layer -> array or a 2-D (items x layers) array, got shape {matrix.shape}")
        columns = {layer: _finite_vector(matrix[:, layer], f"{side}[:, {layer}]") for layer in range(matrix.shape[1])}
    for layer, column in columns.items():
        if column.size != n_items:
            # also catches a (layers x items) array passed the wrong way round
            raise ValueError(f"{side} layer {layer!r} has {column.size} values for {n_items} item ids")
    return columns


def compare(
    ids_a: Sequence[Hashable],
    a_by_layer: LayerValues,
    ids_b: Sequence[Hashable],
    b_by_layer: LayerValues,
    metric: str,
    alpha: float = 0.05,
    n_resamples: int = 10000,
    seed: int = 0,
    contents_a: Sequence[Hashable] | None = None,
    contents_b: Sequence[Hashable] | None = None,
) -> list[LayerComparison]:
    """Compare projectors A and B layer by layer on one family, Holm-corrected across its layers.

    The test is McNemar's exact test when every value of both projectors at every layer is 0/1,
    else the sign-flip test; one test for the whole family keeps its layers comparable. A metric
    named "p@..." whose values are fractions (per-item means over several positions) gets the
    sign-flip test. Layers are reported in A's order. ``contents_a``/``contents_b``: a content hash per
    item (in the order of its ids); items paired by id must agree on it, else the comparison is refused.
    """
    cols_a = _layer_columns(a_by_layer, len(ids_a), "a_by_layer")
    cols_b = _layer_columns(b_by_layer, len(ids_b), "b_by_layer")
    if set(cols_a) != set(cols_b):
        missing = [layer for layer in cols_a if layer not in cols_b] + [layer for layer in cols_b if layer not in cols_a]
        raise ValueError(f"A and B cover different layers, e.g. {_examples(missing)}")
    if not cols_a:
        raise ValueError("no layers to compare")
    ids, idx_a, idx_b = _alignment(ids_a, ids_b)
    _check_contents(ids, idx_a, idx_b, contents_a, contents_b)
    if not ids:
        raise ValueError("no items to compare")
    layers = list(cols_a)
    pairs = [(cols_a[layer][idx_a], cols_b[layer][idx_b]) for layer in layers]
    binary = all(_is_binary(a) and _is_binary(b) for a, b in pairs)
    test = MCNEMAR if binary else SIGN_FLIP
    confidence = 1.0 - alpha
    # independent random streams per layer and per use, all derived from the one seed
    streams = np.random.SeedSequence(seed).spawn(2 * len(layers))

    rows = []
    for k, (a, b) in enumerate(pairs):
        test_rng, ci_rng = np.random.default_rng(streams[2 * k]), np.random.default_rng(streams[2 * k + 1])
        p = mcnemar_exact_pvalue(a, b) if binary else sign_flip_pvalue(a, b, n_resamples=n_resamples, seed=test_rng)
        low, high = paired_bootstrap_ci(a, b, n_resamples=n_resamples, confidence=confidence, seed=ci_rng)
        rows.append((float(a.mean()), float(b.mean()), float(np.mean(a - b)), low, high, p))

    adjusted, reject = holm([row[-1] for row in rows], alpha=alpha)
    return [
        LayerComparison(
            layer=layer,
            n=len(ids),
            mean_a=mean_a,
            mean_b=mean_b,
            diff=diff,
            ci_low=low,
            ci_high=high,
            p_value=p,
            p_holm=float(p_adj),
            significant=bool(rej),
            test=test,
            metric=metric,
            alpha=alpha,
            correction="holm",
            family_size=len(layers),
            confidence=confidence,
        )
        for layer, (mean_a, mean_b, diff, low, high, p), p_adj, rej in zip(layers, rows, adjusted, reject)
    ]
