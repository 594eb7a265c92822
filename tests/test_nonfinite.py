"""A model that produces inf/NaN on some items: a clear error by default, or those items dropped and listed."""

import math
import re
from contextlib import contextmanager

import pytest
import torch

import tiny
from fixture_corpus import fixture_distribution
from jtc_lens.harness.corpora import get_corpus
from jtc_lens.harness.encoding import batches, encode
from jtc_lens.harness.engine import METRICS, Engine, EvalRequest
from jtc_lens.harness.fitting import FitSpec, accumulate, get_least_squares
from jtc_lens.harness.models import AdapterError, build_lens_model
from jtc_lens.harness.nonfinite import NonFiniteError
from jtc_lens.harness.projectors import GramAccumulator, IdentityProjector, fit_least_squares
from jtc_lens.harness.projectors.least_squares import FitError
from jtc_lens.harness.protocols import ProtocolConfig, build_items

PROTOCOL = ProtocolConfig("paper", seed=3)
DIST = fixture_distribution()  # the synthetic corpus: the data is incidental here
BLOCK = 1  # the block whose output is poisoned: hidden state h_2


@contextmanager
def poisoned(lens, token: int | None):
    """Block BLOCK's output set to inf at the first occurrence of ``token`` in every row holding it
    (every row and position when ``token`` is None)."""
    seen = {}

    def remember(_module, args, kwargs):
        seen["ids"] = kwargs["input_ids"] if "input_ids" in kwargs else args[0]

    def poison(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if token is None:
            hidden.fill_(float("inf"))
            return output
        for row, ids in enumerate(seen["ids"].tolist()):
            if token in ids:
                hidden[row, ids.index(token)] = float("inf")
        return output

    handles = [lens.model.base_model.register_forward_pre_hook(remember, with_kwargs=True),
               lens.blocks[BLOCK].register_forward_hook(poison)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _setup(n_items=12):
    lens = build_lens_model(*tiny.build("llama"))
    items = build_items(get_corpus(DIST), "validation", PROTOCOL, limit=n_items)
    inputs = {it.item_id: encode(it, lens.tokenizer, PROTOCOL, False) for it in items}
    counts = {}
    for e in inputs.values():
        for t in set(e.input_ids):
            counts[t] = counts.get(t, 0) + 1
    # a token in a few items' inputs, not most of them
    token = min((t for t, c in counts.items() if 2 <= c <= 4), key=lambda t: (counts[t], t))
    bad = sorted(k for k, e in inputs.items() if token in e.input_ids)
    return lens, items, inputs, token, bad


def _first_bad_state(e, token) -> int:
    # the poisoned position itself shows at h_2; a later scored position sees it through attention at h_3
    return BLOCK + 1 if e.input_ids.index(token) == e.positions[0] else BLOCK + 2


def test_non_finite_hidden_states_stop_the_evaluation_naming_model_items_and_layer():
    lens, items, inputs, token, bad = _setup()
    requests = [EvalRequest("id", DIST, "validation", PROTOCOL, it) for it in items]
    with poisoned(lens, token), pytest.raises(NonFiniteError) as info:
        Engine(lens, batch_size=4).run(requests)
    text = str(info.value)
    assert lens.name in text and f"on {len(bad)} item(s) of {DIST}/validation" in text
    for item_id in bad:
        layer = _first_bad_state(inputs[item_id], token)
        assert f"{item_id} (from hidden state {layer}, 1 position(s))" in text
    assert "on_nonfinite=drop" in text


def test_dropped_items_are_listed_and_do_not_reach_other_items():
    lens, items, inputs, token, bad = _setup()
    requests = [EvalRequest("id", DIST, "validation", PROTOCOL, it) for it in items]
    with poisoned(lens, token):
        responses = Engine(lens, batch_size=4, on_nonfinite="drop").run(requests)
    good = [it for it in items if it.item_id not in bad]
    # the same good items scored without any bad one in their batches or their set
    clean = Engine(lens, batch_size=3).run([EvalRequest("id", DIST, "validation", PROTOCOL, it) for it in good])
    clean = {it.item_id: v for it, v in zip(good, clean)}
    for req, resp in zip(requests, responses):
        prov = resp["provenance"]
        assert prov["items_skipped"]["nonfinite"] == bad and prov["items"] == len(good)
        if req.item.item_id in bad:
            assert resp["skipped"].startswith("non-finite values from hidden state")
            assert not any(k.split(".")[0] in METRICS for k in resp)
            continue
        for key, value in clean[req.item.item_id].items():
            if key.split(".")[0] in METRICS:
                assert math.isfinite(resp[key]) and math.isclose(resp[key], value, rel_tol=1e-5, abs_tol=1e-6), key


def test_non_finite_fit_data_stop_the_fit_or_are_dropped_and_counted():
    lens = build_lens_model(*tiny.build("llama"))
    dense = ProtocolConfig("dense", seed=0, chunk_len=16)  # 15 positions an item: a well-determined fit
    spec = FitSpec(DIST, dense, n_fit=40)
    items = build_items(get_corpus(DIST), "train", dense, limit=40)
    encoded = [encode(it, lens.tokenizer, dense, False) for it in items]
    counts = {}
    for e in encoded:
        for t in set(e.input_ids):
            counts[t] = counts.get(t, 0) + 1
    token = min((t for t, c in counts.items() if 2 <= c <= 6), key=lambda t: (counts[t], t))
    bad = sorted(e.item_id for e in encoded if token in e.input_ids)
    with poisoned(lens, token):
        with pytest.raises(NonFiniteError, match=r"on %d item\(s\) of %s/train \(fit data\)" % (len(bad), re.escape(DIST))):
            get_least_squares(lens, spec, batch_size=4)
        fitted = get_least_squares(lens, spec, batch_size=4, on_nonfinite="drop")
    assert fitted.info["fit_items_skipped"]["nonfinite"] == bad
    assert fitted.info["fit_items"] == 40 - len(bad)
    # the same as a fit on the good items alone
    acc, none_bad = accumulate(lens, [e for e in encoded if e.item_id not in bad], "last", batch_size=4, desc="fit")
    assert none_bad == {} and acc.n == fitted.info["fit_positions"]
    reference = fit_least_squares(acc, intercept=False)
    for (l, m), (M, _) in reference.items():
        torch.testing.assert_close(fitted.mat.solutions[(l, m)][0].double(), M, rtol=1e-4, atol=1e-5)


def test_a_non_finite_gram_is_a_clear_error_not_a_lapack_assertion():
    acc = GramAccumulator(3, 4, "last")
    states = torch.randn(3, 20, 4, dtype=torch.float64)
    states[1, 5, 2] = float("inf")
    acc.update(states)
    with pytest.raises(FitError, match=r"mat from layer 1: .*non-finite"):  # layer 1 holds the inf
        fit_least_squares(acc, intercept=False)


def test_the_load_check_blames_the_model_not_the_mapping():
    model, tok = tiny.build("gpt2")
    lens = build_lens_model(model, tok)
    with poisoned(lens, None), pytest.raises(AdapterError, match="the model's own forward pass produces non-finite values"):
        build_lens_model(model, tok)


class _Overflowing(IdentityProjector):
    """An identity lens that overflows at layer 1 (a broken projector, not a broken model)."""

    def project(self, states, sources, target):
        out = super().project(states, sources, target).clone()
        out[1] = float("inf")
        return out


def test_a_projector_that_turns_finite_states_non_finite_stops_the_run_even_when_dropping():
    lens = build_lens_model(*tiny.build("qwen2"))
    items = build_items(get_corpus(DIST), "validation", PROTOCOL, limit=4)
    engine = Engine(lens, on_nonfinite="drop")
    with pytest.raises(NonFiniteError, match=r"projector output is non-finite on 4 item\(s\).*\(broken, layer 1\)"):
        engine.evaluate_set((DIST, "validation", PROTOCOL), items, {("broken", None): _Overflowing()})


def test_padding_does_not_carry_a_bad_value_to_other_rows():
    # a batch holding a poisoned row: every other row's hidden states are those of a batch without it
    lens, items, inputs, token, bad = _setup()
    encoded = list(inputs.values())
    pad = lens.tokenizer.pad_token_id
    with poisoned(lens, token):
        for batch in batches(encoded, 12, pad):
            states = lens.capture(batch.input_ids, batch.attention_mask, batch.rows, batch.cols)
    ids = [batch.encoded[o].item_id for o in batch.owner.tolist()]
    good = torch.tensor([i not in bad for i in ids])
    assert not torch.isfinite(states[:, ~good]).all() and torch.isfinite(states[:, good]).all()
    alone = [e for e in encoded if e.item_id not in bad]
    (clean,) = [lens.capture(b.input_ids, b.attention_mask, b.rows, b.cols) for b in batches(alone, 12, pad)]
    order = [ids.index(e.item_id) for e in sorted(alone, key=lambda e: len(e.input_ids))]
    torch.testing.assert_close(states[:, order], clean, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_lm_eval_stops_on_a_non_finite_model_or_drops_its_items_when_told(tmp_path):
    import glob
    import json
    import os
    import subprocess
    from pathlib import Path

    from installed import lm_eval_launch

    launch = lm_eval_launch(dict(os.environ))
    if launch is None:
        pytest.skip("neither an installed jtc-lens wheel nor this checkout's task folder is available to lm_eval")
    prefix, env = launch
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JTC_CACHE=str(tmp_path / "cache"), TQDM_DISABLE="1")
    model, tok = tiny.build("qwen2", layers=2)  # untied embeddings: the readout stays finite
    protocol = ProtocolConfig("paper", seed=1234)
    items = build_items(get_corpus(DIST), "validation", protocol, limit=12)
    encoded = {it.item_id: encode(it, tok, protocol, False) for it in items}
    inputs = {k: e.input_ids for k, e in encoded.items()}
    check = set(tok("The quick brown fox jumps over the lazy dog because it was late.")["input_ids"])
    counts = {t: sum(t in ids for ids in inputs.values()) for t in set().union(*map(set, inputs.values())) - check}
    token = min((t for t, c in counts.items() if 2 <= c <= 4), key=lambda t: (counts[t], t))
    bad = sorted(k for k, ids in inputs.items() if token in ids)
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("inf")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")

    def run(options: dict):
        cmd = prefix + ["--model", "hf", "--model_args", f"pretrained={tmp_path / 'model'}", "--tasks", "custom_jtc_id",
                        "--output_path", str(tmp_path / "out"), "--log_samples", "--metadata", json.dumps({"corpus": DIST, "n_eval": 12, **options})]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)

    stopped = run({})
    assert stopped.returncode != 0 and "NonFiniteError" in stopped.stderr
    assert f"on {len(bad)} item(s) of {DIST}/validation" in stopped.stderr
    for item_id in bad:  # the embedding is inf at the token; later positions see it through attention in h_1
        e = encoded[item_id]
        assert f"{item_id} (from hidden state {0 if e.input_ids[e.positions[0]] == token else 1}" in stopped.stderr
    dropped = run({"on_nonfinite": "drop"})
    assert dropped.returncode == 0, dropped.stderr[-4000:]
    (results_file,) = glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))
    results = json.loads(Path(results_file).read_text())
    prov = results["configs"]["custom_jtc_id"]["metadata"]["provenance"]
    assert prov["items_skipped"]["nonfinite"] == bad and prov["on_nonfinite"] == "drop"
    assert results["n-samples"]["custom_jtc_id"] == {"original": 12, "effective": 12 - len(bad)}
    assert all(math.isfinite(v) for k, v in results["results"]["custom_jtc_id"].items() if isinstance(v, float))
