"""Items too short to score (fewer than two tokens) are skipped, counted and listed, in the fit and in the evaluation."""

import glob
import json
import math
import os
import subprocess
from pathlib import Path

import pytest

import tiny
from fixture_corpus import fixture_distribution
from jtc_lens.harness.corpora import get_corpus
from jtc_lens.harness.encoding import ItemError, TooShort, encode
from jtc_lens.harness.engine import METRICS, Engine, EvalRequest
from jtc_lens.harness.fitting import FitSpec, get_least_squares
from jtc_lens.harness.models import build_lens_model
from jtc_lens.harness.protocols import ProtocolConfig, build_items
from installed import lm_eval_launch

PROTOCOL = ProtocolConfig("dense", seed=0, chunk_len=16)
SENTENCE = "Document {k} says that the quick brown fox jumps over the lazy dog because it was late."


def _corpus_file(tmp_path: Path, n_docs: int = 40) -> Path:
    """A JSONL corpus in which every fourth document is the single token "The"."""
    path = tmp_path / "mine.jsonl"
    rows = [{"id": f"d{k}", "text": "The" if k % 4 == 0 else SENTENCE.format(k=k) + " " + SENTENCE.format(k=k + 1)}
            for k in range(n_docs)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _too_short(name: str, split: str, tok) -> list[str]:
    items = build_items(get_corpus(name), split, PROTOCOL)
    return sorted(it.item_id for it in items if len(tok(it.text)["input_ids"]) < 2)


def test_a_one_token_item_is_too_short_but_other_item_errors_are_not():
    tok = tiny.tokenizer()
    item = build_items(get_corpus(fixture_distribution()), "validation", PROTOCOL, limit=1)[0]
    short = type(item)(item.item_id, "The", 0.0)
    with pytest.raises(TooShort, match="1 token"):
        encode(short, tok, PROTOCOL, masked=False)
    # a protocol the model cannot be scored under stops the run: it is not an item's fault
    with pytest.raises(ItemError) as info:
        encode(item, tiny.tokenizer(masked=True), PROTOCOL, masked=True)
    assert not isinstance(info.value, TooShort)


def test_short_items_are_skipped_in_the_fit_and_the_evaluation(tmp_path):
    name = f"file:{_corpus_file(tmp_path)}"
    lens = build_lens_model(*tiny.build("llama"))
    short_eval, short_fit = _too_short(name, "validation", lens.tokenizer), _too_short(name, "train", lens.tokenizer)
    assert short_eval and short_fit  # the corpus puts one-token documents in both splits
    items = build_items(get_corpus(name), "validation", PROTOCOL)
    fit = FitSpec(name, PROTOCOL, n_fit=1000)
    requests = [EvalRequest(p, name, "validation", PROTOCOL, it, None if p == "id" else fit) for p in ("id", "mat") for it in items]
    responses = Engine(lens, batch_size=4).run(requests)
    assert len(responses) == len(requests)  # one response per request, scored or not
    for req, resp in zip(requests, responses):
        prov = resp["provenance"]
        assert prov["items_skipped"] == {"too_short": short_eval, "nonfinite": []}
        assert prov["items"] == len(items) - len(short_eval)
        if req.item.item_id in short_eval:
            assert "1 token" in resp["skipped"]
            assert not any(k.split(".")[0] in METRICS for k in resp)  # no value at all, not a zero
        else:
            assert all(math.isfinite(resp[f"p@1.L{l}"]) for l in range(lens.num_layers))
        if req.projector == "mat":
            info = prov["projector_config"]
            assert info["fit_items_skipped"] == {"too_short": short_fit, "nonfinite": []}
            assert info["fit_items"] == len(build_items(get_corpus(name), "train", PROTOCOL)) - len(short_fit)


def test_nothing_left_to_score_is_an_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("\n\n".join(["The"] * 30))
    name = f"file:{path}"
    lens = build_lens_model(*tiny.build("gpt2", layers=2))
    items = build_items(get_corpus(name), "validation", PROTOCOL)
    with pytest.raises(ItemError, match="no item of .* can be scored"):
        Engine(lens).run([EvalRequest("id", name, "validation", PROTOCOL, it) for it in items])
    with pytest.raises(ItemError, match="none of the .* fit item"):
        get_least_squares(lens, FitSpec(name, PROTOCOL, n_fit=100))


@pytest.mark.slow
def test_lm_eval_runs_a_custom_corpus_with_a_one_token_document_to_the_end(tmp_path):
    launch = lm_eval_launch(dict(os.environ))
    if launch is None:
        pytest.skip("neither an installed jtc-lens wheel nor this checkout's task folder is available to lm_eval")
    prefix, env = launch
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JTC_CACHE=str(tmp_path / "cache"), TQDM_DISABLE="1")
    corpus = _corpus_file(tmp_path)
    model, tok = tiny.build("llama", layers=2)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    meta = {"corpus": f"file:{corpus}", "protocol": "dense", "chunk_len": 16, "seed": 0, "n_eval": "all", "n_fit": 1000}
    cmd = prefix + ["--model", "hf", "--model_args", f"pretrained={tmp_path / 'model'}", "--tasks", "custom_jtc_id,custom_jtc_mat",
                    "--output_path", str(out), "--log_samples", "--metadata", json.dumps(meta)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results_file,) = glob.glob(str(out / "*" / "results_*.json"))
    results = json.loads(Path(results_file).read_text())
    short = _too_short(f"file:{corpus}", "validation", tok)
    n_items = len(build_items(get_corpus(f"file:{corpus}"), "validation", PROTOCOL))
    for task in ("custom_jtc_id", "custom_jtc_mat"):
        prov = results["configs"][task]["metadata"]["provenance"]
        assert prov["items_skipped"]["too_short"] == short and prov["items"] == n_items - len(short)
        assert results["n-samples"][task] == {"original": n_items, "effective": n_items - len(short)}
        samples = [json.loads(line) for line in Path(glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))[0]).read_text().splitlines()]
        assert len(samples) == n_items
        skipped = [s for s in samples if s["doc"]["item_id"] in short]
        assert len(skipped) == len(short) and all(s["metrics"] == [] for s in skipped)
        assert "skipped" in str(skipped[0]["resps"])
        # the means are over the scored items only
        scored = [s for s in samples if s["doc"]["item_id"] not in short]
        mean = sum(s["p@1.L0"] for s in scored) / len(scored)
        assert math.isclose(results["results"][task]["p@1.L0,none"], mean, rel_tol=1e-12)


