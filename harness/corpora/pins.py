"""The pinned sources of the bundled distributions, and the check every load makes against them.

``manifest.json`` pins, per bundled distribution, the sha256 over its per-file source hashes (for ``code``,
per Python version: the standard library changes with it). ``manifest_files.json`` keeps each file's
sha256 (its first 16 hex digits), only to name the files that differ when the pin does not match.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..store import atomic_write_json, sha256_json

MANIFEST = Path(__file__).with_name("manifest.json")
FILE_MANIFEST = Path(__file__).with_name("manifest_files.json")
SHORT = 16  # hex digits of a per-file pin: enough to tell which file changed
LISTED = 10  # files named per kind of difference; the rest are counted
log = logging.getLogger(__name__)


def pin_key(name: str, corpus) -> str:
    python = corpus.notes.get("python")
    return f"{name}@python{python}" if name == "code" and python else name


def sources_sha256(corpus) -> str:
    return sha256_json(corpus.source_hashes)


def _read(path: Path) -> dict:
    return json.loads(path.read_text("utf-8")) if path.is_file() else {}


def load_manifest() -> dict:
    return _read(MANIFEST)


def differing_files(key: str, source_hashes: dict[str, str]) -> dict | None:
    """Files changed, missing or added against the per-file pins of ``key`` (None when there are none)."""
    pinned = _read(FILE_MANIFEST).get(key)
    if pinned is None:
        return None
    actual = {path: digest[:SHORT] for path, digest in source_hashes.items()}
    kinds = {
        "changed": sorted(p for p in actual.keys() & pinned.keys() if actual[p] != pinned[p]),
        "missing": sorted(pinned.keys() - actual.keys()),
        "added": sorted(actual.keys() - pinned.keys()),
    }
    return {kind: {"count": len(files), "files": files[:LISTED]} for kind, files in kinds.items() if files}


def check(name: str, corpus) -> dict:
    """How the sources just read compare with the pin: status ``match``, ``differs`` (with the files) or ``unpinned``."""
    key = pin_key(name, corpus)
    pinned = load_manifest().get(key)
    actual = sources_sha256(corpus)
    out = {"key": key, "sources_sha256": actual, "files": len(corpus.source_hashes)}
    if pinned is None:
        return {**out, "status": "unpinned"}
    if pinned == actual:
        return {**out, "status": "match"}
    return {**out, "status": "differs", "pinned_sha256": pinned, "differences": differing_files(key, corpus.source_hashes)}


def describe(result: dict) -> str:
    """One line saying what a check found, naming the files that differ."""
    key = result["key"]
    if result["status"] == "match":
        return f"{key}: {result['files']} source files match the pinned sha256 {result['sources_sha256'][:16]}"
    if result["status"] == "unpinned":
        return f"{key}: no pinned hash (sources sha256 {result['sources_sha256']}, {result['files']} files); it cannot be checked"
    text = f"{key}: sources sha256 {result['sources_sha256']} differs from the pinned {result['pinned_sha256']}"
    differences = result.get("differences")
    if not differences:
        return text + " (no per-file pins to name the files)"
    parts = []
    for kind, found in differences.items():
        more = f" and {found['count'] - len(found['files'])} more" if found["count"] > len(found["files"]) else ""
        parts.append(f"{found['count']} {kind}: {', '.join(found['files'])}{more}")
    return text + "; " + "; ".join(parts)


def warn_if_unpinned(name: str, corpus) -> dict:
    """The check made when a bundled distribution is loaded: anything but a match is a logged warning."""
    result = check(name, corpus)
    if result["status"] != "match":
        log.warning("corpus %s; results cite the sources actually read (recorded as corpus_pin in provenance)", describe(result))
    return result


def write(corpora: dict[str, object]) -> dict:
    """Pin the given loaded distributions (name -> corpus): their hash, and each file's for naming differences."""
    manifest, files = load_manifest(), _read(FILE_MANIFEST)
    for name, corpus in corpora.items():
        key = pin_key(name, corpus)
        manifest[key] = sources_sha256(corpus)
        files[key] = {path: digest[:SHORT] for path, digest in sorted(corpus.source_hashes.items())}
    atomic_write_json(MANIFEST, manifest)
    atomic_write_json(FILE_MANIFEST, files)
    return manifest
