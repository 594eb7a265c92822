"""Data parallelism on lm-eval's own mechanism: `accelerate launch -m lm_eval` with two CPU processes (gloo)
gives the same fitted projectors and the same metrics as one process."""

import glob
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import tiny
from installed import lm_eval_module_args

# realdata: its lm_eval runs read the bundled news and wikipedia corpora (on the fixture corpus alone the two-process
# affine fit did not match the one-process fit; not yet understood)
pytestmark = [pytest.mark.slow, pytest.mark.realdata]

LENS_TASKS = "jtc_id_news,jtc_mat_news,jtc_affine_news,jtc_tuned_news,jtc_mat_wikipedia"
TASKS = LENS_TASKS + ",jtc_exit_mat_news,jtc_submodule_attn_news"
# 13 items: the two processes get 7 and 6, so lm-eval pads one of them with a repeated request
# seed 6: news and wikipedia each have one item at position 0, so the means without them are summed over processes
OPTIONS = {"seed": 6, "n_eval": 13, "n_fit": 60, "token_budget": 640, "tokens_per_step": 128, "tuned_chunk_len": 64,
           "warm_fit_tokens": 256, "submodule_every": 2}


def _bin(name):
    exe = Path(sys.executable).parent / name
    if not exe.exists():
        pytest.skip(f"{name} not found beside the interpreter")
    return str(exe)


def _run(cmd, cwd, cache, extra_env=None):
    _, env = lm_eval_module_args(dict(os.environ))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JTC_CACHE=str(cache), TQDM_DISABLE="1", **(extra_env or {}))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    launch = lm_eval_module_args(dict(os.environ))
    if launch is None:
        pytest.skip("neither an installed jtc-lens wheel nor this checkout's task folder is available to lm_eval")
    module_args = launch[0]
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("accelerate's launcher is not installed")
    tmp = tmp_path_factory.mktemp("dp")
    model, tok = tiny.build("llama", layers=3)
    model.save_pretrained(tmp / "tiny")
    tok.save_pretrained(tmp / "tiny")
    args = [*module_args, "--model", "hf", "--model_args", f"pretrained={tmp / 'tiny'}", "--tasks", TASKS, "--log_samples",
            "--metadata", json.dumps(OPTIONS)]
    _run([sys.executable, "-m", "lm_eval", *args, "--output_path", str(tmp / "one")], tmp, tmp / "cache-one")
    _run([_bin("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lm_eval", *args, "--output_path", str(tmp / "two")],
         tmp, tmp / "cache-two", {"ACCELERATE_USE_CPU": "1"})

    def results(name):
        (path,) = glob.glob(str(tmp / name / "*" / "results_*.json"))
        return json.loads(Path(path).read_text())

    return tmp, results("one"), results("two")


def test_two_processes_split_the_items_and_agree_with_one(runs):
    _, one, two = runs
    assert set(one["results"]) == set(two["results"]) == set(TASKS.split(","))
    compared = 0
    for task in ("jtc_exit_mat_news", "jtc_submodule_attn_news"):  # every number the same, bootstrap intervals included
        values = {k: v for k, v in one["results"][task].items() if isinstance(v, float)}
        assert values and values == pytest.approx({k: two["results"][task][k] for k in values}, rel=1e-6, abs=1e-6), task
    assert one["configs"]["jtc_exit_mat_news"]["metadata"]["provenance"]["exit"]["items"] == 13
    for task, res in one["results"].items():
        if task not in LENS_TASKS.split(","):
            continue
        p1 = one["configs"][task]["metadata"]["provenance"]
        p2 = two["configs"][task]["metadata"]["provenance"]
        assert p1["processes"] == 1 and p2["processes"] == 2
        assert p1["items_per_process"] == [13] and p2["items_per_process"] == [7, 6]
        assert p1["items"] == p2["items"] == 13 and p1["items_data_sha256"] == p2["items_data_sha256"]
        assert len(p2["peak_memory"]) == 2 and all(m["host_rss_mib"] > 0 for m in p2["peak_memory"])
        assert one["n-samples"][task] == two["n-samples"][task]
        # means without the items at position 0: summed over both processes, the same as one process's
        assert p1.get("items_at_position_0_ids") == p2.get("items_at_position_0_ids")
        assert p1["items_at_position_0"] == 1
        w1, w2 = p1["without_position_0"], p2["without_position_0"]
        assert w1["items"] == w2["items"] == 12 and w1["means"].keys() == w2["means"].keys()
        for m, values in w1["means"].items():
            assert values == pytest.approx(w2["means"][m], rel=1e-5, abs=2e-6), (task, m)
        for key, value in res.items():
            if isinstance(value, float):
                assert math.isclose(value, two["results"][task][key], rel_tol=1e-6, abs_tol=1e-6), (task, key)
                compared += 1
    # tasks x (7 lens metrics x (mean + 3 layers) + r2, r2w x 3 layers) x (value, stderr)
    assert compared == 5 * (7 * 4 + 2 * 3) * 2


def test_two_processes_fit_the_same_projectors(runs):
    tmp, one, two = runs
    files = sorted(glob.glob(str(tmp / "cache-one" / "projectors" / "*.safetensors")))
    assert len(files) == 4  # least squares on news and on wikipedia, the tuned lens on news, the sub-module maps on news
    for path in files:
        a, b = load_file(path), load_file(path.replace("cache-one", "cache-two"))
        assert a.keys() == b.keys()
        for key in a:
            scale = a[key].abs().max().clamp_min(1e-12)
            assert ((a[key] - b[key]).abs().max() / scale).item() < 1e-6, (path, key)
        meta_one = json.loads(Path(path[:-len(".safetensors")] + ".json").read_text())
        meta_two = json.loads(Path(path.replace("cache-one", "cache-two")[:-len(".safetensors")] + ".json").read_text())
        assert meta_one["info"]["processes"] == 1 and meta_two["info"]["processes"] == 2
        if "loss_curve" in meta_one["info"]:  # the tuned lens: same steps, same losses
            assert meta_one["info"]["steps"] == meta_two["info"]["steps"]
            for x, y in zip(meta_one["info"]["loss_curve"], meta_two["info"]["loss_curve"], strict=True):
                assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6)


def test_two_processes_log_every_sample_once(runs):
    tmp, _, _ = runs
    for task in TASKS.split(","):
        (path,) = glob.glob(str(tmp / "two" / "*" / f"samples_{task}_*.jsonl"))
        ids = [json.loads(line)["doc"]["item_id"] for line in Path(path).read_text().splitlines()]
        assert len(ids) == len(set(ids)) == 13
