"""`jtc sweep`: several models in turn, a leaderboard at the end, and a rerun that skips finished models."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from jtc_lens.harness.sweep import RECORD, finished_run, read_runs, record_run
from installed import installed_package_dir


def test_a_finished_run_counts_only_for_the_same_request(tmp_path):
    request = {"model": "m", "tasks": "jtc_id_news", "metadata": {"n_eval": 8}, "model_args": "", "lm_eval_args": []}
    assert finished_run(tmp_path, request) == (None, "no finished run")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results_1.json").write_text("{}")
    (tmp_path / RECORD).write_text(json.dumps({"request": request, "results": "r/results_1.json"}))
    assert finished_run(tmp_path, request) == (tmp_path / "r" / "results_1.json", "finished")
    results, why = finished_run(tmp_path, {**request, "metadata": {"n_eval": 9}})
    assert results is None and "metadata" in why
    (tmp_path / "r" / "results_1.json").unlink()
    results, why = finished_run(tmp_path, request)
    assert results is None and "gone" in why


def test_a_second_request_into_the_same_folder_keeps_the_first_finished(tmp_path):
    # a rerun of two tasks into a model's folder must not make its earlier seven-task run count as unfinished
    main = {"model": "m", "tasks": "jtc_id_news,jtc_tuned_news", "metadata": {}, "model_args": "", "lm_eval_args": []}
    tuned = {**main, "tasks": "jtc_tuned_news"}
    for name in ("results_1.json", "results_2.json", "results_3.json"):
        (tmp_path / name).write_text("{}")
    record_run(tmp_path, {"request": main, "results": "results_1.json"})
    record_run(tmp_path, {"request": tuned, "results": "results_2.json"})
    assert finished_run(tmp_path, main) == (tmp_path / "results_1.json", "finished")
    assert finished_run(tmp_path, tuned) == (tmp_path / "results_2.json", "finished")
    record_run(tmp_path, {"request": main, "results": "results_3.json"})  # the same request again: it replaces its entry
    runs = json.loads((tmp_path / RECORD).read_text())["runs"]
    assert [r["results"] for r in runs] == ["results_2.json", "results_3.json"]
    assert finished_run(tmp_path, main) == (tmp_path / "results_3.json", "finished")
    results, why = finished_run(tmp_path, {**main, "model_args": "dtype=bfloat16"})
    assert results is None and "model_args" in why


def test_an_unreadable_record_is_named_and_replaced(tmp_path):
    request = {"model": "m", "tasks": "jtc_id_news", "metadata": {}, "model_args": "", "lm_eval_args": []}
    (tmp_path / "results_1.json").write_text("{}")
    for text in ("{not json", "[1, 2]", '{"runs": [{"results": "results_1.json"}]}'):
        (tmp_path / RECORD).write_text(text)
        results, why = finished_run(tmp_path, request)
        assert results is None and why.startswith(f"unreadable {RECORD}")
    record_run(tmp_path, {"request": request, "results": "results_1.json"})
    assert finished_run(tmp_path, request) == (tmp_path / "results_1.json", "finished")


@pytest.mark.slow
@pytest.mark.realdata  # its lm_eval runs read the bundled news corpus
def test_sweep_runs_models_in_turn_and_resumes(tmp_path):
    if installed_package_dir() is None:
        pytest.skip("jtc-lens is not installed as a wheel in this environment (pip install . or tox)")
    jtc = Path(sys.executable).parent / "jtc"
    folders = []
    for arch in ("llama", "gpt2"):
        model, tok = tiny.build(arch, layers=2)
        model.save_pretrained(tmp_path / arch)
        tok.save_pretrained(tmp_path / arch)
        folders.append(str(tmp_path / arch))
    out = tmp_path / "sweep"
    cmd = [str(jtc), "sweep", "--models", ",".join(folders), "--tasks", "jtc_id_news,jtc_mat_news",
           "--output_path", str(out), "--n-eval", "8", "--n-fit", "40"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JTC_CACHE=str(tmp_path / "cache"), TQDM_DISABLE="1")

    def sweep():
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc.stdout, sorted(glob.glob(str(out / "*" / "**" / "results_*.json"), recursive=True))

    stdout, results = sweep()
    assert len(results) == 2 and stdout.count("done in") == 2
    assert (out / "leaderboard" / "index.html").is_file()
    assert "peak memory" in stdout
    assert "r2 median" in stdout and "medians over layers" in stdout  # never a layer mean of r^2
    assert "Processes · peak memory" in (out / "leaderboard" / "runs.html").read_text(encoding="utf-8")
    for folder in folders:  # every model's results carry its own provenance
        model_dir = next(out.glob(f"*{Path(folder).name}"))
        runs = read_runs(model_dir)
        assert len(runs) == 1  # one request finished there
        data = json.loads((model_dir / runs[0]["results"]).read_text())
        assert data["configs"]["jtc_mat_news"]["metadata"]["provenance"]["items"] == 8

    stdout, again = sweep()  # nothing left to do
    assert again == results and stdout.count("skipped") == 2 and "done in" not in stdout

    # the second model was interrupted (no record): only it runs again
    next(out.glob(f"*gpt2/{RECORD}")).unlink()
    stdout, third = sweep()
    assert stdout.count("skipped") == 1 and stdout.count("done in") == 1
    assert len(third) == 3 and set(results) < set(third)
