"""Distributions the user names: a local text/JSONL file (``file:PATH``) or a Hugging Face dataset (``hf:NAME[:CONFIG]``).

- ``.jsonl``: one document per line, its ``text`` field (``id`` used when present);
- any other file: plain UTF-8 text, documents separated by blank lines.
- ``hf:``: every split of the dataset, its ``text`` column (needs the dataset in the local Hugging Face cache
  on machines without hub access).
The hash recorded is the file's sha256, or for a dataset the sha256 of its texts in order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..store import sha256_file, sha256_json
from .base import Corpus, Document, MissingSourceError

PREFIXES = ("file:", "hf:")


def is_external(name: str) -> bool:
    return name.startswith(PREFIXES)


def _read_text(path: Path) -> str:
    try:
        text = path.read_text("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); a file: distribution must be a "
                         ".txt or .jsonl file in UTF-8") from None
    if "\x00" in text:
        raise ValueError(f"{path} holds NUL bytes (at character {text.index(chr(0))}): a binary file, not text")
    return text


def load_file(path_text: str) -> Corpus:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise MissingSourceError(f"file:{path_text}: no such file")
    content = _read_text(path)
    docs = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(content.splitlines()):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}, line {n + 1}: expected a JSON object with a 'text' field ({exc})") from None
            if not isinstance(text, str):
                # str(None) would become the document "None": a null or non-text field is refused, not guessed at
                raise ValueError(f"{path}, line {n + 1}: 'text' is {json.dumps(text)[:40]}, not a string")
            docs.append(Document(doc_id=f"file:{record.get('id', n)}", text=text.strip()))
    else:
        blocks = re.split(r"\n\s*\n", content)
        docs = [Document(doc_id=f"file:{k}", text=b.strip()) for k, b in enumerate(blocks) if b.strip()]
    if not docs:
        raise ValueError(f"{path} holds no documents")
    if len({d.doc_id for d in docs}) != len(docs):
        raise ValueError(f"{path}: document ids are not unique")
    return Corpus(name=f"file:{path_text}", documents=docs, source_hashes={str(path): sha256_file(path)},
                  description=f"local file {path.name}", license="as declared by its owner")


def load_hf(spec: str, load_dataset=None) -> Corpus:
    """``spec`` is NAME or NAME:CONFIG. ``load_dataset`` is injectable (tests, custom loaders)."""
    name, _, config = spec.partition(":")
    if load_dataset is None:
        try:
            from datasets import load_dataset
        except ImportError as exc:  # pragma: no cover
            raise MissingSourceError("hf: distributions need the datasets package: pip install datasets") from exc
    dataset = load_dataset(name, config or None)
    docs = []
    for split in sorted(dataset):
        column = dataset[split]
        if "text" not in column.column_names:
            raise ValueError(f"hf:{spec} split {split!r} has no 'text' column (columns: {column.column_names})")
        docs += [Document(doc_id=f"hf:{split}:{k}", text=t.strip()) for k, t in enumerate(column["text"]) if t and t.strip()]
    if not docs:
        raise ValueError(f"hf:{spec} holds no non-empty texts")
    return Corpus(name=f"hf:{spec}", documents=docs, source_hashes={f"hf:{spec}": sha256_json([d.text for d in docs])},
                  description=f"Hugging Face dataset {spec}", license="see the dataset card")


def load(name: str) -> Corpus:
    if name.startswith("file:"):
        return load_file(name[len("file:"):])
    return load_hf(name[len("hf:"):])