@pytest.mark.slow
def test_lm_eval_with_the_papers_draw_averages_cross_entropy_over_the_items_that_have_it(tmp_path):
    """position_draw=all: an item drawn at its last token has every metric but cross-entropy, which lm-eval then
    averages over the other items only (never over a 0)."""
    launch = lm_eval_launch(dict(os.environ))
    if launch is None:
        pytest.skip("neither an installed jtc-lens wheel nor this checkout's task folder is available to lm_eval")
    prefix, env = launch
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JTC_CACHE=str(tmp_path / "cache"), TQDM_DISABLE="1")
    model, tok = tiny.build("llama", layers=2)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")

    def last_token_items(seed):
        protocol = ProtocolConfig("paper", seed=seed, position_draw="all")
        items = build_items(get_corpus(fixture_distribution()), "validation", protocol, limit=30)
        return sorted(it.item_id for it in items if encode(it, tok, protocol, False).targets == [-1])

    seed = next(s for s in range(1, 200) if last_token_items(s))  # a seed that draws some item at its last token
    last = last_token_items(seed)
    out = tmp_path / "out"
    meta = {"corpus": fixture_distribution(), "position_draw": "all", "seed": seed, "n_eval": 30}
    cmd = prefix + ["--model", "hf", "--model_args", f"pretrained={tmp_path / 'model'}", "--tasks", "custom_jtc_id",
                    "--output_path", str(out), "--log_samples", "--metadata", json.dumps(meta)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results_file,) = glob.glob(str(out / "*" / "results_*.json"))
    results = json.loads(Path(results_file).read_text())
    res = results["results"]["custom_jtc_id"]
    prov = results["configs"]["custom_jtc_id"]["metadata"]["provenance"]
    assert prov["items_without_next_token"] == last and prov["protocol"]["position_draw"] == "all"
    samples = [json.loads(line) for line in Path(glob.glob(str(out / "*" / "samples_custom_jtc_id_*.jsonl"))[0]).read_text().splitlines()]
    assert len(samples) == 30
    with_xent = [s for s in samples if s["doc"]["item_id"] not in last]
    assert all("xent.L0" not in s for s in samples if s["doc"]["item_id"] in last)
    assert math.isclose(res["xent.L0,none"], sum(s["xent.L0"] for s in with_xent) / len(with_xent), rel_tol=1e-12)
    assert math.isclose(res["p@1.L0,none"], sum(s["p@1.L0"] for s in samples) / 30, rel_tol=1e-12)
