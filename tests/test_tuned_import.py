"""Imported tuned lenses are used only for the model they were trained for, with the check recorded."""

import json

import pytest
import torch

import tiny
import jtc_lens.harness.engine as engine_module
from jtc_lens.harness.corpora import get_corpus
from jtc_lens.harness.engine import Engine, EvalRequest
from jtc_lens.harness.fitting import FitSpec, TunedSpec
from jtc_lens.harness.models import build_lens_model
from jtc_lens.harness.projectors.tuned import TunedProjector, export_tuned_lens, import_tuned_lens, unembed_hash, unembed_sha256
from jtc_lens.harness.protocols import ProtocolConfig, build_items
from jtc_lens.harness.tuned_training import TunedRecipe

# reads the bundled corpora (training streams and evaluation items)
pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def lens():
    return build_lens_model(*tiny.build("llama", seed=0))


@pytest.fixture
def exported(tmp_path, lens):
    gen = torch.Generator().manual_seed(1)
    proj = TunedProjector(0.01 * torch.randn(3, 32, 32, generator=gen), 0.01 * torch.randn(3, 32, generator=gen))
    export_tuned_lens(proj, tmp_path / "lens", "tiny-llama", lens.unembed.weight)
    return tmp_path / "lens"


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def _same_corners(weight: torch.Tensor) -> torch.Tensor:
    """Another unembedding that numpy prints identically: one value changed far from the corners."""
    other = weight.detach().clone()
    other[200, 16] += 1.0
    return other


def test_exported_lenses_carry_the_full_hash_of_the_unembedding(exported, lens):
    config = json.loads((exported / "config.json").read_text())
    assert config["unembed_sha256"] == unembed_sha256(lens.unembed.weight) == lens.fingerprint()["unembed_sha256"]


def test_a_lens_for_another_model_with_the_same_corners_is_refused(exported, lens):
    other = _same_corners(lens.unembed.weight)
    assert unembed_hash(other) == unembed_hash(lens.unembed.weight)  # the package's own hash cannot tell them apart
    with pytest.raises(ValueError, match="another unembedding \\(unembed_sha256 mismatch\\)"):
        import_tuned_lens(exported, 3, 32, other)


def test_a_lens_with_only_the_weak_hash_is_checked_and_recorded_as_weak(exported, lens):
    _edit_config(exported, unembed_sha256=None)
    _, check = import_tuned_lens(exported, 3, 32, lens.unembed.weight)
    assert check["identity_check"].startswith("weak:")
    with pytest.raises(ValueError, match="unembed_hash mismatch"):
        import_tuned_lens(exported, 3, 32, build_lens_model(*tiny.build("llama", seed=5)).unembed.weight)


def test_a_lens_without_any_hash_needs_allow_unverified_lens(exported, lens):
    _edit_config(exported, unembed_sha256=None, unembed_hash=None)
    with pytest.raises(ValueError, match="no hash of the unembedding .* allow_unverified_lens=true"):
        import_tuned_lens(exported, 3, 32, lens.unembed.weight)
    _, check = import_tuned_lens(exported, 3, 32, lens.unembed.weight, allow_unverified=True)
    assert check == {"identity_check": check["identity_check"], "allow_unverified_lens": True}
    assert check["identity_check"].startswith("none:")


def test_a_tensor_of_the_wrong_shape_is_named(exported, lens):
    state = torch.load(exported / "params.pt", weights_only=True)
    state["1.weight"] = torch.zeros(32, 16)
    torch.save(state, exported / "params.pt")
    with pytest.raises(ValueError, match=r"params\.pt: tensor '1\.weight' has shape \(32, 16\), expected \(32, 32\)"):
        import_tuned_lens(exported, 3, 32, lens.unembed.weight)
    del state["1.weight"]
    torch.save(state, exported / "params.pt")
    with pytest.raises(ValueError, match=r"params\.pt has no tensor '1\.weight' \(expected shape \(32, 32\)\)"):
        import_tuned_lens(exported, 3, 32, lens.unembed.weight)


def test_a_missing_lens_stops_the_run_before_anything_is_fitted(tmp_path, lens, monkeypatch):
    fitted = []
    monkeypatch.setattr(engine_module, "get_least_squares", lambda *a, **k: fitted.append(a) or pytest.fail("fitted first"))
    protocol = ProtocolConfig("paper", seed=4)
    items = build_items(get_corpus("wikipedia"), "validation", protocol, limit=2)
    imported = TunedSpec("wikipedia", TunedRecipe("warm"), import_from=str(tmp_path / "no-such-lens"))
    requests = [EvalRequest("mat", "wikipedia", "validation", protocol, it, FitSpec("wikipedia", protocol, 10)) for it in items]
    requests += [EvalRequest("tuned", "wikipedia", "validation", protocol, it, imported) for it in items]
    with pytest.raises(FileNotFoundError, match="no-such-lens: no config.json"):
        Engine(lens).run(requests)
    assert fitted == []


def test_the_identity_check_reaches_the_provenance(exported, lens):
    _edit_config(exported, unembed_sha256=None, unembed_hash=None)
    protocol = ProtocolConfig("paper", seed=4)
    items = build_items(get_corpus("wikipedia"), "validation", protocol, limit=2)
    spec = TunedSpec("wikipedia", TunedRecipe("warm"), import_from=str(exported), allow_unverified=True)
    responses = Engine(lens).run([EvalRequest("tuned", "wikipedia", "validation", protocol, it, spec) for it in items])
    config = responses[0]["provenance"]["projector_config"]
    assert config["allow_unverified_lens"] is True and config["identity_check"].startswith("none:")
