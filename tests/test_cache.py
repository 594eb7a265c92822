import json
import logging

import pytest
import torch

import tiny
from fixture_corpus import fixture_distribution
from jtc_lens.harness import store
from jtc_lens.harness.fitting import FitSpec, get_least_squares
from jtc_lens.harness.models import build_lens_model
from jtc_lens.harness.projectors import cache
from jtc_lens.harness.protocols import ProtocolConfig

SPEC = FitSpec(fixture_distribution(), ProtocolConfig("paper", seed=5), n_fit=60, pairs="last")


@pytest.fixture()
def lens(tmp_path, monkeypatch):
    monkeypatch.setenv("JTC_CACHE", str(tmp_path / "cache"))
    return build_lens_model(*tiny.build("qwen2"))


def _entry_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache" / "projectors").iterdir())


def test_hit_returns_the_same_projectors(lens, tmp_path):
    first = get_least_squares(lens, SPEC, batch_size=8)
    second = get_least_squares(lens, SPEC, batch_size=8)
    assert first.info["cache"] == "miss" and second.info["cache"] == "hit"
    assert second.info["fit_data_sha256"] == first.info["fit_data_sha256"]
    for key, (M, b) in first.mat.solutions.items():
        torch.testing.assert_close(second.mat.solutions[key][0], M.float())
    for key, (M, b) in first.affine.solutions.items():
        torch.testing.assert_close(second.affine.solutions[key][1], b.float())
    assert len(_entry_files(tmp_path)) == 2  # one safetensors + one JSON, no temporary leftovers


def test_mismatched_inputs_are_refitted(lens, tmp_path):
    get_least_squares(lens, SPEC, batch_size=8)
    other_data = FitSpec(fixture_distribution(), ProtocolConfig("paper", seed=5), n_fit=61, pairs="last")
    assert get_least_squares(lens, other_data, batch_size=8).info["cache"] == "miss"
    other_model = build_lens_model(*tiny.build("qwen2", seed=9))
    assert get_least_squares(other_model, SPEC, batch_size=8).info["cache"] == "miss"
    # an entry whose recorded key disagrees with its file name is not trusted either
    tensor_path, meta_path = cache.entry_paths(_key(lens))
    meta = json.loads(meta_path.read_text())
    meta["key"]["n_fit"] = 999
    meta_path.write_text(json.dumps(meta))
    assert get_least_squares(lens, SPEC, batch_size=8).info["cache"] == "miss"


def _key(lens):
    """The key of SPEC's entry, read back from the entry the fit wrote."""
    metas = [json.loads(p.read_text()) for p in (store.cache_root() / "projectors").glob("*.json")]
    return next(m["key"] for m in metas if m["key"]["n_fit"] == 60 and m["key"]["model"]["unembed_sha256"] == lens.fingerprint()["unembed_sha256"])


@pytest.mark.parametrize("damage", ["flip_tensor_bytes", "truncate_tensors", "garbage_json"])
def test_corrupt_entries_are_refitted(lens, damage, caplog):
    get_least_squares(lens, SPEC, batch_size=8)
    tensor_path, meta_path = cache.entry_paths(_key(lens))
    if damage == "flip_tensor_bytes":
        data = bytearray(tensor_path.read_bytes())
        data[-10] ^= 0xFF
        tensor_path.write_bytes(bytes(data))
    elif damage == "truncate_tensors":
        tensor_path.write_bytes(tensor_path.read_bytes()[:100])
    else:
        meta_path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        again = get_least_squares(lens, SPEC, batch_size=8)
    assert again.info["cache"] == "miss"
    assert "refitting" in caplog.text
    assert get_least_squares(lens, SPEC, batch_size=8).info["cache"] == "hit"  # the refit repaired it


def test_interrupted_write_leaves_no_entry(lens, tmp_path, monkeypatch):
    real_replace = store.os.replace
    calls = {"n": 0}

    def crash_on_json(src, dst):
        calls["n"] += 1
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt("interrupted while writing the entry")
        return real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", crash_on_json)
    with pytest.raises(KeyboardInterrupt):
        get_least_squares(lens, SPEC, batch_size=8)
    monkeypatch.setattr(store.os, "replace", real_replace)
    files = _entry_files(tmp_path)
    assert not any(f.endswith(".json") or f.endswith(".tmp") for f in files)  # no complete entry, no partial file
    assert get_least_squares(lens, SPEC, batch_size=8).info["cache"] == "miss"
    assert get_least_squares(lens, SPEC, batch_size=8).info["cache"] == "hit"


def _perturb_blocks(model):
    """A fine-tune that leaves the (tied) embeddings and the final norm as they were."""
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.down_proj.weight.mul_(1.5)


def test_changed_block_weights_are_refitted_not_taken_from_the_cache():
    model, tok = tiny.build("llama")  # tied embeddings: the unembedding does not change with the blocks
    lens = build_lens_model(model, tok)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    base = get_least_squares(lens, SPEC, batch_size=8)
    assert get_least_squares(lens, SPEC, batch_size=8).info["cache"] == "hit"
    _perturb_blocks(model)
    tuned = get_least_squares(lens, SPEC, batch_size=8)
    assert tuned.info["cache"] == "miss"
    key = next(iter(base.mat.solutions))
    assert not torch.allclose(tuned.mat.solutions[key][0].float(), base.mat.solutions[key][0].float(), atol=1e-3)
    # the cache now holds both models' entries, each found again by its own weights
    assert get_least_squares(lens, SPEC, batch_size=8).info["cache"] == "hit"
    model.load_state_dict(original)
    again = get_least_squares(lens, SPEC, batch_size=8)
    assert again.info["cache"] == "hit"
    torch.testing.assert_close(again.mat.solutions[key][0].float(), base.mat.solutions[key][0].float())


def test_changed_block_weights_retrain_the_tuned_lens():
    from jtc_lens.harness.fitting import TunedSpec, get_tuned
    from jtc_lens.harness.tuned_training import TunedRecipe

    model, tok = tiny.build("llama")
    lens = build_lens_model(model, tok)
    # the warm start is the run's affine projector (SPEC), which the changed weights refit too
    spec = TunedSpec(SPEC.fit_on, TunedRecipe("warm", token_budget=256 + 64, chunk_len=32, tokens_per_step=64,
                                              warm_fit_tokens=256, seed=3, heldout_positions=16), start=SPEC)
    base, info = get_tuned(lens, spec)
    assert info["cache"] == "miss" and get_tuned(lens, spec)[1]["cache"] == "hit"
    _perturb_blocks(model)
    other, info = get_tuned(lens, spec)
    assert info["cache"] == "miss"
    assert not torch.allclose(other.tensors()["W"], base.tensors()["W"], atol=1e-4)


def test_unhashable_weights_bypass_the_cache(lens, caplog):
    fingerprint = {**lens.fingerprint(), "weights_sha256": None, "weights_not_hashed": "weight x is on the meta device"}
    first = get_least_squares(lens, SPEC, batch_size=8, fingerprint=fingerprint)
    second = get_least_squares(lens, SPEC, batch_size=8, fingerprint=fingerprint)
    assert first.info["cache"] == second.info["cache"] == "not used: weight x is on the meta device"
    assert not (store.cache_root() / "projectors").exists() or not any((store.cache_root() / "projectors").iterdir())


def test_atomically_written_files_get_the_mode_a_plain_write_would(tmp_path):
    import os
    import stat

    from jtc_lens.harness.store import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "page.html", b"<p>hi</p>")
        (tmp_path / "plain.html").write_bytes(b"<p>hi</p>")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "page.html").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.html").stat().st_mode) == 0o644
