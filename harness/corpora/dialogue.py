"""Sitcom dialogue: the Seinfeld episodes of the seinfeld-laugh-corpus package.

Each ``the_corpus/*.merged`` file is one episode: subtitles aligned with a transcript's speaker
names. The format is line based: ``# NAME`` sets the speaker of the subtitles that follow; a
subtitle is a start time, one to three lines of text and an end time; a laugh is a time followed
by ``**LOL**``. An episode becomes one document with one utterance per line, ``NAME: text``.
Times, laugh marks, sound descriptions (``[CHUCKLES]``) and music marks are removed, and a
subtitle that ends mid-sentence is joined with the next one of the same speaker.

Some files carry text decoded with the Hebrew code page (``ג€™`` for a music note, ``י`` for
``é``); that is repaired.
"""

from __future__ import annotations

import re

from .base import Corpus, Document, MissingSourceError, cached_documents, hash_files, package_dir

INSTALL = "seinfeld-laugh-corpus==1.0.13"
LOADER_VERSION = "dialogue-1"

_TIME = re.compile(r"^\d+\.\d+$")
_LAUGH = "**LOL**"
_SOUND = re.compile(r"\[[^\]]*\]")
# Runs of characters that are text once encoded with cp1255 and decoded again.
_MOJIBAKE = re.compile(r"[\u05b0-\u05ea\u00a0-\u00ff\u2122\u20ac\u201a-\u201e\u2020-\u2030\u2039\u203a\u02c6\u02dc]+")
_HEBREW = re.compile(r"[\u05b0-\u05ea]")
_ENDS_SENTENCE = re.compile(r"[.!?\"\u201d\u2019']$")


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def _repair(text: str) -> str:
    """Undo text that went through the Hebrew code page: UTF-8 bytes or Latin-1 letters read as cp1255."""

    def fix(match: re.Match) -> str:
        run = match.group()
        if not _HEBREW.search(run):
            return run
        try:
            data = run.encode("cp1255")
        except UnicodeEncodeError:
            return run
        for encoding in ("utf-8", "cp1252"):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError:
                continue
        return run

    return _MOJIBAKE.sub(fix, text)


def _clean_text(text: str) -> str:
    text = _SOUND.sub(" ", text).replace("\u266a", " ").replace("\u266b", " ")
    text = re.sub(r"^\s*-\s+", "", text)  # a dash opening a subtitle marks a change of speaker
    text = " ".join(text.split())
    return text if any(c.isalnum() for c in text) else ""


def _speaker(line: str) -> str:
    """A speaker line's name, tidied: "#  MAN#3" -> "MAN 3", "MR.PITT" -> "MR. PITT", "GEORGE(O.C.):" -> "GEORGE"."""
    name = line.lstrip("#").split(":", 1)[0]
    name = re.sub(r"\([^)]*\)", " ", name).replace('"', " ").replace("#", " ")
    name = re.sub(r"\b(MR|MRS|MS|DR)\.(?=\S)", r"\1. ", name)
    return " ".join(name.split())


def _subtitles(text: str) -> list[tuple[str, str]]:
    """(speaker, text) of every subtitle, in order."""
    out = []
    speaker = ""
    lines = [ln.strip() for ln in _repair(text).replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            speaker = _speaker(line)
            i += 1
        elif _TIME.match(line):
            # A start time, then either the laugh mark or text lines up to the end time.
            j = i + 1
            body = []
            while j < len(lines) and not _TIME.match(lines[j]) and not lines[j].startswith("#"):
                if lines[j] == _LAUGH:
                    j += 1
                    break
                body.append(lines[j])
                j += 1
            else:
                j += 1 if j < len(lines) and _TIME.match(lines[j]) else 0
            clean = _clean_text(" ".join(body))
            if clean:
                out.append((speaker, clean))
            i = max(j, i + 1)
        else:
            i += 1  # blank line at the end of a file
    return out


def _utterances(subtitles: list[tuple[str, str]]) -> list[str]:
    """Join a subtitle that stops mid-sentence with the next one of the same speaker."""
    merged: list[list[str]] = []
    for speaker, text in subtitles:
        if merged and merged[-1][0] == speaker:
            previous = merged[-1][1]
            open_end = not _ENDS_SENTENCE.search(previous) or (previous.endswith("...") and text[:1].islower())
            if open_end or text.startswith("..."):
                merged[-1][1] = f"{previous} {text}"
                continue
        merged.append([speaker, text])
    return [f"{s}: {t}" if s else t for s, t in merged]


def _title(stem: str) -> tuple[str, str]:
    match = re.match(r"Seinfeld\.(S\d+E\d+)\.(.*)$", stem)
    if not match:
        return stem, stem.replace(".", " ")
    return match.group(1), match.group(2).replace(".", " ")


def load() -> Corpus:
    root = package_dir("seinfeld_laugh_corpus", INSTALL)
    folder = root / "the_corpus"
    paths = sorted(folder.glob("*.merged"))
    if not paths:
        raise MissingSourceError(f"no episodes under {folder}; reinstall with: pip install --no-deps --force-reinstall {INSTALL}")
    hashes = hash_files(paths, root)

    def build():
        docs = []
        for p in paths:
            code, title = _title(p.stem)
            text = "\n".join(_utterances(_subtitles(_decode(p.read_bytes()))))
            if text:
                docs.append(Document(doc_id=f"seinfeld:{code}", text=text, title=title))
        return docs

    return Corpus(
        name="dialogue",
        documents=cached_documents("dialogue", LOADER_VERSION, hashes, build),
        source_hashes=hashes,
        description="Seinfeld episodes (seasons 4-9): subtitle dialogue with speaker names from aligned transcripts",
        license="copyrighted (Castle Rock Entertainment); research use only",
        notes={"package": INSTALL},
    )
