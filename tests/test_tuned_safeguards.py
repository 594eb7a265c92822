"""Tuned-lens training never ends worse than its start, its warm step ignores the scale of the hidden states,
and its checkpoints are one consistent unit."""

import json

import pytest
import torch

import tiny
import jtc_lens.harness.tuned_training as tt
from jtc_lens.harness.models import build_lens_model
from jtc_lens.harness.tuned_training import CHECKPOINT_FILE, TunedRecipe, TunedTrainer

# reads the bundled corpora (training streams and evaluation items)
pytestmark = pytest.mark.realdata

SMALL = dict(chunk_len=32, tokens_per_step=64, warm_fit_tokens=256, seed=3, warm_start="stream")


def _scaled_qwen2(scale: float):
    """A tiny Qwen2 whose hidden states are all multiplied by ``scale`` and whose output is unchanged.

    The embedding and every block's output projections are scaled, so h_l -> scale * h_l at every layer; the
    RMS norms (epsilon set to zero) undo the scale before each block and before the unembedding."""
    model, tok = tiny.build("qwen2", seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(scale)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 0.0
    return build_lens_model(model, tok)


def test_the_scaled_model_is_the_same_model_with_larger_states():
    small, large = _scaled_qwen2(1.0), _scaled_qwen2(1000.0)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    rows, cols = torch.zeros(6, dtype=torch.long), torch.arange(6)
    h_small = small.capture(ids, torch.ones_like(ids), rows, cols)
    h_large = large.capture(ids, torch.ones_like(ids), rows, cols)
    torch.testing.assert_close(h_large, 1000 * h_small, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(large.readout(h_large[-1]), small.readout(h_small[-1]), rtol=1e-4, atol=1e-4)


def test_warm_training_is_invariant_to_the_scale_of_the_hidden_states():
    recipe = TunedRecipe("warm", token_budget=256 + 64 * 6, lr=1.0, weight_decay=0.0, **SMALL)
    _, small = TunedTrainer(_scaled_qwen2(1.0), recipe, "news").train(progress=False)
    _, large = TunedTrainer(_scaled_qwen2(1000.0), recipe, "news").train(progress=False)
    # the same loss trajectory, step by step, on the training chunks and on the held-out slice
    assert small["loss_curve"] == pytest.approx(large["loss_curve"], rel=1e-3)
    assert [v for _, v in small["heldout_curve"]] == pytest.approx([v for _, v in large["heldout_curve"]], rel=1e-3)
    assert small["heldout_end"] == pytest.approx(large["heldout_end"], rel=1e-3)
    # and the lens never ends worse than it started, at any layer
    for info in (small, large):
        assert all(end <= start for end, start in zip(info["heldout_end"], info["heldout_start"]))
        assert len(info["heldout_curve"]) == 7 and info["heldout_tokens"] == 4 * 32


def test_keep_best_returns_the_start_when_every_step_makes_things_worse():
    lens = _scaled_qwen2(1000.0)
    common = dict(token_budget=256 + 64 * 3, weight_decay=0.0, **SMALL)
    start, info0 = TunedTrainer(lens, TunedRecipe("warm", lr=0.0, **common), "news").train(progress=False)
    wild, info = TunedTrainer(lens, TunedRecipe("warm", lr=1e6, **common), "news").train(progress=False)
    assert info0["steps_kept"] == [0, 0, 0]  # lr 0: no step is strictly better than the start
    # every measurement after a step is worse than the start, at every layer ...
    assert all(v > info["heldout_curve"][0][1] for _, v in info["heldout_curve"][1:])
    # ... so the start is what comes back, exactly
    assert info["steps_kept"] == [0, 0, 0] and info["heldout_end"] == info["heldout_start"]
    assert info["step_scale"] == [0.125, 0.125, 0.125]  # each layer backtracked after each of the 3 steps
    torch.testing.assert_close(wild.weight, start.weight, rtol=0, atol=0)
    torch.testing.assert_close(wild.bias, start.bias, rtol=0, atol=0)


def test_the_published_recipe_returns_its_last_state_and_records_the_best():
    lens = build_lens_model(*tiny.build("llama"))
    recipe = TunedRecipe("tuned-lens", token_budget=64 * 4, lr=1e4, **SMALL)
    assert recipe.keep_best is False and recipe.lr == 1e4
    _, info = TunedTrainer(lens, recipe, "news").train(progress=False)
    assert info["steps_kept"] == [4, 4, 4]  # as published: the last state
    assert sum(info["heldout_end"]) / 3 == pytest.approx(info["heldout_curve"][-1][1], abs=1e-5)
    assert len(info["heldout_best"]) == 3 and len(info["steps_best"]) == 3
    assert all(b <= e for b, e in zip(info["heldout_best"], info["heldout_end"]))


def test_the_heldout_chunks_are_never_trained_on():
    lens = build_lens_model(*tiny.build("llama"))
    recipe = TunedRecipe("warm", token_budget=256 + 64 * 2, heldout_chunks=3, **SMALL)
    trainer = TunedTrainer(lens, recipe, "news")
    seen = []
    real = trainer._states

    def spy(batch):
        seen.append(batch.clone())
        return real(batch)

    trainer._states = spy
    trainer.train(progress=False)
    chunks = tt.token_chunks(lens.tokenizer, "news", 32, 3)
    heldout = torch.stack([next(chunks) for _ in range(3)])
    assert torch.equal(seen[0], heldout)  # captured once, first
    later = torch.cat(seen[1:])
    assert not any(torch.equal(row, h) for row in later for h in heldout)


def _kill_after_write(monkeypatch, n: int):
    """The process dies right after the n-th checkpoint file write completes."""
    real = tt.atomic_write_bytes
    calls = {"n": 0}

    def write_then_die(path, data):
        real(path, data)
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt(f"killed after writing {path}")

    monkeypatch.setattr(tt, "atomic_write_bytes", write_then_die)
    return real


def test_a_kill_between_checkpoint_writes_resumes_exactly(tmp_path, monkeypatch):
    """The kill comes right after the first file of step 3's checkpoint is written: before, the tensors of
    step 3 were on disk beside the state file of step 2, and the resumed run applied step 3 twice."""
    lens = build_lens_model(*tiny.build("llama"))
    recipe = TunedRecipe("warm", token_budget=256 + 64 * 6, lr=3.0, heldout_every=2, **SMALL)
    full, info_full = TunedTrainer(lens, recipe, "news").train(progress=False)

    real = _kill_after_write(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        TunedTrainer(lens, recipe, "news", checkpoint=tmp_path / "ckpt").train(progress=False)
    monkeypatch.setattr(tt, "atomic_write_bytes", real)
    resumed, info = TunedTrainer(lens, recipe, "news", checkpoint=tmp_path / "ckpt").train(progress=False)

    assert info["steps"] == 6 and info["loss_curve"] == info_full["loss_curve"]
    for key in ("heldout_start", "heldout_end", "steps_kept", "heldout_curve"):
        assert info[key] == info_full[key], key
    torch.testing.assert_close(resumed.weight, full.weight, rtol=0, atol=0)
    torch.testing.assert_close(resumed.bias, full.bias, rtol=0, atol=0)


def test_the_checkpoint_is_one_file_carrying_its_state(tmp_path, monkeypatch):
    lens = build_lens_model(*tiny.build("llama"))
    recipe = TunedRecipe("warm", token_budget=256 + 64 * 4, **SMALL)
    _kill_after_write(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        TunedTrainer(lens, recipe, "news", checkpoint=tmp_path / "ckpt").train(progress=False)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [CHECKPOINT_FILE]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / CHECKPOINT_FILE), framework="pt") as fh:
        state = json.loads(fh.metadata()["state"])
        assert {"W", "b", "best_W", "best_b"} <= set(fh.keys())
    assert state["step"] == 2 and len(state["heldout"]["curve"]) == 3


@pytest.mark.parametrize("damage", ["truncated", "old two-file format"])
def test_an_unusable_checkpoint_is_refused_and_training_restarts_cleanly(tmp_path, damage):
    lens = build_lens_model(*tiny.build("llama"))
    recipe = TunedRecipe("warm", token_budget=256 + 64 * 3, **SMALL)
    full, info_full = TunedTrainer(lens, recipe, "news").train(progress=False)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    if damage == "truncated":
        (ckpt / CHECKPOINT_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"W\": ")
    else:  # a state file claiming step 2 beside tensors of unknown step
        (ckpt / "state.json").write_text(json.dumps({"step": 2, "recipe": recipe.as_dict(), "fit_on": "news"}))
        (ckpt / "state.safetensors").write_bytes(b"")
    again, info = TunedTrainer(lens, recipe, "news", checkpoint=ckpt).train(progress=False)
    assert info["loss_curve"] == info_full["loss_curve"] and info["steps"] == 3
    torch.testing.assert_close(again.weight, full.weight, rtol=0, atol=0)


def test_a_held_out_gain_within_the_noise_is_not_kept():
    lens = _scaled_qwen2(1.0)
    common = dict(token_budget=256 + 64 * 3, weight_decay=0.0, lr=1e-4, **SMALL)
    start, _ = TunedTrainer(lens, TunedRecipe("warm", lr=0.0, **{k: v for k, v in common.items() if k != "lr"}),
                            "news").train(progress=False)
    # a step this small changes the held-out loss by far less than its standard error over positions
    _, eager = TunedTrainer(lens, TunedRecipe("warm", accept_z=0.0, **common), "news").train(progress=False)
    kept, gated = TunedTrainer(lens, TunedRecipe("warm", **common), "news").train(progress=False)
    assert any(s > 0 for s in eager["steps_kept"])  # without the margin, some tiny gain is taken
    assert gated["steps_kept"] == [0, 0, 0] and "2.0 standard errors" in gated["kept_if"]
    torch.testing.assert_close(kept.weight, start.weight, rtol=0, atol=0)
