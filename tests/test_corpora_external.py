import json

import datasets
import pytest

from jtc_lens.harness.corpora import MissingSourceError, get_corpus
from jtc_lens.harness.corpora.external import load_file, load_hf
from jtc_lens.harness.protocols import ProtocolConfig, build_items


def test_local_jsonl_file_is_a_distribution(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"id": f"d{k}", "text": f"Document number {k} talks about topic {k}. It has a second sentence here."} for k in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    corpus = get_corpus(f"file:{path}")
    assert len(corpus.documents) == 30 and corpus.documents[0].doc_id == "file:d0"
    assert list(corpus.source_hashes.values())[0] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    items = build_items(corpus, "validation", ProtocolConfig("paper"))
    assert items and all(it.item_id.startswith("file:d") for it in items)


def test_local_text_file_splits_on_blank_lines(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("First document, first line.\nSame document.\n\n\nSecond document.\n\nThird one.\n")
    corpus = load_file(str(path))
    assert [d.text for d in corpus.documents] == ["First document, first line.\nSame document.", "Second document.", "Third one."]


def test_bad_local_files_get_clear_errors(tmp_path):
    with pytest.raises(MissingSourceError, match="no such file"):
        load_file(str(tmp_path / "absent.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object with a 'text' field"):
        load_file(str(bad))


def test_hub_dataset_through_an_injected_loader():
    calls = []

    def fake_load_dataset(name, config):
        calls.append((name, config))
        return datasets.DatasetDict({
            "train": datasets.Dataset.from_dict({"text": ["A first article about news.", "", "A second article."]}),
            "test": datasets.Dataset.from_dict({"text": ["A held-out article."]}),
        })

    corpus = load_hf("cc_news:plain", load_dataset=fake_load_dataset)
    assert calls == [("cc_news", "plain")]
    assert corpus.name == "hf:cc_news:plain"
    assert [d.doc_id for d in corpus.documents] == ["hf:test:0", "hf:train:0", "hf:train:2"]  # the empty text is skipped
    assert len(next(iter(corpus.source_hashes.values()))) == 64


def test_hub_dataset_without_text_column_is_an_error():
    def fake(name, config):
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["x"]})})

    with pytest.raises(ValueError, match="no 'text' column"):
        load_hf("some/dataset", load_dataset=fake)
