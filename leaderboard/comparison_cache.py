"""Paired-test results of a family of layers, kept on disk under a hash of everything they depend on.

A family's BCa intervals and sign-flip tests take most of a site build at the paper's item counts (about 0.7 s a
layer at 3,000 items), and ``jtc claims`` and ``jtc leaderboard`` test the same families again on every run. The key is
a sha256 of the inputs themselves (item ids, per-item values, content hashes), of the test's settings (metric, alpha,
resamples, seed) and of what computes the result (harness/stats.py's source, numpy's and scipy's versions), so an
entry can only be found again for the same numbers computed the same way: new results, a changed test or a new
scipy all miss and are computed afresh. An entry that cannot be read, or whose key does not match its name, stops
the build with the file named: it is never used, nor quietly overwritten.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy

from jtc_lens.harness import stats
from jtc_lens.harness.store import atomic_write_bytes, cache_root, sha256_file

FORMAT = "jtc-comparison-1"
_ROW_FIELDS = tuple(f.name for f in fields(stats.LayerComparison))


@lru_cache(maxsize=1)
def _stats_source_sha256() -> str:
    return sha256_file(Path(stats.__file__))


def _layer_items(values) -> list[tuple[Hashable, np.ndarray]]:
    """(layer, values) in the order compare() reports layers: a dict's order, or a matrix's columns."""
    if isinstance(values, Mapping):
        return [(layer, np.asarray(v, dtype=np.float64)) for layer, v in values.items()]
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"expected a dict layer -> array or a 2-D (items x layers) array, got shape {matrix.shape}")
    return [(layer, matrix[:, layer]) for layer in range(matrix.shape[1])]


def _plain(layer):
    return layer.item() if isinstance(layer, np.generic) else layer


def family_key(ids_a: Sequence[Hashable], a, ids_b: Sequence[Hashable], b, *, metric: str, alpha: float, n_resamples: int,
               seed: int, contents_a: Sequence[Hashable] | None, contents_b: Sequence[Hashable] | None) -> str:
    """sha256 of a family's inputs, its test settings and the code and library versions that compute it."""
    items_a, items_b = _layer_items(a), _layer_items(b)
    header = {
        "format": FORMAT, "stats_source_sha256": _stats_source_sha256(), "numpy": np.__version__, "scipy": scipy.__version__,
        "metric": metric, "alpha": alpha, "n_resamples": n_resamples, "seed": seed,
        "ids_a": [_plain(i) for i in ids_a], "ids_b": [_plain(i) for i in ids_b],
        "contents_a": None if contents_a is None else list(contents_a),
        "contents_b": None if contents_b is None else list(contents_b),
        "layers_a": [[_plain(layer), v.shape] for layer, v in items_a],
        "layers_b": [[_plain(layer), v.shape] for layer, v in items_b],
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8"))
    for _, v in items_a + items_b:
        digest.update(np.ascontiguousarray(v).tobytes())
    return digest.hexdigest()


class ComparisonStore:
    """``compare`` with its results kept under ``root`` (None: computed every time, nothing written).

    ``recompute``: compute every family again and overwrite its entry (after a suspected bad entry, say)."""

    def __init__(self, root: str | Path | None, recompute: bool = False) -> None:
        self.root = None if root is None else Path(root)
        self.recompute = recompute
        self.computed = 0
        self.reused = 0

    @classmethod
    def default(cls, recompute: bool = False) -> "ComparisonStore":
        return cls(cache_root() / "comparisons", recompute=recompute)

    def path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def compare(self, ids_a, a, ids_b, b, *, metric: str, alpha: float, n_resamples: int, seed: int,
                contents_a=None, contents_b=None) -> list[stats.LayerComparison]:
        settings = dict(metric=metric, alpha=alpha, n_resamples=n_resamples, seed=seed, contents_a=contents_a, contents_b=contents_b)
        if self.root is None:
            self.computed += 1
            return stats.compare(ids_a, a, ids_b, b, **settings)
        key = family_key(ids_a, a, ids_b, b, **settings)
        path = self.path(key)
        if path.exists() and not self.recompute:
            rows = self._read(path, key, [_plain(layer) for layer, _ in _layer_items(a)])
            self.reused += 1
            return rows
        rows = stats.compare(ids_a, a, ids_b, b, **settings)
        entry = {"format": FORMAT, "key": key, "metric": metric, "rows": [r.to_dict() for r in rows]}
        atomic_write_bytes(path, json.dumps(entry, indent=1).encode("utf-8"))
        self.computed += 1
        return rows

    @staticmethod
    def _read(path: Path, key: str, layers: list) -> list[stats.LayerComparison]:
        advice = "delete it, or rebuild with --recompute-comparisons"
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            if entry.get("format") != FORMAT or entry.get("key") != key:
                raise ValueError(f"it holds format {entry.get('format')!r} and key {str(entry.get('key'))[:12]}…, "
                                 f"not {FORMAT} and {key[:12]}…")
            rows = [stats.LayerComparison(**{name: row[name] for name in _ROW_FIELDS}) for row in entry["rows"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"comparison cache entry {path} is unusable ({exc}); {advice}") from exc
        if [r.layer for r in rows] != layers:
            raise ValueError(f"comparison cache entry {path} covers layers {[r.layer for r in rows]}, the family "
                             f"{layers}; {advice}")
        return rows

    def summary(self) -> str:
        where = "nothing kept" if self.root is None else f"cache {self.root}"
        return f"{self.computed} famil{'y' if self.computed == 1 else 'ies'} of paired tests computed, {self.reused} reused ({where})"


def add_store_flags(parser) -> None:
    """The options of the commands that run paired tests (jtc leaderboard, jtc claims)."""
    parser.add_argument("--comparison-cache", metavar="DIR",
                        help="folder keeping the paired tests' results between runs, keyed by a hash of their inputs "
                             "(default: comparisons/ in $JTC_CACHE or ~/.cache/jtc)")
    parser.add_argument("--no-comparison-cache", action="store_true", help="compute every paired test, keep nothing")
    parser.add_argument("--recompute-comparisons", action="store_true",
                        help="compute every paired test again and overwrite what the cache holds")


def store_from(args) -> ComparisonStore:
    if args.no_comparison_cache:
        return ComparisonStore(None)
    if args.comparison_cache:
        return ComparisonStore(args.comparison_cache, recompute=args.recompute_comparisons)
    return ComparisonStore.default(recompute=args.recompute_comparisons)
