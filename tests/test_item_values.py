"""The per-item values kept in place of the samples: the same paired tests, and never read for another run."""

import json
import os
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import fake_runs
from jtc_lens.harness import cli
from jtc_lens.leaderboard import claims, item_values, read, tables

L, N = 6, 30
ROOT = Path(__file__).resolve().parents[1]


def _runs(root: Path) -> tuple[Path, Path]:
    main = fake_runs.write_run(root / "main" / "m", [("id", d, None) for d in ("wikipedia", "news")]
                               + [(p, d, d) for p in ("mat", "affine", "tuned") for d in ("wikipedia", "news")],
                               n_items=N, layers=L, model_name="m", model_id="m0000000000001")
    moved = fake_runs.write_run(root / "transfer" / "m", [("mat", "news", "wikipedia")], n_items=N, layers=L,
                                model_name="m", model_id="m0000000000001", seed=1)
    # float32 values for KL on one task: those are kept as float32, the others (float64 draws) as float64
    fake_runs.edit_samples(main, "jtc_mat_news", lambda row: row.update(
        {f"kl.L{l}": float(np.float32(row[f"kl.L{l}"])) for l in range(L)}))
    return main, moved


def _drop_samples(root: Path) -> None:
    for f in root.rglob("samples_*.jsonl"):
        f.unlink()


def test_claims_and_families_from_item_values_equal_those_from_the_samples(tmp_path, capsys):
    _runs(tmp_path)
    folders = [tmp_path / "main", tmp_path / "transfer"]
    before = claims.evaluate(folders, n_resamples=300)
    loaded = read.load(folders)
    by_task = {t.task: t for t in loaded.tasks if not t.transfer}
    fam = tables.family("m", by_task["jtc_mat_news"], by_task["jtc_id_news"], "kl", read.SampleCache(),
                        alpha=0.05, n_resamples=300, seed=0)
    samples = {(t.task, t.results_file): read.load_samples(t, item_values.METRICS) for t in loaded.tasks}

    assert cli.main(["item-values", *map(str, folders)]) == 0
    written = sorted(tmp_path.rglob("samples_*.safetensors"))
    assert len(written) == 9 and "9 file(s) written" in capsys.readouterr().out
    _drop_samples(tmp_path)

    after = claims.evaluate(folders, n_resamples=300)
    assert after == before
    loaded = read.load(folders)
    assert not [w for w in loaded.warnings if "no samples" in w.message]
    for t in loaded.tasks:
        assert t.samples_file is None and t.values_file is not None
        got = read.load_samples(t, item_values.METRICS)
        want = samples[(t.task, t.results_file)]
        assert got.ids == want.ids and got.item_hashes == want.item_hashes and got.text_hashes == want.text_hashes
        for m in item_values.METRICS:
            for l in range(L):
                assert np.array_equal(got.values[m][l], want.values[m][l])
    by_task = {t.task: t for t in loaded.tasks if not t.transfer}
    again = tables.family("m", by_task["jtc_mat_news"], by_task["jtc_id_news"], "kl", read.SampleCache(),
                          alpha=0.05, n_resamples=300, seed=0)
    assert fam.error is None and again.error is None
    assert fam.rows and [asdict(r) for r in again.rows] == [asdict(r) for r in fam.rows]


def test_each_metric_is_kept_in_the_narrowest_exact_type(tmp_path):
    main, _ = _runs(tmp_path)
    read.write_item_values([tmp_path / "main"], progress=lambda _: None)
    f32 = load_file(str(main.parent / f"samples_jtc_mat_news_{fake_runs.STAMP}.safetensors"))
    f64 = load_file(str(main.parent / f"samples_jtc_id_news_{fake_runs.STAMP}.safetensors"))
    assert f32["p@1"].dtype == np.uint8 and f32["kl"].dtype == np.float32 and f32["surprisal"].dtype == np.float64
    assert f64["kl"].dtype == np.float64 and f32["kl"].shape == (N, L)


