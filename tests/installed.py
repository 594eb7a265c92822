"""Where the installed (wheel) copy of jtc-lens lives, for tests that run the stock lm_eval command."""

from importlib import metadata
from pathlib import Path


def installed_package_dir() -> Path | None:
    """Folder of the installed ``jtc_lens`` package, or None when jtc-lens is not installed as a wheel."""
    try:
        dist = metadata.distribution("jtc-lens")
    except metadata.PackageNotFoundError:
        return None
    init = next((f for f in dist.files or [] if str(f) == "jtc_lens/__init__.py"), None)
    return Path(dist.locate_file(init)).parent if init else None


CHECKOUT = Path(__file__).resolve().parents[1]


def lm_eval_launch(env: dict) -> tuple[list[str], dict] | None:
    """How a test starts the stock lm_eval command: the installed wheel (PYTHONPATH removed, so that
    nothing of the checkout is importable); None when jtc-lens is not installed from a wheel. The command is ``lm_eval_module_args`` after ``python -m lm_eval``."""
    import sys

    args, env = lm_eval_module_args(env) or (None, None)
    if args is None:
        return None
    return [sys.executable, "-m", "lm_eval", *args], env


def lm_eval_module_args(env: dict) -> tuple[list[str], dict] | None:
    """Arguments for ``-m lm_eval`` (under ``python`` or ``accelerate launch``) and the environment to run it in."""
    pkg = installed_package_dir()
    if pkg is not None and (pkg / "tasks").is_dir():
        return [], {k: v for k, v in env.items() if k != "PYTHONPATH"}
    return None  # the checkout's folders are importable only as installed (jtc_lens.harness, ...)


def run_lm_eval_on_tiny_model(tmp_path: Path, tasks: str, metadata: dict, layers: int = 4, model_args: str = ""):
    """The stock lm_eval on a tiny random Llama saved under ``tmp_path``, offline, with its own projector cache:
    (the finished process, its results file as a dict, that file's path, the output folder). Skips the test when
    jtc-lens is not installed as a wheel; fails it when lm_eval fails."""
    import glob
    import json
    import os
    import subprocess
    import sys

    import pytest

    import tiny

    launch = lm_eval_launch({**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                             "JTC_CACHE": str(tmp_path / "cache"), "TQDM_DISABLE": "1"})
    if launch is None:
        pytest.skip("jtc-lens is not installed as a wheel in this environment (pip install . or tox)")
    cmd, env = launch
    model, tok = tiny.build("llama", layers=layers)
    model_dir = tmp_path / "tiny-llama"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "out"
    proc = subprocess.run(cmd + ["--model", "hf", "--model_args", f"pretrained={model_dir}{model_args}", "--tasks", tasks,
                                 "--output_path", str(out), "--log_samples", "--metadata", json.dumps(metadata)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results_file,) = glob.glob(str(out / "*" / "results_*.json"))
    return proc, json.loads(Path(results_file).read_text()), Path(results_file), out
