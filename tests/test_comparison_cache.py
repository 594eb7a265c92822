"""Paired-test results kept between builds: found again only for the same inputs and settings, identical to a
fresh computation, and a damaged entry is refused with its file named."""

import io
import json

import numpy as np
import pytest

import fake_runs
from jtc_lens.harness import cli, stats
from jtc_lens.leaderboard import claims
from jtc_lens.leaderboard.build import build_site
from jtc_lens.leaderboard.comparison_cache import ComparisonStore, family_key

L, N = 4, 30


def _run(root):
    return fake_runs.write_run(root / "results", [("id", "news", None), ("mat", "news", "news"), ("affine", "news", "news")],
                               n_items=N, layers=L)


def _families(site):
    return json.loads((site / "comparisons.json").read_text())["families"]


def test_a_second_build_reuses_every_family_and_shows_the_same_numbers(tmp_path):
    _run(tmp_path)
    fresh = build_site([tmp_path / "results"], tmp_path / "fresh", resamples=200, stream=io.StringIO())
    store = ComparisonStore(tmp_path / "kept")
    build_site([tmp_path / "results"], tmp_path / "first", resamples=200, stream=io.StringIO(), store=store)
    n = store.computed
    assert n > 0 and store.reused == 0 and len(list((tmp_path / "kept").rglob("*.json"))) == n
    again = ComparisonStore(tmp_path / "kept")
    stream = io.StringIO()
    build_site([tmp_path / "results"], tmp_path / "second", resamples=200, stream=stream, store=again)
    assert (again.computed, again.reused) == (0, n)
    assert f"0 families of paired tests computed, {n} reused" in stream.getvalue()
    assert _families(tmp_path / "second") == _families(tmp_path / "first") == _families(fresh.out_dir)
    # other settings are other entries (another seed: resamples below what Holm needs are raised to it)
    other = ComparisonStore(tmp_path / "kept")
    build_site([tmp_path / "results"], tmp_path / "third", resamples=200, seed=1, stream=io.StringIO(), store=other)
    assert (other.computed, other.reused) == (n, 0)


def test_changed_values_miss_the_cache(tmp_path):
    results = _run(tmp_path)
    store = ComparisonStore(tmp_path / "kept")
    build_site([tmp_path / "results"], tmp_path / "first", resamples=200, stream=io.StringIO(), store=store)
    n = store.computed
    before = {f["a"] + f["metric"]: f for f in _families(tmp_path / "first")}

    def bump(row):
        row["p@1.L0"] = 1.0 - row["p@1.L0"]

    fake_runs.edit_samples(results, "jtc_mat_news", bump)
    again = ComparisonStore(tmp_path / "kept")
    build_site([tmp_path / "results"], tmp_path / "second", resamples=200, stream=io.StringIO(), store=again)
    # every family holding mat's values is computed again (mat vs id, affine vs mat: P@1 and the others, as the
    # edited file is read whole); none shows the old numbers
    assert again.computed > 0 and again.reused + again.computed == n
    after = {f["a"] + f["metric"]: f for f in _families(tmp_path / "second")}
    assert after["matp@1"] != before["matp@1"]


def test_the_key_covers_values_ids_contents_and_settings():
    rng = np.random.default_rng(0)
    a, b = {l: rng.random(10) for l in range(3)}, {l: rng.random(10) for l in range(3)}
    ids = [f"i{k}" for k in range(10)]
    base = dict(metric="kl", alpha=0.05, n_resamples=200, seed=0, contents_a=None, contents_b=None)
    k0 = family_key(ids, a, ids, b, **base)
    assert family_key(ids, {l: v.copy() for l, v in a.items()}, ids, b, **base) == k0
    nudged = {**a, 2: a[2] + 1e-12}
    variants = [
        family_key(ids, nudged, ids, b, **base),
        family_key(ids[::-1], a, ids, b, **base),
        family_key(ids, a, ids, b, **{**base, "seed": 1}),
        family_key(ids, a, ids, b, **{**base, "n_resamples": 201}),
        family_key(ids, a, ids, b, **{**base, "alpha": 0.01}),
        family_key(ids, a, ids, b, **{**base, "metric": "surprisal"}),
        family_key(ids, a, ids, b, **{**base, "contents_a": ["x"] * 10, "contents_b": ["x"] * 10}),
        family_key(ids, b, ids, a, **base),
    ]
    assert len(set(variants)) == len(variants) and k0 not in variants


def test_stored_rows_equal_a_fresh_computation(tmp_path):
    rng = np.random.default_rng(1)
    ids = [f"i{k}" for k in range(40)]
    a, b = {l: rng.normal(size=40) for l in range(3)}, {l: rng.normal(size=40) + 0.3 for l in range(3)}
    settings = dict(metric="kl", alpha=0.05, n_resamples=300, seed=4)
    fresh = stats.compare(ids, a, ids, b, **settings)
    ComparisonStore(tmp_path).compare(ids, a, ids, b, **settings)
    store = ComparisonStore(tmp_path)
    assert store.compare(ids, a, ids, b, **settings) == fresh and store.reused == 1


def test_a_damaged_entry_is_refused_naming_its_file(tmp_path):
    rng = np.random.default_rng(2)
    ids = [f"i{k}" for k in range(20)]
    a, b = {l: rng.normal(size=20) for l in range(2)}, {l: rng.normal(size=20) for l in range(2)}
    settings = dict(metric="kl", alpha=0.05, n_resamples=200, seed=0)
    store = ComparisonStore(tmp_path)
    store.compare(ids, a, ids, b, **settings)
    (entry,) = tmp_path.rglob("*.json")
    entry.write_text(entry.read_text()[:-20])
    with pytest.raises(ValueError, match=str(entry)):
        ComparisonStore(tmp_path).compare(ids, a, ids, b, **settings)
    # another family's rows under this family's name: refused too
    data = json.loads(json.dumps({"format": "jtc-comparison-1", "key": "0" * 64, "rows": []}))
    entry.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="key"):
        ComparisonStore(tmp_path).compare(ids, a, ids, b, **settings)
    # --recompute-comparisons writes a good entry over it
    redo = ComparisonStore(tmp_path, recompute=True)
    assert redo.compare(ids, a, ids, b, **settings) == stats.compare(ids, a, ids, b, **settings) and redo.computed == 1
    assert ComparisonStore(tmp_path).compare(ids, a, ids, b, **settings) == stats.compare(ids, a, ids, b, **settings)


def test_jtc_claims_keeps_its_families_in_the_cache_it_is_given(tmp_path, capsys):
    root = tmp_path / "runs"
    fake_runs.write_run(root / "main" / "m", [("id", "news", None), ("mat", "news", "news")], n_items=N, layers=L)
    kept = tmp_path / "kept"
    args = ["claims", str(root / "main"), "--output", str(tmp_path / "c.json"), "--resamples", "200", "--comparison-cache", str(kept)]
    assert cli.main(args) == 0
    assert "1 family of paired tests computed, 0 reused" in capsys.readouterr().err
    first = json.loads((tmp_path / "c.json").read_text())
    assert cli.main(args) == 0
    assert "0 families of paired tests computed, 1 reused" in capsys.readouterr().err
    assert json.loads((tmp_path / "c.json").read_text()) == first == claims.evaluate([root / "main"], n_resamples=200)
    assert cli.main(args[:-2] + ["--no-comparison-cache"]) == 0
    assert "1 family of paired tests computed, 0 reused (nothing kept)" in capsys.readouterr().err
