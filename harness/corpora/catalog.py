"""What the registered distributions hold, and whether their sources are the pinned ones.

``manifest.json`` beside this file pins, per bundled distribution, the sha256 over its per-file source
hashes (for ``code``, per Python version: the standard library changes with it). ``verify`` recomputes them.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..store import atomic_write_json, sha256_json
from . import get_corpus, names
from .base import SPLITS, MissingSourceError
from .sentences import document_sentences

MANIFEST = Path(__file__).with_name("manifest.json")


def pin_key(name: str, corpus) -> str:
    python = corpus.notes.get("python")
    return f"{name}@python{python}" if name == "code" and python else name


def sources_sha256(corpus) -> str:
    return sha256_json(corpus.source_hashes)


def describe(name: str, tokenizer=None, seed: int = 1234) -> dict:
    corpus = get_corpus(name)
    words = sum(len(d.text.split()) for d in corpus.documents)
    row = {
        "name": name,
        "description": corpus.description,
        "license": corpus.license,
        "source": corpus.notes.get("package", ""),
        "documents": len(corpus.documents),
        "words": words,
        "source_files": len(corpus.source_hashes),
        "sources_sha256": sources_sha256(corpus),
        "corpus_sha256": corpus.source_hash,
    }
    for split in SPLITS:
        row[f"sentences_{split}"] = sum(len(document_sentences(d.text)[0]) for d in corpus.split(split, seed))
    if tokenizer is not None:
        texts = [d.text for d in corpus.documents]
        row["tokens"] = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return row


def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text("utf-8")) if MANIFEST.is_file() else {}


def verify(name: str) -> tuple[bool, str]:
    """(ok, message): sources present and equal to the pinned hash."""
    try:
        corpus = get_corpus(name)
    except MissingSourceError as exc:
        return False, str(exc)
    key = pin_key(name, corpus)
    pinned = load_manifest().get(key)
    actual = sources_sha256(corpus)
    if pinned is None:
        return False, f"{key}: no pinned hash (sources sha256 {actual}, {len(corpus.source_hashes)} files)"
    if pinned != actual:
        return False, f"{key}: sources sha256 {actual} differs from the pinned {pinned}"
    return True, f"{key}: {len(corpus.source_hashes)} source files match the pinned sha256 {pinned[:16]}"


def pin(selected: list[str]) -> dict:
    manifest = load_manifest()
    for name in selected:
        corpus = get_corpus(name)
        manifest[pin_key(name, corpus)] = sources_sha256(corpus)
    atomic_write_json(MANIFEST, manifest)
    return manifest


def markdown_table(rows: list[dict]) -> str:
    tok = "tokens" in rows[0] if rows else False
    head = "| distribution | source | license | documents | words | " + ("tokens (SmolLM2) | " if tok else "") + \
           "sentences train / val / test | source files | sha256 of sources |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| `{r['name']}` | {r['description']} ({r['source']}) | {r['license']} | {r['documents']:,} | {r['words']:,} | "
            + (f"{r['tokens']:,} | " if tok else "")
            + f"{r['sentences_train']:,} / {r['sentences_validation']:,} / {r['sentences_test']:,} | {r['source_files']:,} | "
            f"`{r['sources_sha256']}` |"
        )
    return "\n".join(lines)


__all__ = ["describe", "markdown_table", "names", "pin", "verify"]
