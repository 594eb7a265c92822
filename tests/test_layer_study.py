"""The layer-intervention study (jtc_layers_* tasks): its values against hand-rearranged models, one reference pass
per batch, the model left as it was, the paired tests, and the stock lm_eval run through to the leaderboard."""

import copy

import pytest
import torch

import tiny
from fixture_corpus import fixture_distribution
from jtc_lens.harness import layer_study
from jtc_lens.harness.corpora import get_corpus
from jtc_lens.harness.encoding import batches, encode_all
from jtc_lens.harness.engine import Engine, EvalRequest
from jtc_lens.harness.models import build_lens_model
from jtc_lens.harness.protocols import ProtocolConfig, build_items

PROTOCOL = ProtocolConfig("paper", seed=3)


def _setup(arch="llama", layers=6, n=10):
    model, tok = tiny.build(arch, layers=layers)
    lens = build_lens_model(model, tok)
    dist = fixture_distribution()
    items = build_items(get_corpus(dist), "validation", PROTOCOL, limit=n)
    return model, lens, dist, items


def _rearranged(model, order: list[int]):
    """A copy of ``model`` whose block list is ``order`` of the original blocks, each keeping its own cache index
    and layer type; built by hand, without the intervention code."""
    other = copy.deepcopy(model)
    old = list(other.model.layers)
    other.model.layers = torch.nn.ModuleList([old[j] for j in order])
    other.config.num_hidden_layers = len(order)
    if getattr(other.config, "layer_types", None):
        other.config.layer_types = [model.config.layer_types[j] for j in order]
    return other


