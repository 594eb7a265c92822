"""What the wheel puts in site-packages, and that the installed code runs whatever the working folder holds."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import tiny
from fixture_corpus import fixture_distribution
from installed import installed_package_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_installs_one_import_root_its_pth_file_and_hook(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "No matching distribution found for hatchling" in proc.stderr:
        pytest.skip("the build backend (hatchling) cannot be installed here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("jtc_lens-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"jtc_lens", "jtc_lens.pth", "_jtc_lens_autoload.py"}
    assert {"jtc_lens/__init__.py", "jtc_lens/harness/__init__.py", "jtc_lens/leaderboard/__init__.py",
            "jtc_lens/tasks/jtc_task.py", "jtc_lens/tasks/_jtc_defaults.yml"} <= set(names)


@pytest.mark.slow
def test_lm_eval_runs_the_installed_code_beside_a_decoy_harness_folder(tmp_path):
    if installed_package_dir() is None:
        pytest.skip("jtc-lens is not installed as a wheel in this environment (pip install . or tox)")
    work = tmp_path / "checkout"
    marker = tmp_path / "decoy-imported"
    # a folder named like the project's source folders, first on sys.path under `python -m`
    for package in ("harness", "leaderboard", "harness/lmeval"):
        (work / package).mkdir(parents=True, exist_ok=True)
        (work / package / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write('{package}\\n')\n")
    (work / "harness" / "lmeval" / "task.py").write_text(f"open({str(marker)!r}, 'a').write('task\\n')\nJTCTask = None\n")
    model, tok = tiny.build("llama", layers=2)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JTC_CACHE=str(tmp_path / "cache"), TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tmp_path / 'model'}",
           "--tasks", "custom_jtc_id", "--output_path", str(tmp_path / "out"),
           "--metadata", json.dumps({"corpus": fixture_distribution(), "n_eval": 6})]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not marker.exists(), f"the decoy was imported: {marker.read_text()}"
    (results,) = (tmp_path / "out").glob("*/results_*.json")
    assert json.loads(results.read_text())["results"]["custom_jtc_id"]["p@1,none"] >= 0
