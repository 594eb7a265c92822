import math

import pytest

import tiny
from fixture_corpus import fixture_distribution
from jtc_lens.harness.corpora import get_corpus
from jtc_lens.harness.engine import METRICS, Engine, EvalRequest
from jtc_lens.harness.metrics import LENS_METRICS
from jtc_lens.harness.fitting import FitSpec, get_least_squares
from jtc_lens.harness.models import build_lens_model
from jtc_lens.harness.protocols import ProtocolConfig, build_items

DIST = fixture_distribution()  # the synthetic corpus: the engine is under test, not the data
OTHER = fixture_distribution(seed=1)  # a second one, to fit on for a transfer


def _requests(protocol, n_items=10, n_fit=80, fit_on=DIST, projectors=("id", "mat", "affine")):
    items = build_items(get_corpus(DIST), "validation", protocol, limit=n_items)
    fit = FitSpec(fit_on, protocol, n_fit)
    return [EvalRequest(p, DIST, "validation", protocol, it, None if p == "id" else fit) for p in projectors for it in items]


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_every_architecture_end_to_end(arch):
    lens = build_lens_model(*tiny.build(arch))
    protocol = ProtocolConfig("paper", seed=3)
    requests = _requests(protocol)
    responses = Engine(lens, batch_size=4).run(requests)
    assert len(responses) == len(requests)
    L = lens.num_layers
    for resp in responses:
        for m in METRICS:
            for layer in range(L):
                assert math.isfinite(resp[f"{m}.L{layer}"])
            assert f"{m}.L{L}" not in resp
            if m in LENS_METRICS:
                assert math.isclose(resp[m], sum(resp[f"{m}.L{l}"] for l in range(L)) / L, rel_tol=1e-9, abs_tol=1e-12)
            else:  # r^2: per layer only, no layer mean
                assert m not in resp
        assert resp["n_positions"] == 1
        prov = resp["provenance"]
        assert prov["model"]["unembed_sha256"] and len(prov["corpus_sha256"]) == 64
        assert prov["protocol"] == {"name": "paper", "seed": 3} and prov["seed"] == 3
        assert prov["versions"]["torch"] and prov["items"] == 10
    mat = [r for r, q in zip(responses, requests) if q.projector == "mat"]
    assert mat[0]["provenance"]["projector_config"]["fit_positions"] == 80


def test_one_forward_pass_per_item_serves_all_projectors():
    lens = build_lens_model(*tiny.build("llama"))
    protocol = ProtocolConfig("paper", seed=1)
    requests = _requests(protocol, n_items=12)
    get_least_squares(lens, requests[-1].fit, batch_size=4)  # fitted beforehand: only evaluation is counted
    rows = []
    handle = lens.model.base_model.register_forward_pre_hook(
        lambda mod, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        Engine(lens, batch_size=5).run(requests)
    finally:
        handle.remove()
    assert sum(rows) == 12  # 36 requests, 12 distinct items, each run once
    assert len(rows) == 3


def test_dense_protocol_scores_every_position():
    lens = build_lens_model(*tiny.build("gptneox"))
    protocol = ProtocolConfig("dense", seed=0, chunk_len=16)
    responses = Engine(lens, batch_size=4).run(_requests(protocol, n_items=4, n_fit=10, projectors=("id", "affine")))
    assert all(r["n_positions"] == 15 for r in responses)
    assert all(math.isfinite(r["kl"]) for r in responses)


def test_transfer_fits_on_the_named_distribution():
    lens = build_lens_model(*tiny.build("gpt2"))
    protocol = ProtocolConfig("paper", seed=2)
    requests = _requests(protocol, n_items=5, fit_on=OTHER, projectors=("mat",))
    responses = Engine(lens, batch_size=4).run(requests)
    config = responses[0]["provenance"]["projector_config"]
    assert config["fit_on"] == OTHER and config["fit_corpus_sha256"] == get_corpus(OTHER).source_hash != get_corpus(DIST).source_hash
    assert responses[0]["provenance"]["distribution"] == DIST


def test_bad_requests_are_rejected():
    protocol = ProtocolConfig("paper")
    item = build_items(get_corpus(DIST), "validation", protocol, limit=1)[0]
    with pytest.raises(ValueError, match="unknown projector"):
        EvalRequest("logit", DIST, "validation", protocol, item)
    with pytest.raises(ValueError, match="needs"):
        EvalRequest("mat", DIST, "validation", protocol, item)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "bert"])
