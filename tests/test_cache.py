import json
import logging

import pytest
import torch

import tiny
from harness import store
from harness.fitting import FitSpec, get_least_squares
from harness.models import build_lens_model
from harness.projectors import cache
from harness.protocols import ProtocolConfig

SPEC = FitSpec("news", ProtocolConfig("paper", seed=5), n_fit=60, pairs="last")


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
    other_data = FitSpec("news", ProtocolConfig("paper", seed=5), n_fit=61, pairs="last")
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
