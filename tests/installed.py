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