def test_sliced_scoring_equals_the_metrics_of_the_whole_readout(arch, monkeypatch):
    import torch

    from jtc_lens.harness import engine as engine_module
    from jtc_lens.harness.metrics import lens_metrics

    lens = build_lens_model(*tiny.build(arch))
    gen = torch.Generator().manual_seed(5)
    L, d = lens.num_layers, lens.d_model
    V = lens.unembed.weight.shape[0]
    projected = torch.randn(L, 7, d, generator=gen) * 3
    final_logits = lens.readout(torch.randn(7, d, generator=gen) * 3).float()
    targets = torch.randint(0, V, (7,), generator=gen)
    # slices of 2 positions and 1 layer at a time; the expected logit comes from (p W) . f on linear readouts
    monkeypatch.setattr(engine_module, "LOGIT_BUDGET", 2 * V)
    monkeypatch.setattr(engine_module, "MIN_LOGIT_ROWS", 1)
    with torch.no_grad():
        sliced = Engine(lens)._score(final_logits, projected, targets)
        whole = lens_metrics(final_logits, lens.readout(projected).float(), targets)
    for name, value in whole.items():
        assert sliced[name].shape == value.shape == (L, 7)
        assert torch.allclose(sliced[name], value, rtol=1e-4, atol=1e-4), name


def test_a_bfloat16_model_is_scored_and_its_dtype_recorded():
    import torch

    model, tok = tiny.build("llama", layers=2)
    lens = build_lens_model(model.to(torch.bfloat16), tok)
    requests = _requests(ProtocolConfig("paper", seed=3), n_items=6, n_fit=60)
    responses = Engine(lens, batch_size=4).run(requests)
    assert all(math.isfinite(r[f"{m}.L0"]) for r in responses for m in METRICS)
    assert responses[0]["provenance"]["dtype"] == "bfloat16"


def test_every_metric_is_also_reported_without_the_items_at_position_0():
    from jtc_lens.harness.encoding import encode
    from jtc_lens.harness.protocols import Item

    lens = build_lens_model(*tiny.build("llama"))
    protocol = ProtocolConfig("paper", seed=3)
    # ten items whose own draw is past position 0, so that only the planted ones are there
    drawn = [it for it in build_items(get_corpus(DIST), "validation", protocol, limit=30)
             if encode(it, lens.tokenizer, protocol, False).positions != [0]][:10]
    assert len(drawn) == 10
    # four items planted at position 0 (u = 0: a one-token input, as without BOS)
    items = [Item(it.item_id, it.text, 0.0 if k % 3 == 0 else it.u) for k, it in enumerate(drawn)]
    at0 = sorted(it.item_id for k, it in enumerate(items) if k % 3 == 0)
    rest = [it for it in items if it.item_id not in at0]
    fit = FitSpec(DIST, protocol, 80)

    def run(chosen):
        requests = [EvalRequest(p, DIST, "validation", protocol, it, None if p == "id" else fit)
                    for p in ("id", "mat") for it in chosen]
        responses = Engine(lens, batch_size=4).run(requests)
        return {p: [r for r, q in zip(responses, requests) if q.projector == p] for p in ("id", "mat")}

    everything, alone = run(items), run(rest)
    L = lens.num_layers
    for projector in ("id", "mat"):
        prov = everything[projector][0]["provenance"]
        assert prov["items_at_position_0"] == 4 and prov["items_at_position_0_ids"] == at0
        assert sorted(q.item_id for q, r in zip(items, everything[projector]) if r["position"] == 0) == at0
        without = prov["without_position_0"]
        assert without["items"] == 6 and set(without["means"]) == set(METRICS)
        for m in METRICS:
            for l in range(L):
                # the same as scoring the other six items on their own (r^2 against their own variance)
                expected = sum(r[f"{m}.L{l}"] for r in alone[projector]) / 6
                assert math.isclose(without["means"][m][l], expected, rel_tol=1e-5, abs_tol=2e-6), (projector, m, l)
        # and the planted items do move the means over every item
        assert any(not math.isclose(sum(r[f"r2.L{l}"] for r in everything[projector]) / 10, without["means"]["r2"][l])
                   for l in range(L))


