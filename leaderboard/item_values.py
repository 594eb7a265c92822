"""The per-item values the paired tests read, kept beside a results file in a form small enough for git.

A ``samples_<task>_<stamp>.jsonl`` holds about 270 values per item (every metric at every layer, the doc); the
paired tests of the leaderboard and of ``jtc claims`` read three metrics of it (``METRICS``). ``write`` stores
exactly those, losslessly (P@1 as uint8, the others as float32 where that holds them exactly), with the item ids and
item hashes that pair runs, in ``samples_<task>_<stamp>.safetensors`` beside it. The file names the results file
it belongs to by sha256, so a summary is never read for another run. ``read`` gives back the same ``Samples`` as
the JSONL would, so every test computed from either is the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from ..harness.store import atomic_write_bytes, sha256_file

FORMAT = "jtc-item-values-1"
METRICS = ("p@1", "surprisal", "kl")  # what the paired families compare (tables.COMPARED)
_BINARY = ("p@1",)


def path_for(samples_jsonl: Path) -> Path:
    return samples_jsonl.with_suffix(".safetensors")


def write(task, samples) -> Path:
    """Store ``samples`` (read from ``task``'s JSONL with ``METRICS``) beside it, each metric in the narrowest of
    uint8 (P@1), float32 and float64 that holds every value exactly."""
    if task.samples_file is None:
        raise ValueError(f"{task.results_file}: task {task.task} has no samples file to summarise")
    tensors = {}
    for metric in METRICS:
        cols = samples.values[metric]
        full = np.stack([np.asarray(cols[l], dtype=np.float64) for l in range(task.num_layers)], axis=1) \
            if task.num_layers else np.zeros((len(samples.ids), 0))
        kept = full.astype(np.uint8 if metric in _BINARY else np.float32)
        if not np.array_equal(kept.astype(np.float64), full, equal_nan=True):
            kept = full  # not exactly a narrower type: kept as read
        tensors[metric] = np.ascontiguousarray(kept)
    meta = {"format": FORMAT, "task": task.task, "items": str(len(samples.ids)), "num_layers": str(task.num_layers),
            "results_file": task.results_file.name, "results_sha256": sha256_file(task.results_file),
            "samples_sha256": sha256_file(task.samples_file),
            "ids": json.dumps(samples.ids), "item_hashes": json.dumps(samples.item_hashes),
            "text_hashes": json.dumps(samples.text_hashes)}
    out = path_for(task.samples_file)
    if not _holds(out, tensors, meta):
        # safetensors orders the metadata by hash, differently each time: an unchanged file is left as it is, so
        # that writing the values again does not change a committed file's bytes
        atomic_write_bytes(out, save(tensors, metadata=meta))
    return out


def _holds(path: Path, tensors: dict, meta: dict) -> bool:
    """Whether ``path`` already holds exactly ``tensors`` (same dtypes) and ``meta``."""
    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="np") as fh:
            if (fh.metadata() or {}) != meta or set(fh.keys()) != set(tensors):
                return False
            for k, v in tensors.items():
                stored = fh.get_tensor(k)
                if stored.dtype != v.dtype or not np.array_equal(stored, v, equal_nan=True):
                    return False
            return True
    except Exception:  # a damaged file is written anew
        return False


def read(task, path: Path, metrics: tuple[str, ...]) -> tuple[list, dict, list, list]:
    """Item ids, ``metrics`` (metric -> layer -> values), item hashes and text hashes stored in ``path`` for ``task``
    (read.load_samples makes them its ``Samples``); ValueError naming the file if it does not belong to the task's
    results file, lacks a metric or is damaged."""
    missing = [m for m in metrics if m not in METRICS]
    if missing:
        raise ValueError(f"{path}: holds {', '.join(METRICS)} per item, not {', '.join(missing)} (read the samples JSONL)")
    try:
        with safe_open(str(path), framework="np") as fh:
            meta = fh.metadata() or {}
            arrays = {m: fh.get_tensor(m) for m in metrics if m in fh.keys()}
    except Exception as exc:  # a truncated or foreign file
        raise ValueError(f"{path}: unreadable item values ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format {meta.get('format')!r})")
    if meta.get("task") != task.task:
        raise ValueError(f"{path}: made for task {meta.get('task')}, not {task.task}")
    actual = sha256_file(task.results_file)
    if meta.get("results_sha256") != actual:
        raise ValueError(f"{path}: made for a results file of sha256 {str(meta.get('results_sha256'))[:12]}…, but "
                         f"{task.results_file} has {actual[:12]}… (changed since, or another run's)")
    ids = json.loads(meta["ids"])
    if len(ids) != task.items or int(meta["num_layers"]) != task.num_layers:
        raise ValueError(f"{path}: {len(ids)} items and {meta['num_layers']} layers, but the results file reports "
                         f"{task.items} items and {task.num_layers} layers")
    values = {}
    for m in metrics:
        arr = arrays.get(m)
        if arr is None or arr.shape != (len(ids), task.num_layers):
            raise ValueError(f"{path}: {m} is missing or not ({len(ids)}, {task.num_layers})")
        values[m] = {l: arr[:, l].astype(np.float64) for l in range(task.num_layers)}
    return ids, values, json.loads(meta["item_hashes"]), json.loads(meta["text_hashes"])
