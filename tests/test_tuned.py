import pytest
import torch
from torch import nn

import tiny
from jtc_lens.harness.engine import Engine, EvalRequest
from jtc_lens.harness.fitting import TunedSpec, get_tuned
from jtc_lens.harness.models import build_lens_model
from jtc_lens.harness.projectors import IdentityProjector
from jtc_lens.harness.projectors.tuned import TunedProjector, export_tuned_lens, import_tuned_lens
from jtc_lens.harness.corpora import get_corpus
from jtc_lens.harness.protocols import ProtocolConfig, build_items
from jtc_lens.harness.tuned_training import TrainingError, TunedRecipe, TunedTrainer

# reads the bundled corpora (training streams and evaluation items)
pytestmark = pytest.mark.realdata

SMALL = dict(chunk_len=32, tokens_per_step=64, warm_fit_tokens=256, seed=3, warm_start="stream")


def _lens(arch="llama", seed=0):
    return build_lens_model(*tiny.build(arch, seed=seed))


def test_zero_initialised_lens_is_the_identity():
    states = torch.randn(4, 7, 32)
    zero = TunedProjector.zeros(3, 32)
    torch.testing.assert_close(zero.project(states, [0, 1, 2], 3), IdentityProjector().project(states, [0, 1, 2], 3))


def test_training_lowers_the_loss():
    lens = _lens()
    recipe = TunedRecipe("tuned-lens", token_budget=64 * 12, lr=1.0, **SMALL)
    _, info = TunedTrainer(lens, recipe, "wikipedia").train(progress=False)
    curve = info["loss_curve"]
    assert len(curve) == 12 and info["tokens_spent"] == 64 * 12
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3