def test_the_papers_draw_over_every_token_scores_last_tokens_without_cross_entropy():
    from jtc_lens.harness.encoding import encode
    from jtc_lens.harness.protocols import NO_TARGET, Item

    lens = build_lens_model(*tiny.build("gpt2"))
    tok = lens.tokenizer
    every = ProtocolConfig("paper", seed=3, position_draw="all")
    drawn = build_items(get_corpus(DIST), "validation", every, limit=8)
    # three items drawn at their last token (u just below 1), the others as drawn
    items = [Item(it.item_id, it.text, 0.999999 if k < 3 else it.u) for k, it in enumerate(drawn)]
    last = sorted(it.item_id for it in items[:3])
    n = len(tok(items[0].text)["input_ids"])
    assert encode(items[0], tok, every, False).positions == [n - 1] and encode(items[0], tok, every, False).targets == [NO_TARGET]
    assert encode(items[0], tok, ProtocolConfig("paper", seed=3), False).positions == [n - 2]  # the default draw
    with pytest.raises(ValueError, match="paper protocol"):
        ProtocolConfig("dense", position_draw="all")
    fit = FitSpec(DIST, every, 60)
    requests = [EvalRequest(p, DIST, "validation", every, it, None if p == "id" else fit) for p in ("id", "mat") for it in items]
    responses = Engine(lens, batch_size=3).run(requests)
    L = lens.num_layers
    for req, resp in zip(requests, responses):
        prov = resp["provenance"]
        assert prov["position_draw"] == "all" and prov["protocol"]["position_draw"] == "all"
        assert prov["items_without_next_token"] == last and prov["items"] == 8
        # every lens metric but cross-entropy; cross-entropy missing, not 0
        assert all(math.isfinite(resp[f"{m}.L{l}"]) for m in METRICS if m != "xent" for l in range(L))
        if req.item.item_id in last:
            assert not any(k.split(".")[0] == "xent" for k in resp)
        else:
            assert all(math.isfinite(resp[f"xent.L{l}"]) for l in range(L)) and resp["xent"] > 0


def test_provenance_rides_on_the_response():
    """The record of how an item was scored travels with its response (no process-wide registry)."""
    import json
    from types import SimpleNamespace

    from jtc_lens.harness.lmeval.handler import jtc_lens

    model, tok = tiny.build("llama")
    protocol = ProtocolConfig("paper", seed=2)
    items = build_items(get_corpus(DIST), "validation", protocol, limit=4)
    spec = {"projector": "id", "distribution": DIST, "split": "validation",
            "protocol": {"name": "paper", "seed": 2, "chunk_len": 128, "stride": None}, "batch_size": 4}
    requests = [SimpleNamespace(args=(it.text, json.dumps({**spec, "item_id": it.item_id, "u": it.u}))) for it in items]
    responses = jtc_lens(SimpleNamespace(model=model, tokenizer=tok), requests)
    assert len(responses) == 4 and all("provenance" not in r.values for r in responses)
    record = responses[0].provenance
    assert record["distribution"] == DIST and record["items"] == 4 and len(record["record_id"]) == 16
    assert all(r.provenance is record for r in responses)  # one record per set and projector, shared
    assert record["record_id"] in str(responses[1])
