"""Where the installed (wheel) copy of jtc-lens lives, for tests that run the stock lm_eval command."""

from importlib import metadata
from pathlib import Path


def installed_package_dir() -> Path | None:
    """Folder of the installed ``harness`` package, or None when jtc-lens is not installed as a distribution."""
    try:
        dist = metadata.distribution("jtc-lens")
    except metadata.PackageNotFoundError:
        return None
    init = next((f for f in dist.files or [] if str(f) == "harness/__init__.py"), None)
    return Path(dist.locate_file(init)).parent if init else None
