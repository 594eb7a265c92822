"""Registry of text distributions, by name."""

from __future__ import annotations

from functools import lru_cache

from . import news, wikipedia
from .base import SPLITS, Corpus, Document, MissingSourceError, split_documents

_LOADERS = {
    "wikipedia": wikipedia.load,
    "news": news.load,
}


def names() -> list[str]:
    return sorted(_LOADERS)


@lru_cache(maxsize=None)
def get_corpus(name: str) -> Corpus:
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise ValueError(f"unknown distribution {name!r}; known: {', '.join(names())}") from None
    return loader()


__all__ = ["SPLITS", "Corpus", "Document", "MissingSourceError", "get_corpus", "names", "split_documents"]
