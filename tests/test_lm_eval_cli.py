"""The stock ``lm_eval`` command, run in a subprocess against the installed (non-editable) package."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny
from installed import installed_package_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm_eval_bin():
    pkg = installed_package_dir()
    if pkg is None or not (pkg / "tasks").is_dir():
        pytest.skip("jtc-lens is not installed as a wheel in this environment (pip install . or tox)")
    exe = Path(sys.executable).parent / "lm_eval"
    if not exe.exists():
        pytest.skip("lm_eval console script not found beside the interpreter")
    return str(exe)


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JTC_CACHE=str(tmp_path / "cache"), TQDM_DISABLE="1")
    return env


@pytest.mark.realdata
def test_lm_eval_runs_every_jtc_task_without_include_path(lm_eval_bin, tmp_path):
    from jtc_lens.harness.corpora import MissingSourceError, get_corpus, names

    for name in names():  # 'jtc_*' reads every bundled distribution
        try:
            get_corpus(name)
        except MissingSourceError as exc:
            pytest.skip(f"distribution {name} is not installed: {exc}")
    model, tok = tiny.build("llama", layers=3)
    model_dir = tmp_path / "tiny-llama"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "out"
    options = {"n_eval": 12, "n_fit": 60, "token_budget": 640, "tokens_per_step": 128, "tuned_chunk_len": 64,
               "warm_fit_tokens": 512}
    cmd = [lm_eval_bin, "--model", "hf", "--model_args", f"pretrained={model_dir},fit_on=news", "--tasks", "jtc_*",
           "--output_path", str(out), "--log_samples", "--metadata", json.dumps(options)]
    # run from an empty folder: nothing of the source checkout is importable from there
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results_file,) = glob.glob(str(out / "*" / "results_*.json"))
    results = json.loads(Path(results_file).read_text())
    from jtc_lens.harness.corpora import names

    assert set(results["results"]) == ({f"jtc_{p}_{d}" for p in ("id", "mat", "affine", "tuned") for d in names()}
                                       | {f"jtc_exit_{p}_{d}" for p in ("id", "mat", "tuned") for d in names()}
                                       | {f"jtc_submodule_{p}_{d}" for p in ("attn", "ffn", "norm") for d in names()}
                                       | {f"jtc_layers_{d}" for d in names()})
    tasks = {f"jtc_{p}_{d}" for p in ("id", "mat", "affine", "tuned") for d in ("wikipedia", "news")}
    for task in tasks:
        res = results["results"][task]
        for metric in ("p@1", "p@5", "p@10", "surprisal", "kl", "xent", "entropy", "r2", "r2w"):
            if metric.startswith("r2"):  # per layer only: no layer mean of r^2
                assert f"{metric},none" not in res
            else:
                assert f"{metric},none" in res and f"{metric}_stderr,none" in res
            for layer in range(3):
                assert f"{metric}.L{layer},none" in res
            assert f"{metric}.L3,none" not in res
        prov = results["configs"][task]["metadata"]["provenance"]
        assert prov["model"]["num_layers"] == 3 and prov["items"] == 12
        if "_id_" not in task:
            assert prov["projector_config"]["fit_on"] == "news"  # the model argument reached the tasks
        if "_tuned_" in task:
            assert prov["projector_config"]["recipe"]["name"] == "warm" and prov["projector_config"]["tokens_spent"] == 640
        samples_file = glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))[0]
        lines = [json.loads(l) for l in Path(samples_file).read_text().splitlines()]
        assert len(lines) == 12 and all("p@1.L0" in s and s["target"] for s in lines)


def test_lm_eval_lists_the_tasks(lm_eval_bin, tmp_path):
    proc = subprocess.run([lm_eval_bin, "ls", "tasks"], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for task in ("jtc_id_wikipedia", "jtc_mat_news", "jtc_affine_wikipedia"):
        assert task in proc.stdout