def _xent_by_hand(model, lens, items):
    """Per item id, the cross-entropy of ``model``'s prediction of the true next token at the scored position."""
    encoded, _ = encode_all(items, lens.tokenizer, PROTOCOL, False)
    out = {}
    for batch in batches(encoded, 4, 0):
        with torch.no_grad():
            # no cache: a block repeated in the list would write its cache layer twice
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        lp = torch.log_softmax(logits[batch.rows, batch.cols].float(), -1)
        for p, o in enumerate(batch.owner.tolist()):
            out[batch.encoded[o].item_id] = float(-lp[p, batch.targets[p]])
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_values_equal_hand_rearranged_models(arch):
    model, lens, dist, items = _setup(arch)
    responses = Engine(lens, batch_size=4).run(
        [EvalRequest("id", dist, "validation", PROTOCOL, it, analysis="layers") for it in items])
    L = lens.num_layers
    assert layer_study.starts(L, 1) == [1, 2]
    reference = _xent_by_hand(model, lens, items)
    for s in (1, 2):
        span = list(range(s, L - s))
        outside = lambda middle: list(range(s)) + middle + list(range(L - s, L))  # noqa: E731
        for kind, order in (("skip", outside([])), ("reverse", outside(span[::-1])),
                            ("middle_repeat", outside([(s + L - 1 - s) // 2] * len(span)))):
            expected = _xent_by_hand(_rearranged(model, order), lens, items)
            for r, it in zip(responses, items):
                assert r[f"xent.{kind}.S{s}"] == pytest.approx(expected[it.item_id], rel=1e-4, abs=1e-5), (kind, s)
    for r, it in zip(responses, items):
        assert r["xent.none"] == pytest.approx(reference[it.item_id], rel=1e-4, abs=1e-5)
        assert set(r) >= {f"{m}.{k}.S{s}" for m in layer_study.LAYER_METRICS for k in layer_study.KINDS for s in (1, 2)}


def test_one_reference_pass_per_batch_serves_every_intervention_and_the_model_is_unchanged():
    model, lens, dist, items = _setup()
    ids = torch.tensor([[5, 9, 13, 21, 34]])
    before = model(input_ids=ids).logits
    calls = []
    handle = lens.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))  # block 0: once per forward
    try:
        Engine(lens, batch_size=5).run([EvalRequest("id", dist, "validation", PROTOCOL, it, analysis="layers")
                                        for it in items])
    finally:
        handle.remove()
    n_batches = 2  # 10 items, 5 per batch
    assert len(calls) == n_batches * (1 + len(layer_study.KINDS) * 2)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_the_model_is_unchanged_after_an_error_inside_the_study(monkeypatch):
    model, lens, dist, items = _setup()
    ids = torch.tensor([[5, 9, 13, 21, 34]])
    before = model(input_ids=ids).logits
    forwards = [b.forward for b in lens.blocks]

    def boom(*args, **kwargs):
        raise RuntimeError("scoring failed")

    monkeypatch.setattr(layer_study, "_scores", boom)
    with pytest.raises(RuntimeError, match="scoring failed"):
        Engine(lens).run([EvalRequest("id", dist, "validation", PROTOCOL, items[0], analysis="layers")])
    assert [b.forward for b in lens.blocks] == forwards and "forward" not in lens.blocks[2].__dict__
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_summary_scores_and_paired_tests_follow_from_the_items():
    model, lens, dist, items = _setup(n=12)
    responses = Engine(lens, batch_size=6).run(
        [EvalRequest("id", dist, "validation", PROTOCOL, it, analysis="layers") for it in items])
    summary = responses[0]["provenance"]["layers"]["summary"]
    import math

    import numpy as np

    ref = np.array([r["xent.none"] for r in responses])
    skip = np.array([r["xent.skip.S1"] for r in responses])
    log_v = math.log(lens.unembed.weight.shape[0])
    cell = summary["by_kind"]["skip"]["1"]
    assert cell["score"] == pytest.approx((log_v - skip.mean()) / (log_v - ref.mean()))
    assert cell["vs_unmodified"]["diff"] == pytest.approx((skip - ref).mean())
    assert cell["vs_unmodified"]["lo"] <= cell["vs_unmodified"]["diff"] <= cell["vs_unmodified"]["hi"]
    claim = next(c for c in summary["claims"] if c["a"] == "random" and c["b"] == "reverse")
    rnd = np.array([r["xent.random.S2"] for r in responses])
    rev = np.array([r["xent.reverse.S2"] for r in responses])
    assert claim["by_start"]["2"]["diff"] == pytest.approx((rnd - rev).mean())
    assert 0 <= claim["by_start"]["2"]["p"] <= 1


def test_a_model_already_under_jtc_layers_is_refused():
    from jtc_lens.harness.layer_interventions import intervened

    model, lens, dist, items = _setup()
    with intervened(model, "skip:2:3"):
        with pytest.raises(ValueError, match="run them without jtc_layers"):
            Engine(lens).run([EvalRequest("id", dist, "validation", PROTOCOL, items[0], analysis="layers")])


def test_lm_eval_runs_the_layer_tasks_and_the_site_shows_them(tmp_path):
    from pathlib import Path

    from installed import run_lm_eval_on_tiny_model

    metadata = {"corpus": fixture_distribution(), "n_eval": 12, "layers_every": 2}
    proc, results, results_file, out = run_lm_eval_on_tiny_model(tmp_path, "custom_jtc_layers,custom_jtc_id", metadata,
                                                                 layers=8)
    res = results["results"]["custom_jtc_layers"]
    assert {f"p@1.skip.S{s},none" for s in (1, 3)} <= set(res) and "p@1.skip.S2,none" not in res
    prov = results["configs"]["custom_jtc_layers"]["metadata"]["provenance"]["layers"]
    assert prov["starts"] == [1, 3] and prov["summary"]["items"] == 12
    assert prov["programs"]["reverse:3:4"] == [[4], [3]]
    from jtc_lens.harness.report import intervention_table
    from jtc_lens.harness.sweep import summarise

    (line,) = [row for row in summarise(Path(results_file)) if "custom_jtc_layers" in row]
    assert f"skip {res['p@1.skip.S1,none']:.3f}" in line
    table = intervention_table(Path(results_file))
    score = prov["summary"]["by_kind"]["parallel"]["3"]["score"]
    assert f"| parallel | " in table and f"{score:.3f}" in table
    from jtc_lens.leaderboard.build import build_site

    site = build_site([out], tmp_path / "site")
    page = next(p for p in site.pages if p.name.startswith("model-")).read_text()
    assert "Layer interventions" in page and page.count('class="layers-table"') == 1
    assert "looped_parallel" in page and "random − reverse" in page
    tested = next(c for c in prov["summary"]["claims"] if c["a"] == "random")["by_start"]["3"]["items"]
    assert f", {tested} items\">" in page and "built-in method" not in page  # each claim's tooltip: its item count


def test_lens_tasks_of_an_intervened_model_are_another_model_with_its_own_fits(tmp_path):
    from installed import run_lm_eval_on_tiny_model

    metadata = {"corpus": fixture_distribution(), "n_eval": 8, "n_fit": 200}
    _, results, _, out = run_lm_eval_on_tiny_model(tmp_path, "custom_jtc_mat", metadata, layers=6,
                                                   model_args=",jtc_layers=skip:2:3")
    prov = results["configs"]["custom_jtc_mat"]["metadata"]["provenance"]
    assert prov["model"]["layers"]["spec"] == "skip:2:3" and prov["model"]["layers"]["order"] == []
    # with blocks 2 and 3 skipped, the states at 2 and 3 are those at 1 (hooks see the span's input)
    res = results["results"]["custom_jtc_mat"]
    assert res["p@1.L2,none"] == pytest.approx(res["p@1.L1,none"]) == pytest.approx(res["p@1.L3,none"])
    from jtc_lens.leaderboard.build import build_site

    site = build_site([out], tmp_path / "site")
    page = next(p for p in site.pages if p.name.startswith("model-")).read_text()
    assert "[jtc_layers=skip:2:3]" in page
    runs = next(p for p in site.pages if p.name == "runs.html").read_text()
    assert "<b>jtc_layers=skip:2:3</b>" in runs


def test_jtc_layers_in_the_task_options_but_not_on_the_model_is_refused():
    from jtc_lens.harness.lmeval.handler import _check_layers

    model, lens, dist, items = _setup()
    _check_layers({None}, lens)  # nothing asked, nothing running
    with pytest.raises(ValueError, match="jtc_layers=skip:2:3, but the model runs without a layer intervention"):
        _check_layers({"skip:2:3"}, lens)
    from jtc_lens.harness.layer_interventions import intervened

    with intervened(model, "skip:2:3"):
        _check_layers({"skip:2:3", None}, lens)
        with pytest.raises(ValueError, match="runs under jtc_layers=skip:2:3"):
            _check_layers({"reverse:1:2"}, lens)


def test_two_different_items_under_one_id_stop_the_study():
    from jtc_lens.harness.protocols import Item

    model, lens, dist, items = _setup(n=2)
    impostor = Item(items[0].item_id, items[1].text, items[1].u)
    with pytest.raises(ValueError, match=f"two requests name item {items[0].item_id} with different contents"):
        Engine(lens).run([EvalRequest("id", dist, "validation", PROTOCOL, it, analysis="layers")
                          for it in (items[0], impostor)])
