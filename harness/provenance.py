"""What every number carries: software versions, time, and the model's own record where it has one."""

from __future__ import annotations

import datetime as _dt
import functools
import json
import platform
from importlib import metadata
from pathlib import Path

MODEL_RECORD = "jtc_model.json"  # written beside prepared bundled models


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("jtc-lens", "torch", "transformers", "lm_eval", "numpy", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    out["jtc-lens source sha256"] = source_sha256()
    return out


@functools.lru_cache(maxsize=1)
def source_sha256() -> str:
    """sha256 over the code that ran (every .py, .yaml, .yml and .j2 file of this package, by relative path): the
    version number stays the same between changes, this does not."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml", ".yml", ".j2") and p.is_file()
                       and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def peak_memory() -> dict:
    """Peak resident memory of this process so far, and peak device memory when on CUDA (MiB)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"host_rss_mib": round(rss / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)}
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated() / (1 << 20), 1)
    except Exception:  # pragma: no cover - a broken CUDA set-up must not stop the report
        pass
    return out


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def model_record(name_or_path: str) -> dict | None:
    """The record a prepared model folder carries (source file hash, quantisation), if any."""
    path = Path(name_or_path) / MODEL_RECORD
    if path.is_file():
        try:
            return json.loads(path.read_text("utf-8"))
        except ValueError:
            return {"error": f"unreadable {MODEL_RECORD}"}
    return None
