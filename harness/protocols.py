"""Items to score, by protocol, built from a corpus split without a tokenizer.

An item is text plus what the engine needs to place the scored positions once it has tokenized it:
- paper: one sentence; ``u`` in [0, 1) picks one position uniformly (position = floor(u * candidates)),
  the input is cut after it and its next token is the target (Jump to Conclusions). The candidates are
  the positions with a next token (``position_draw="with_next"``, the default) or every position
  (``"all"``, the paper's draw; an item drawn at its last token has no target: no cross-entropy).
- dense: a block of consecutive sentences; the first ``chunk_len`` tokens are the input and every
  position with a next token inside the chunk is scored; with ``stride`` < ``chunk_len`` only the last
  ``stride`` of them are, so each keeps at least ``chunk_len - stride`` tokens of context.
Items depend only on the corpus, the split, the seed and the protocol parameters.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from .corpora import SPLITS, Corpus
from .corpora.base import SPLIT_FRACTIONS
from .corpora.sentences import MAX_WORDS, MIN_WORDS, document_sentences

PROTOCOLS = ("paper", "dense")
POSITION_DRAWS = ("with_next", "all")
NO_TARGET = -1  # the target of a scored position without a next token (position_draw="all")
# Characters per token is about 4 for English BPE vocabularies; dense blocks carry 1.5x that so
# that a chunk is nearly always filled; a short block is scored on the positions it has.
_CHARS_PER_TOKEN = 6


@dataclass(frozen=True)
class ProtocolConfig:
    name: str = "paper"
    seed: int = 1234
    chunk_len: int = 128
    stride: int | None = None
    position_draw: str = "with_next"

    def __post_init__(self):
        if self.name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.name!r}; expected one of {PROTOCOLS}")
        if self.position_draw not in POSITION_DRAWS:
            raise ValueError(f"unknown position_draw {self.position_draw!r}; expected one of {POSITION_DRAWS}")
        if self.name == "dense" and self.position_draw != "with_next":
            raise ValueError("position_draw applies to the paper protocol; the dense protocol scores every position "
                             "with a next token inside the chunk")
        if self.chunk_len < 2:
            raise ValueError("chunk_len must be at least 2")
        if self.stride is not None and not 1 <= self.stride <= self.chunk_len:
            raise ValueError(f"stride must be between 1 and chunk_len ({self.chunk_len}), got {self.stride}")

    def as_dict(self) -> dict:
        """What identifies the items and positions (cache keys, item hashes, provenance). The default draw is left
        out, so that keys and hashes of runs that predate the option stay valid."""
        d = asdict(self)
        if self.name == "paper":
            d.pop("chunk_len")
            d.pop("stride")
        if self.position_draw == "with_next":
            d.pop("position_draw")
        return d


@dataclass(frozen=True)
class Item:
    item_id: str
    text: str
    u: float  # position draw for the paper protocol; unused by dense

    def as_dict(self) -> dict:
        return asdict(self)


def item_sha256(item: Item, protocol: ProtocolConfig) -> str:
    """Short hash of what an item's scores depend on besides the model: its text, its position draw and the
    protocol's chunking. Recorded with every sample so that items paired by id can be checked to be the same."""
    chunking = {k: v for k, v in protocol.as_dict().items() if k != "seed"}  # the seed acts through u and the ids
    payload = json.dumps([item.text, item.u, chunking], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _uniform(seed: int, item_id: str) -> float:
    """A uniform draw tied to (seed, item id): an item keeps its position whatever else is sampled."""
    digest = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def build_items(corpus: Corpus, split: str, protocol: ProtocolConfig, limit: int | None = None) -> list[Item]:
    """Items of one split in a seeded order; ``limit`` takes a prefix of that order."""
    items: list[Item] = []
    for doc in corpus.split(split, seed=protocol.seed):
        if protocol.name == "paper":
            sentences, _ = document_sentences(doc.text)
            items += [Item(f"{doc.doc_id}#s{k}", s, 0.0) for k, s in enumerate(sentences)]
        else:
            items += _dense_blocks(doc.doc_id, doc.text, protocol.chunk_len * _CHARS_PER_TOKEN)
    order = np.random.default_rng(protocol.seed).permutation(len(items))
    chosen = [items[i] for i in order[: limit if limit is not None else len(items)]]
    if protocol.name == "paper":
        chosen = [Item(it.item_id, it.text, _uniform(protocol.seed, it.item_id)) for it in chosen]
    return chosen


def no_items_reason(corpus: Corpus, split: str, protocol: ProtocolConfig) -> str:
    """Why ``split`` of ``corpus`` yields no items under ``protocol``: said instead of a bare "no items"."""
    counts = {s: len(corpus.split(s, seed=protocol.seed)) for s in SPLITS}
    n = len(corpus.documents)
    if counts[split] == 0:
        where = ", ".join(f"{s} {k}" for s, k in counts.items() if k)
        shares = "/".join(f"{round(100 * f)}" for f in SPLIT_FRACTIONS)
        return (f"all {n} document(s) fall in other splits than {split} ({where}): documents, not sentences, are split "
                f"{shares} ({'/'.join(SPLITS)}), so a corpus needs at least 3 documents "
                "(in a text file, documents are separated by blank lines; in a .jsonl file, one per line)")
    docs = corpus.split(split, seed=protocol.seed)
    if protocol.name == "paper":
        skipped = sum(document_sentences(d.text)[1] for d in docs)
        return (f"no sentence of the {len(docs)} document(s) of the {split} split has {MIN_WORDS} to {MAX_WORDS} words "
                f"(the paper protocol scores one position per sentence; {skipped} sentence(s) were too short or too long)")
    return f"the {len(docs)} document(s) of the {split} split hold no text"


def _dense_blocks(doc_id: str, text: str, min_chars: int) -> list[Item]:
    sentences, _ = document_sentences(text, min_words=1, max_words=10**6)
    blocks, current = [], []
    for s in sentences:
        current.append(s)
        if sum(len(x) + 1 for x in current) >= min_chars:
            blocks.append(" ".join(current))
            current = []
    if current and blocks:
        blocks[-1] = blocks[-1] + " " + " ".join(current)
    elif current:
        blocks.append(" ".join(current))
    return [Item(f"{doc_id}#b{k}", b, 0.0) for k, b in enumerate(blocks)]


def scored_positions(n_tokens: int, protocol: ProtocolConfig, u: float, first: int = 0) -> list[int]:
    """Positions scored in a causal input of ``n_tokens`` tokens (each needs a next token, except under the
    paper protocol with ``position_draw="all"``).

    ``first`` skips leading special tokens that are not text (none for causal models by default).
    For the paper protocol the input is later cut after the returned position.
    """
    last = n_tokens if protocol.name == "paper" and protocol.position_draw == "all" else n_tokens - 1
    candidates = list(range(first, last))
    if not candidates:
        return []
    if protocol.name == "paper":
        return [candidates[min(int(u * len(candidates)), len(candidates) - 1)]]
    end = min(n_tokens, protocol.chunk_len) - 1  # the last position with a next token inside the chunk
    stride = protocol.stride or protocol.chunk_len
    start = max(first, protocol.chunk_len - 1 - stride)
    return list(range(start, end))
