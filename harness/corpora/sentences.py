"""Sentence segmentation for the paper protocol: a rule-based splitter that needs no downloaded model."""

from __future__ import annotations

import re

# Abbreviations after which a period does not end a sentence.
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e", "cf", "no", "vol",
    "fig", "inc", "ltd", "co", "corp", "gen", "col", "lt", "sgt", "capt", "gov", "sen", "rep", "rev",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "u.s", "u.k", "approx",
}
# Sentence lengths (in words) the paper protocol uses: shorter are headings and fragments, longer run-ons.
MIN_WORDS, MAX_WORDS = 4, 120
# A candidate boundary: end punctuation (optionally closed by quotes/brackets), whitespace, then an
# opening quote/bracket or an upper-case letter or digit.
_BOUNDARY = re.compile(r"([.!?][\"'\u201d\u2019)\]]*)\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")


def split_sentences(paragraph: str) -> list[str]:
    """Split one paragraph into sentences; whitespace inside a sentence is collapsed."""
    text = " ".join(paragraph.split())
    if not text:
        return []
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(text):
        end = match.end(1)
        words = text[start:match.start(1) + 1].split()
        last = words[-1].rstrip(".").lower().lstrip("(\"'") if words else ""
        # "U.S." style initials and single letters ("J. Smith") are not boundaries.
        if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
            continue
        sentences.append(text[start:end].strip())
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def document_sentences(text: str, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> tuple[list[str], int]:
    """Sentences of a document, paragraph by paragraph, with the count of those left out by length.

    Headings and list fragments (fewer than ``min_words`` words) and run-ons (more than ``max_words``)
    are not sentences the protocol can use; the count is returned so callers can report it.
    """
    kept, skipped = [], 0
    for paragraph in text.split("\n"):
        for sentence in split_sentences(paragraph):
            n = len(sentence.split())
            if min_words <= n <= max_words:
                kept.append(sentence)
            else:
                skipped += 1
    return kept, skipped
