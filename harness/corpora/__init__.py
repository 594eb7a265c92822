"""Registry of text distributions, by name."""

from __future__ import annotations

from functools import lru_cache

from . import code, dialogue, external, fiction, news, pins, speeches, technical, wikipedia
from .base import SPLITS, Corpus, Document, MissingSourceError, split_documents

_LOADERS = {
    "wikipedia": wikipedia.load,
    "news": news.load,
    "fiction": fiction.load,
    "speeches": speeches.load,
    "code": code.load,
    "dialogue": dialogue.load,
    "technical": technical.load,
}


def names() -> list[str]:
    return sorted(_LOADERS)


@lru_cache(maxsize=None)
def get_corpus(name: str) -> Corpus:
    """A bundled distribution by name, or ``file:PATH`` / ``hf:NAME[:CONFIG]``."""
    if external.is_external(name):
        return external.load(name)
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise ValueError(f"unknown distribution {name!r}; known: {', '.join(names())}, file:PATH, hf:NAME[:CONFIG]") from None
    corpus = loader()
    # a bundled distribution whose sources are not the pinned ones (edited, another package version) is
    # still read, but never silently: a warning now, and corpus_pin in every result's provenance
    corpus.notes["pin"] = pins.warn_if_unpinned(name, corpus)
    return corpus


__all__ = ["SPLITS", "Corpus", "Document", "MissingSourceError", "get_corpus", "names", "split_documents"]
