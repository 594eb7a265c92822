"""The random-weights control: a bundled model's architecture and tokenizer with seeded random weights."""

import json

import pytest
import torch

import tiny
from jtc_lens.harness import bundled, sweep
from jtc_lens.harness.models import build_lens_model, weights_sha256
from jtc_lens.harness.provenance import MODEL_RECORD, model_record


@pytest.fixture
def fake_base(tmp_path, monkeypatch):
    """``smollm2-135m`` prepared as a tiny Llama (its real GGUF is not needed to test the control)."""
    model, tok = tiny.build("llama", layers=3)
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    real_prepare = bundled.prepare

    def prepare(name, force=False):
        return folder if name == "smollm2-135m" else real_prepare(name, force)

    monkeypatch.setattr(bundled, "prepare", prepare)
    return model, folder


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_names_of_the_control():
    assert bundled.random_control("smollm2-135m:random") == ("smollm2-135m", 0)
    assert bundled.random_control("gemma3-270m:random:7") == ("gemma3-270m", 7)
    assert bundled.random_control("smollm2-135m") is None
    for bad, message in (("smollm2-135m:rnd", "<bundled model>:random"), ("smollm2-135m:random:x", "SEED a whole number"),
                         ("nope:random", "unknown bundled model")):
        with pytest.raises(ValueError, match=message):
            bundled.random_control(bad)
    assert bundled.is_bundled("smollm2-135m:random:3") and not bundled.is_bundled("nope:random")
    assert sweep.model_problem("smollm2-135m:random") is None
    assert "SEED" in sweep.model_problem("smollm2-135m:random:x")


def test_the_control_is_the_architecture_with_seeded_random_weights(fake_base):
    base, _ = fake_base
    first = bundled.prepare_random("smollm2-135m", 3)
    record = model_record(str(first))
    assert record["random_init"] == {"architecture_of": "smollm2-135m", "seed": 3, "init": "AutoModelForCausalLM.from_config"}
    assert record["name"] == "smollm2-135m:random:3" and "random" in record["weights"]
    control = _load(first)
    assert control.config.to_dict()["num_hidden_layers"] == base.config.num_hidden_layers
    assert weights_sha256(control) != weights_sha256(base)
    build_lens_model(control, tiny.build("llama", layers=3)[1])  # the adapter maps it like the trained model
    # the same seed gives the same weights; another seed others
    again = _load(bundled.prepare_random("smollm2-135m", 3, force=True))
    other = _load(bundled.prepare("smollm2-135m:random:4"))
    assert weights_sha256(again) == weights_sha256(control) != weights_sha256(other)
    assert json.loads((first / MODEL_RECORD).read_text())["random_init"]["seed"] == 3
