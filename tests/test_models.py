import pytest
import torch
from torch import nn

import tiny
from jtc_lens.harness.models import AdapterError, build_lens_model, verify_lens_model, weight_tensors, weights_sha256


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


def _perturb_block_in_place(model):
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)


def _perturb_block_through_data(model):
    # .data writes bypass the tensor's version counter: only reading the bytes notices them
    model.model.layers[0].self_attn.q_proj.weight.data[0, 0] += 1.0


def _replace_block_parameter(model):
    old = model.model.layers[2].mlp.up_proj.weight
    model.model.layers[2].mlp.up_proj.weight = nn.Parameter(old.detach().clone() * -1)


def _perturb_buffer(model):
    rotary = model.model.rotary_emb
    rotary.inv_freq.mul_(1.01)


@pytest.mark.parametrize("change", [_perturb_block_in_place, _perturb_block_through_data, _replace_block_parameter,
                                    _perturb_buffer])
def test_fingerprint_covers_weights_beyond_the_unembedding(change):
    """A fine-tune that leaves the (tied) embeddings alone is another model: its fingerprint must differ."""
    model, tok = tiny.build("llama")  # tied embeddings: the unembedding is the input embedding
    lens = build_lens_model(model, tok)
    before = lens.fingerprint()
    change(model)
    after = lens.fingerprint()  # the same LensModel: nothing remembered from the first call
    assert after["unembed_sha256"] == before["unembed_sha256"] and after["config_sha256"] == before["config_sha256"]
    assert after["weights_sha256"] != before["weights_sha256"] and after["id"] != before["id"]


def test_weights_hash_counts_tied_tensors_once_and_sees_dtype():
    model, tok = tiny.build("llama")
    names = set(weight_tensors(model))
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: one tensor, one name
    assert "model.rotary_emb.inv_freq" in names  # buffers count too
    fp32 = weights_sha256(model)
    assert weights_sha256(tiny.build("llama")[0]) == fp32  # the same weights, another instance
    assert weights_sha256(model.to(torch.bfloat16)) != fp32


def test_weights_on_the_meta_device_are_reported_not_hashed():
    model, tok = tiny.build("llama")
    lens = build_lens_model(model, tok)
    with torch.device("meta"):
        model.model.layers[1].mlp.down_proj.weight = nn.Parameter(torch.empty(32, 64))
    fingerprint = lens.fingerprint()
    assert fingerprint["weights_sha256"] is None
    assert "model.layers.1.mlp.down_proj.weight" in fingerprint["weights_not_hashed"]


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
