"""What the registered distributions hold, and whether their sources are the pinned ones (see ``pins``)."""

from __future__ import annotations

from . import get_corpus, names, pins
from .base import SPLITS, MissingSourceError
from .pins import MANIFEST, sources_sha256  # noqa: F401  (MANIFEST: the file `jtc corpora pin` names)
from .sentences import document_sentences


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


def verify(name: str) -> tuple[bool, str]:
    """(ok, message): sources present and equal to the pinned hash; the message names the files that differ."""
    try:
        corpus = get_corpus(name)
    except MissingSourceError as exc:
        return False, str(exc)
    result = pins.check(name, corpus)
    return result["status"] == "match", pins.describe(result)


def pin(selected: list[str]) -> dict:
    return pins.write({name: get_corpus(name) for name in selected})


def markdown_table(rows: list[dict]) -> str:
    tok = any("tokens" in r for r in rows)
    head = "| distribution | source | license | documents | words | " + ("tokens (SmolLM2) | " if tok else "") + \
           "sentences train / val / test | source files | sha256 of sources |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "missing" in r:  # a distribution whose source package is not installed keeps its row
            lines.append(f"| `{r['name']}` | not installed: {r['missing']} |" + " – |" * (head.count("|") - 3))
            continue
        lines.append(
            f"| `{r['name']}` | {r['description']} ({r['source']}) | {r['license']} | {r['documents']:,} | {r['words']:,} | "
            + (f"{r['tokens']:,} | " if tok else "")
            + f"{r['sentences_train']:,} / {r['sentences_validation']:,} / {r['sentences_test']:,} | {r['source_files']:,} | "
            f"`{r['sources_sha256']}` |"
        )
    return "\n".join(lines)


__all__ = ["describe", "markdown_table", "names", "pin", "verify"]
