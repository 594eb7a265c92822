import pytest
import torch
from torch import nn

import tiny
from harness.models import AdapterError, build_lens_model, verify_lens_model


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_adapter_maps_every_architecture(arch):
    model, tok = tiny.build(arch)
    lens = build_lens_model(model, tok)
    assert lens.num_layers == 3 and lens.d_model == 32
    assert lens.masked == (arch == "bert")
    # hooks and readout reproduce the model's own hidden states and logits
    assert set(lens.checks) == {"embedding", "block1", "block2", "final_norm", "logits"}
    assert max(lens.checks.values()) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_readout_of_last_state_gives_model_logits(arch):
    model, tok = tiny.build(arch)
    lens = build_lens_model(model, tok)
    ids = tok("the model reads hidden states", return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    states = lens.capture(ids, torch.ones_like(ids), torch.zeros(n, dtype=torch.long), torch.arange(n))
    assert states.shape == (4, n, 32)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
        torch.testing.assert_close(lens.readout(states[-1]), logits, rtol=1e-5, atol=1e-5)


def test_fingerprint_tracks_weights_not_instances():
    a = build_lens_model(*tiny.build("llama", seed=0)).fingerprint()
    b = build_lens_model(*tiny.build("llama", seed=0)).fingerprint()
    c = build_lens_model(*tiny.build("llama", seed=1)).fingerprint()
    assert a["id"] == b["id"]
    assert a["unembed_sha256"] != c["unembed_sha256"] and a["id"] != c["id"]


def test_missing_final_norm_is_named():
    model, tok = tiny.build("llama")
    model.model.norm = nn.Identity()
    with pytest.raises(AdapterError, match="no final norm"):
        build_lens_model(model, tok)


def test_missing_block_list_is_named():
    model, tok = tiny.build("gpt2")
    model.transformer.h = nn.Sequential(*model.transformer.h)
    with pytest.raises(AdapterError, match="no nn.ModuleList of 3 transformer blocks"):
        build_lens_model(model, tok)


def test_wrong_mapping_fails_verification():
    model, tok = tiny.build("qwen2")
    lens = build_lens_model(model, tok)
    lens.final_norm = nn.Identity()  # as if the wrong module had been found
    with pytest.raises(AdapterError, match="final_norm"):
        verify_lens_model(lens)
