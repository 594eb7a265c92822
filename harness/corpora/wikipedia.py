"""English Wikipedia articles from the MediaWiki XML dump that gensim ships as test data."""

from __future__ import annotations

import bz2
import re
import xml.etree.ElementTree as ET

from .base import Corpus, Document, MissingSourceError, cached_documents, hash_files, package_dir, require_file

INSTALL = "gensim==4.4.0"
DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LOADER_VERSION = "wikipedia-2"
# Sections from which on an article holds lists of links and citations, not prose.
_TRAILING_SECTIONS = re.compile(
    r"^==+\s*(References|External links|See also|Notes|Further reading|Bibliography|Sources|Citations|Footnotes)\s*==+",
    re.IGNORECASE | re.MULTILINE,
)
_NON_PROSE_LINK = re.compile(r"^(file|image|category|media):", re.IGNORECASE)
# Citations and comments are removed before parsing: the parser leaves some of them in place
# when they sit inside templates or unbalanced markup.
_REFS = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
_LEFTOVER_TAG = re.compile(r"</?[a-zA-Z][^>]*>")


def _clean(wikitext: str) -> str:
    try:
        import mwparserfromhell
    except ImportError as exc:  # pragma: no cover - exercised by the install-error test
        raise MissingSourceError("cleaning Wikipedia markup needs mwparserfromhell: pip install mwparserfromhell") from exc
    cut = _TRAILING_SECTIONS.search(wikitext)
    if cut:
        wikitext = wikitext[: cut.start()]
    code = mwparserfromhell.parse(_REFS.sub("", wikitext))
    for tag in code.filter_tags(recursive=True):
        if str(tag.tag).lower() in {"ref", "table", "gallery", "math", "references", "timeline"}:
            try:
                code.remove(tag)
            except ValueError:
                pass  # already removed with an enclosing node
    for link in code.filter_wikilinks(recursive=True):
        if _NON_PROSE_LINK.match(str(link.title).strip()):
            try:
                code.remove(link)
            except ValueError:
                pass
    text = code.strip_code(normalize=True, collapse=True)
    # strip_code keeps the text of table markup ({| ... |}) written without tags and heading marks.
    text = re.sub(r"\{\|.*?\|\}", "", text, flags=re.DOTALL)
    text = _LEFTOVER_TAG.sub("", text)
    lines = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith(("|", "!", "{", "}")) or re.fullmatch(r"=+.*=+", line):
            continue
        lines.append(line)
    return "\n".join(lines)


def _parse(path) -> list[Document]:
    docs = []
    with bz2.open(path, "rb") as fh:
        for _, elem in ET.iterparse(fh):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.find("{*}ns")
            title = elem.findtext("{*}title") or ""
            text = elem.findtext("{*}revision/{*}text") or ""
            page_id = elem.findtext("{*}id") or title
            if ns is not None and ns.text == "0" and elem.find("{*}redirect") is None and not text.lstrip().upper().startswith("#REDIRECT"):
                clean = _clean(text)
                if clean:
                    docs.append(Document(doc_id=f"enwiki:{page_id}", text=clean, title=title))
            elem.clear()
    return docs


def load() -> Corpus:
    root = package_dir("gensim", INSTALL)
    path = require_file(root / DUMP, INSTALL)
    hashes = hash_files([path], root)
    docs = cached_documents("wikipedia", LOADER_VERSION, hashes, lambda: _parse(path))
    return Corpus(
        name="wikipedia",
        documents=docs,
        source_hashes=hashes,
        description="English Wikipedia articles (2016 dump shipped with gensim), markup removed",
        license="CC BY-SA 3.0",
        notes={"package": INSTALL},
    )