class AffineLast(nn.Module):
    """A last block that is a known affine map of its input; the blocks before it are the model's own."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states @ self.weight.T + self.bias


def test_warm_lens_recovers_a_known_affine_map():
    model, tok = tiny.build("llama", layers=3, d=32)
    gen = torch.Generator().manual_seed(0)
    A = torch.eye(32) + 0.2 * torch.randn(32, 32, generator=gen)
    c = 0.1 * torch.randn(32, generator=gen)
    model.model.layers[2] = AffineLast(A, c)
    lens = build_lens_model(model, tok)
    recipe = TunedRecipe("warm", token_budget=256 + 64 * 3, weight_decay=0.0, **SMALL)
    proj, info = TunedTrainer(lens, recipe, "news").train(progress=False)
    # h_3 = A h_2 + c, so the layer-2 translator must be W = A - I, b = c
    torch.testing.assert_close(proj.weight[2], A - torch.eye(32), atol=2e-3, rtol=0)
    torch.testing.assert_close(proj.bias[2], c, atol=2e-3, rtol=0)
    assert info["loss_curve"][0] < 1e-4  # already exact after the warm start: KL ~ 0 at layer 2 and small elsewhere


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    lens = _lens()
    recipe = TunedRecipe("tuned-lens", token_budget=64 * 6, **SMALL)
    full, info_full = TunedTrainer(lens, recipe, "news").train(progress=False)

    calls = {"n": 0}
    real_step = torch.optim.SGD.step

    def step_then_crash(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("interrupted")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step_then_crash)
    with pytest.raises(KeyboardInterrupt):
        TunedTrainer(lens, recipe, "news", checkpoint=tmp_path / "ckpt").train(progress=False)
    monkeypatch.setattr(torch.optim.SGD, "step", real_step)
    resumed, info = TunedTrainer(lens, recipe, "news", checkpoint=tmp_path / "ckpt").train(progress=False)
    assert info["steps"] == 6 and info["loss_curve"] == info_full["loss_curve"]
    torch.testing.assert_close(resumed.weight, full.weight, rtol=0, atol=0)
    torch.testing.assert_close(resumed.bias, full.bias, rtol=0, atol=0)


def test_nan_stops_with_layer_and_step():
    model, tok = tiny.build("llama")
    lens = build_lens_model(model, tok)
    recipe = TunedRecipe("tuned-lens", token_budget=64 * 3, **SMALL)
    trainer = TunedTrainer(lens, recipe, "news")
    real = trainer._states
    calls = {"n": 0}

    def poisoned(batch):
        calls["n"] += 1
        states = real(batch)
        if calls["n"] > 1:  # the first capture is the held-out slice's
            states[1, 0, 0] = float("nan")  # one NaN in layer 1's input
        return states

    trainer._states = poisoned
    with pytest.raises(TrainingError, match=r"non-finite kl loss .* at layer 1, step 0"):
        trainer.train(progress=False)


def test_nan_in_the_heldout_slice_stops_with_layer():
    model, tok = tiny.build("llama")
    lens = build_lens_model(model, tok)
    trainer = TunedTrainer(lens, TunedRecipe("tuned-lens", token_budget=64 * 3, **SMALL), "news")
    real = trainer._states

    def poisoned(batch):
        states = real(batch)
        states[2] = float("nan")
        return states

    trainer._states = poisoned
    with pytest.raises(TrainingError, match=r"non-finite held-out kl loss \(nan\) at layer 2 after 0 steps"):
        trainer.train(progress=False)


def test_export_import_round_trip(tmp_path):
    lens = _lens()
    gen = torch.Generator().manual_seed(1)
    proj = TunedProjector(torch.randn(3, 32, 32, generator=gen), torch.randn(3, 32, generator=gen))
    export_tuned_lens(proj, tmp_path / "lens", "tiny-llama", lens.unembed.weight)
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == ["config.json", "params.pt"]
    state = torch.load(tmp_path / "lens" / "params.pt", weights_only=True)
    assert sorted(state)[:2] == ["0.bias", "0.weight"] and state["0.weight"].shape == (32, 32)
    back, check = import_tuned_lens(tmp_path / "lens", 3, 32, lens.unembed.weight)
    assert check["identity_check"].startswith("unembed_sha256")
    torch.testing.assert_close(back.weight, proj.weight)
    torch.testing.assert_close(back.bias, proj.bias)
    other = _lens(seed=5)
    with pytest.raises(ValueError, match="another unembedding"):
        import_tuned_lens(tmp_path / "lens", 3, 32, other.unembed.weight)
    with pytest.raises(ValueError, match="d_model=32, 3 layers; the model has d_model=64"):
        import_tuned_lens(tmp_path / "lens", 3, 64)


def test_tuned_projector_through_the_engine_and_cache():
    lens = _lens("qwen2")
    protocol = ProtocolConfig("paper", seed=1)
    spec = TunedSpec("wikipedia", TunedRecipe("warm", token_budget=256 + 64 * 2, **SMALL))
    items = build_items(get_corpus("wikipedia"), "validation", protocol, limit=6)
    responses = Engine(lens, batch_size=4).run([EvalRequest("tuned", "wikipedia", "validation", protocol, it, spec) for it in items])
    config = responses[0]["provenance"]["projector_config"]
    assert config["name"] == "tuned" and config["recipe"]["name"] == "warm" and config["tokens_spent"] == 384
    assert config["cache"] == "miss" and "stopped_early" in config
    _, info = get_tuned(lens, spec)
    assert info["cache"] == "hit"
    from jtc_lens.harness.store import cache_root

    leftover = cache_root() / "tuned-checkpoints"
    assert not leftover.exists() or not any(leftover.iterdir())  # the entry replaced the training checkpoint


def test_a_published_lens_is_evaluated_without_training(tmp_path):
    lens = _lens("gpt2")
    gen = torch.Generator().manual_seed(2)
    proj = TunedProjector(0.01 * torch.randn(3, 32, 32, generator=gen), 0.01 * torch.randn(3, 32, generator=gen))
    export_tuned_lens(proj, tmp_path / "published", "tiny-gpt2", lens.unembed.weight)
    protocol = ProtocolConfig("paper", seed=4)
    spec = TunedSpec("wikipedia", TunedRecipe("tuned-lens", token_budget=64, **SMALL), import_from=str(tmp_path / "published"))
    items = build_items(get_corpus("wikipedia"), "validation", protocol, limit=3)
    responses = Engine(lens).run([EvalRequest("tuned", "wikipedia", "validation", protocol, it, spec) for it in items])
    config = responses[0]["provenance"]["projector_config"]
    assert config["imported_from"] == str(tmp_path / "published") and len(config["params_sha256"]) == 64
    assert config["identity_check"].startswith("unembed_sha256") and config["allow_unverified_lens"] is False
    assert "tokens_spent" not in config


def _kl_per_layer(lens, projector, states):
    """Mean KL(p_final || p_lens) per layer of ``projector`` at ``states`` (L+1, P, d), computed here directly."""
    L = lens.num_layers
    final = torch.log_softmax(lens.readout(states[L]).float(), -1)
    out = []
    for l in range(L):
        lp = torch.log_softmax(lens.readout(projector.project(states, [l], L)[0]).float(), -1)
        out.append(float((final.exp() * (final - lp)).sum(-1).mean()))
    return out


def test_the_warm_start_is_the_runs_affine_projector_and_it_is_kept_where_training_does_not_help(monkeypatch):
    from jtc_lens.harness.encoding import batches, encode_all
    from jtc_lens.harness.fitting import FitSpec, get_least_squares

    lens = _lens("qwen2")
    protocol = ProtocolConfig("paper", seed=1)
    fit = FitSpec("wikipedia", protocol, n_fit=200)
    recipe = TunedRecipe("warm", token_budget=256 + 64 * 3, heldout_positions=40, **{**SMALL, "warm_start": "affine"})
    spec = TunedSpec("wikipedia", recipe, start=fit)
    items = build_items(get_corpus("wikipedia"), "validation", protocol, limit=4)
    engine = Engine(lens, batch_size=4)
    import jtc_lens.harness.engine as engine_module

    fits = []
    real = engine_module.get_least_squares
    monkeypatch.setattr(engine_module, "get_least_squares", lambda *a, **k: fits.append(a[1]) or real(*a, **k))
    responses = engine.run([EvalRequest(p, "wikipedia", "validation", protocol, it, s)
                            for p, s in (("tuned", spec), ("affine", fit)) for it in items])
    assert fits == [fit]  # the affine task and the warm start share one fit
    tuned_config = responses[0]["provenance"]["projector_config"]
    affine_config = responses[-1]["provenance"]["projector_config"]
    start = tuned_config["warm_start"]
    assert start["fit_data_sha256"] == affine_config["fit_data_sha256"] and start["fit"]["n_fit"] == 200
    assert start["heldout_first_item"] == 200 and start["heldout_items"] == 40
    assert start["fit_seconds"] == affine_config["fit_seconds"] > 0  # the cost of a tuned-only run counts its start

    # the held-out items are 40 train items after the 200 fit items, from a few documents; at the start the lens is
    # the affine projector, so the recorded held-out loss at the start is affine's KL there
    from jtc_lens.harness.fitting import from_few_documents, heldout_documents

    corpus = get_corpus("wikipedia")
    n_docs = heldout_documents(len(corpus.split("train", seed=protocol.seed)))
    held = from_few_documents(build_items(corpus, "train", protocol)[200:], 40, n_docs)
    assert start["heldout_documents"] == len({it.item_id.rsplit("#", 1)[0] for it in held}) >= n_docs
    encoded, _ = encode_all(held, lens.tokenizer, protocol, lens.masked)
    (batch,) = list(batches(encoded, 64, 0))
    states = lens.capture(batch.input_ids, batch.attention_mask, batch.rows, batch.cols).float()
    affine = get_least_squares(lens, fit).affine
    assert tuned_config["heldout_start"] == pytest.approx(_kl_per_layer(lens, affine, states), rel=1e-4, abs=1e-6)

    # never worse than the start; a layer that kept its start is the affine map itself
    tuned, info = get_tuned(lens, spec)
    assert info["cache"] == "hit"
    assert all(e <= s for e, s in zip(info["heldout_end"], info["heldout_start"]))
    for l, kept in enumerate(info["steps_kept"]):
        if kept == 0:
            torch.testing.assert_close(tuned.project(states, [l], 3), affine.project(states, [l], 3), rtol=1e-4, atol=1e-4)
    assert _kl_per_layer(lens, tuned, states) == pytest.approx(info["heldout_end"], rel=1e-4, abs=1e-6)


def test_the_stream_leaves_out_the_held_out_documents():
    from jtc_lens.harness.tuned_training import token_chunks

    lens = _lens("qwen2")
    docs = get_corpus("wikipedia").split("train", seed=3)
    keep = {docs[0].doc_id, docs[1].doc_id}
    exclude = frozenset(d.doc_id for d in docs) - keep
    tokens = torch.cat(list(token_chunks(lens.tokenizer, "wikipedia", 16, 3, exclude_docs=exclude))).tolist()
    texts = [d.text for d in docs if d.doc_id in keep]
    lengths = [len(lens.tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]
    assert sum(lengths) - 16 < len(tokens) <= sum(lengths)  # the two documents, cut into whole chunks


def test_held_out_items_come_from_a_few_documents_in_the_order_met():
    from jtc_lens.harness.fitting import from_few_documents, heldout_documents
    from jtc_lens.harness.protocols import Item

    items = [Item(f"d{k % 5}#s{k}", "t", 0.0) for k in range(50)]  # five documents, interleaved
    held = from_few_documents(items, 7, 2)
    # 4 items from d0, then 3 from d1 (up to ceil(7 / 2) each), in the order of the items
    assert [it.item_id for it in held] == ["d0#s0", "d0#s5", "d0#s10", "d0#s15", "d1#s1", "d1#s6", "d1#s11"]
    # a document with too few items: the next one makes up the count
    short = [Item("a#s0", "t", 0.0)] + [Item(f"b#s{k}", "t", 0.0) for k in range(10)] + [Item(f"c#s{k}", "t", 0.0) for k in range(10)]
    assert [it.item_id.split("#")[0] for it in from_few_documents(short, 6, 2)] == ["a", "b", "b", "b", "c", "c"]
    # two documents of ten cannot give 30: a third does
    assert sorted({it.item_id[:2] for it in from_few_documents(items, 30, 2)}) == ["d0", "d1", "d2"]
    assert [heldout_documents(n) for n in (1, 9, 10, 74, 80, 1558)] == [1, 1, 1, 7, 8, 8]


def test_the_held_out_documents_leave_most_of_the_stream():
    """On the bundled Wikipedia (long documents), held-out items drawn like the fit's would span most documents;
    from a few documents they leave most of the split's text for the stream."""
    from jtc_lens.harness.fitting import from_few_documents, heldout_documents

    corpus = get_corpus("wikipedia")
    protocol = ProtocolConfig("paper", seed=1234)
    docs = corpus.split("train", seed=protocol.seed)
    items = build_items(corpus, "train", protocol)
    n_fit = len(items) // 2
    held = from_few_documents(items[n_fit:], 256, heldout_documents(len(docs)))
    left_out = {it.item_id.rsplit("#", 1)[0] for it in held}
    spread = {it.item_id.rsplit("#", 1)[0] for it in items[n_fit:n_fit + 256]}
    kept = sum(len(d.text) for d in docs if d.doc_id not in left_out) / sum(len(d.text) for d in docs)
    assert len(held) == 256 and len(left_out) < len(spread)
    assert kept > 0.5, f"the stream keeps {kept:.0%} of the train text"


def test_warm_start_affine_needs_the_runs_fit():
    recipe = TunedRecipe("warm", token_budget=256 + 64, **{**SMALL, "warm_start": "affine"})
    with pytest.raises(ValueError, match="needs its FitSpec"):
        TunedSpec("wikipedia", recipe)
    with pytest.raises(ValueError, match="warm_start=affine trains from the run's affine projector"):
        TunedTrainer(_lens(), recipe, "wikipedia")