def test_writing_the_same_values_again_leaves_the_file_as_it_was(tmp_path):
    """safetensors orders metadata differently each time: rewriting unchanged values would churn committed files."""
    main, _ = _runs(tmp_path)
    read.write_item_values([tmp_path / "main"], progress=lambda _: None)
    files = sorted(main.parent.glob("samples_*.safetensors"))
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files}
    read.write_item_values([tmp_path / "main"], progress=lambda _: None)
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files} == before
    # values that changed are written
    fake_runs.edit_samples(main, "jtc_id_news", lambda row: row.update({"kl.L0": row["kl.L0"] + 1.0}))
    read.write_item_values([tmp_path / "main"], progress=lambda _: None)
    changed = main.parent / f"samples_jtc_id_news_{fake_runs.STAMP}.safetensors"
    assert changed.stat().st_mtime_ns != before[changed][1]
    kl = load_file(str(changed))["kl"][:, 0]
    assert np.allclose(kl, [json.loads(line)["kl.L0"] for line in fake_runs.samples_file(main, "jtc_id_news").read_text().splitlines()])
    assert all(f.read_bytes() == before[f][0] for f in files if f != changed)


def test_item_values_of_another_run_or_a_damaged_file_are_refused(tmp_path):
    main, moved = _runs(tmp_path)
    read.write_item_values([tmp_path], progress=lambda _: None)
    _drop_samples(tmp_path)
    tasks = {t.task: t for t in read.load([tmp_path / "main"]).tasks}
    # the results file changed after its values were written: they may belong to another run
    data = json.loads(main.read_text())
    data["results"]["jtc_id_news"]["p@1.L0,none"] += 0.1
    main.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"made for a results file of sha256 .* \(changed since, or another run's\)"):
        read.load_samples(tasks["jtc_id_news"], ("p@1",))
    # a value file in place of another task's
    own = tasks["jtc_mat_wikipedia"].values_file
    shutil.copy(tasks["jtc_affine_wikipedia"].values_file, own)
    with pytest.raises(ValueError, match="made for task jtc_affine_wikipedia, not jtc_mat_wikipedia"):
        read.load_samples(tasks["jtc_mat_wikipedia"], ("kl",))
    # truncated
    path = tasks["jtc_tuned_news"].values_file
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="unreadable item values"):
        read.load_samples(tasks["jtc_tuned_news"], ("kl",))
    # a metric they do not hold
    with pytest.raises(ValueError, match="not entropy"):
        read.load_samples(tasks["jtc_tuned_wikipedia"], ("entropy",))
    # the claims record names the cause instead of testing without the items
    record = claims.evaluate([tmp_path / "main", tmp_path / "transfer"], n_resamples=100)
    errors = {(k, d): r["error"] for m in record["models"] for k, by in m["claims"].items() for d, r in by.items()
              if "error" in r}
    assert len(errors) == 7 and all("made for" in e or "unreadable" in e for e in errors.values())
    assert any("made for a results file of sha256" in e for e in errors.values())


def test_copy_results_keeps_results_and_item_values_not_samples(tmp_path):
    _runs(tmp_path / "out")
    before = claims.evaluate([tmp_path / "out" / "main", tmp_path / "out" / "transfer"], n_resamples=200)
    env = {**os.environ, "PATH": f"{Path(shutil.which('jtc') or 'jtc').parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", str(ROOT / "scripts" / "copy-results.sh"), str(tmp_path / "out"), str(tmp_path / "kept")],
                   check=True, env=env, capture_output=True)
    kept = tmp_path / "kept"
    assert not list(kept.rglob("*.jsonl"))
    assert len(list(kept.rglob("samples_*.safetensors"))) == 9 and len(list(kept.rglob("results_*.json"))) == 2
    after = claims.evaluate([kept / "main", kept / "transfer"], n_resamples=200)
    assert [m["claims"] for m in after["models"]] == [m["claims"] for m in before["models"]]
