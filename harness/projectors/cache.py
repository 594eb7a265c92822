"""Cache of fitted projectors: one safetensors file of tensors plus one JSON file of provenance.

The JSON is written last and names the sha256 of the tensor file, so an entry is complete only
once both exist and agree. An entry whose key fields (model fingerprint, fit-data hash, protocol,
seed, format) differ from what is asked, or whose tensors are damaged, is refitted and overwritten,
never used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..store import atomic_write_bytes, atomic_write_json, cache_root, sha256_bytes, sha256_json

FORMAT = "jtc-projectors-1"
log = logging.getLogger(__name__)


def entry_paths(key_fields: dict) -> tuple[Path, Path]:
    key = sha256_json({"format": FORMAT, **key_fields})[:24]
    folder = cache_root() / "projectors"
    return folder / f"{key}.safetensors", folder / f"{key}.json"


def load_entry(key_fields: dict) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Tensors and provenance of a valid entry, or None (missing, mismatched or corrupt: the reason is logged)."""
    tensor_path, meta_path = entry_paths(key_fields)
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text("utf-8"))
        if meta.get("format") != FORMAT or meta.get("key") != key_fields:
            log.warning("projector cache entry %s was made for other inputs; refitting", meta_path.name)
            return None
        data = tensor_path.read_bytes()
        if sha256_bytes(data) != meta.get("tensors_sha256"):
            log.warning("projector cache entry %s is damaged (hash mismatch); refitting", tensor_path.name)
            return None
        return st_load(data), meta
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("projector cache entry %s is unreadable (%s); refitting", meta_path.name, exc)
        return None


def save_entry(key_fields: dict, tensors: dict[str, torch.Tensor], info: dict) -> dict:
    tensor_path, meta_path = entry_paths(key_fields)
    data = st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": FORMAT})
    atomic_write_bytes(tensor_path, data)
    meta = {"format": FORMAT, "key": key_fields, "tensors_sha256": sha256_bytes(data), **info}
    atomic_write_json(meta_path, meta)
    return meta
