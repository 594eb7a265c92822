"""Sub-module shortcuts: the map of every architecture and its recomposition check, interventions against a
hand-written replacement, hooks removed after an error, fitted maps against numpy's lstsq, the study end to end."""

import numpy as np
import pytest
import torch

import tiny
from fixture_corpus import fixture_distribution
from jtc_lens.harness import submodules
from jtc_lens.harness.corpora import get_corpus
from jtc_lens.harness.encoding import batches
from jtc_lens.harness.engine import Engine, EvalRequest
from jtc_lens.harness.fitting import FitSpec, fit_inputs
from jtc_lens.harness.models import AdapterError, build_lens_model
from jtc_lens.harness.protocols import ProtocolConfig, build_items
from jtc_lens.harness.submodule_study import get_maps, start_layers

PAPER = ProtocolConfig("paper", seed=2)
LAYOUT = {"gpt2": "sequential", "llama": "sequential", "qwen2": "sequential", "gemma3": "sequential", "gptneox": "parallel"}


def _lens(arch: str, layers: int = 3):
    model, tok = tiny.build(arch, layers=layers)
    # norms of a fresh model all have weight 1 and bias 0, so they are interchangeable; make each its own
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return build_lens_model(model, tok)


def _logits(lens, ids):
    with torch.no_grad():
        return lens.model(input_ids=ids).logits


def _ids(lens):
    return lens.tokenizer("A model reads hidden states layer by layer.", return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("arch", list(LAYOUT))
def test_every_architecture_is_mapped_and_recomposes(arch):
    lens = _lens(arch)
    parts, worst = submodules.map_and_verify(lens)
    assert len(parts) == lens.num_layers and worst["recomposition"] < 1e-4
    assert {p.layout for p in parts} == {LAYOUT[arch]}
    n_norms = {"gemma3": 4}.get(arch, 2)
    assert all(len(p.norms) == n_norms for p in parts)
    wiring = parts[0].wiring
    if arch == "gemma3":  # the extra norms after attention and after the feed-forward
        assert wiring["post_attention_norm"] is not None and wiring["post_ffn_norm"] is not None
    else:
        assert wiring["post_attention_norm"] is None and wiring["post_ffn_norm"] is None
        assert wiring["pre_attention_norm"] != wiring["pre_ffn_norm"]


def test_an_architecture_without_the_parts_is_refused_naming_what_is_missing():
    lens = build_lens_model(*tiny.build("bert"))
    with pytest.raises(AdapterError, match="feed-forward children.*Its children: attention"):
        submodules.map_and_verify(lens)


def test_a_block_with_a_path_the_map_misses_fails_the_recomposition_check():
    lens = _lens("llama")
    # a block that adds something beyond its two branches
    handle = lens.blocks[1].register_forward_hook(lambda m, a, out: (out[0] + 1.0,) + tuple(out[1:]) if isinstance(out, tuple) else out + 1.0)
    try:
        with pytest.raises(AdapterError, match="block 1.*does not reproduce"):
            submodules.map_and_verify(lens)
    finally:
        handle.remove()


@pytest.mark.parametrize("arch,part", [("llama", "ffn"), ("gemma3", "attn"), ("gptneox", "attn"), ("gpt2", "norm")])
def test_the_intervention_equals_a_hand_written_replacement(arch, part):
    lens = _lens(arch, layers=4)
    parts, _ = submodules.map_and_verify(lens)
    d = lens.d_model
    gen = torch.Generator().manual_seed(0)
    maps = {submodules.map_name(part, i, k): torch.randn(d, d, generator=gen) / d ** 0.5
            for i in range(len(parts)) for k in range(len(parts[i].modules(part)))}
    ids = _ids(lens)
    start = 2
    with submodules.intervene(parts, part, start, "linear", maps):
        hooked = _logits(lens, ids)
    # the reference: the modules' forward methods themselves swapped for the map
    originals = []
    for i in range(start, len(parts)):
        for k, module in enumerate(parts[i].modules(part)):
            M = maps[submodules.map_name(part, i, k)]
            originals.append((module, module.forward))

            def forward(*args, M=M, part=part, **kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                y = h @ M
                return y if part != "attn" else (y, None)
            module.forward = forward
    try:
        reference = _logits(lens, ids)
    finally:
        for module, f in originals:
            module.forward = f
    assert torch.allclose(hooked, reference, atol=1e-5)
    assert not torch.allclose(hooked, _logits(lens, ids), atol=1e-3)  # it did change the model


def test_removing_a_part_is_what_the_hand_written_block_computes():
    lens = _lens("llama", layers=2)
    parts, _ = submodules.map_and_verify(lens)
    ids = _ids(lens)
    with submodules.intervene(parts, "attn", 0, "removed"):
        removed = _logits(lens, ids)
    originals = [(p.attn, p.attn.forward) for p in parts]
    for p in parts:
        p.attn.forward = lambda *a, **k: (torch.zeros_like(a[0] if a else k["hidden_states"]), None)
    try:
        reference = _logits(lens, ids)
    finally:
        for module, f in originals:
            module.forward = f
    assert torch.allclose(removed, reference, atol=1e-6)


def test_hooks_are_removed_after_an_error_and_the_model_is_unmodified():
    lens = _lens("qwen2")
    parts, _ = submodules.map_and_verify(lens)
    ids = _ids(lens)
    before = _logits(lens, ids)
    hooks_before = sum(len(m._forward_hooks) for m in lens.model.modules())
    with pytest.raises(RuntimeError, match="planted"):
        with submodules.intervene(parts, "ffn", 0, "removed"):
            assert not torch.allclose(_logits(lens, ids), before)
            raise RuntimeError("planted")
    assert sum(len(m._forward_hooks) for m in lens.model.modules()) == hooks_before
    assert torch.equal(_logits(lens, ids), before)


def test_a_fitted_map_equals_numpy_lstsq():
    name = fixture_distribution()
    lens = _lens("llama")
    parts, _ = submodules.map_and_verify(lens)
    spec = FitSpec(name, PAPER, n_fit=400)
    maps, info = get_maps(lens, spec, batch_size=8)
    # the attention of block 1: its inputs and outputs at the fit positions, collected here
    _, encoded, _, _ = fit_inputs(lens, spec)
    xs, ys, where = [], [], []
    module = parts[1].attn

    def hook(_m, args, kwargs, output):
        rows, cols = where[0]
        xs.append(kwargs["hidden_states"][rows, cols].double().numpy())
        ys.append(output[0][rows, cols].double().numpy())
    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches(encoded, 8, lens.tokenizer.pad_token_id):
                where[:] = [(batch.rows, batch.cols)]
                lens.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        handle.remove()
    X, Y = np.concatenate(xs), np.concatenate(ys)
    assert info["fit_positions"] == len(X) >= 10 * lens.d_model
    expected = np.linalg.lstsq(X, Y, rcond=None)[0]
    assert np.allclose(maps["attn.1"].double().numpy(), expected, atol=1e-4 * np.abs(expected).max())
    again, info2 = get_maps(lens, spec, batch_size=8)
    assert info2["cache"] == "hit" and torch.equal(again["attn.1"], maps["attn.1"])


def test_the_study_scores_every_part_and_start_layer_and_leaves_the_model_unmodified():
    name = fixture_distribution()
    lens = _lens("gemma3", layers=4)
    ids = _ids(lens)
    before = _logits(lens, ids)
    items = build_items(get_corpus(name), "validation", PAPER, limit=12)
    fit = FitSpec(name, PAPER, n_fit=300)
    requests = [EvalRequest("mat", name, "validation", PAPER, it, fit, analysis="submodule", part=p, every=2)
                for p in ("attn", "ffn", "norm") for it in items]
    requests += [EvalRequest("mat", name, "validation", PAPER, it, fit) for it in items]
    out = Engine(lens, batch_size=5).run(requests)
    assert torch.equal(_logits(lens, ids), before)
    starts = start_layers(4, 2)
    assert starts == [0, 2]
    for k, r in enumerate(requests[:36]):
        values = out[k]
        for prefix in ("", "removed_", "mat_"):
            for m in ("p@1", "surprisal", "kl"):
                assert all(np.isfinite(values[f"{prefix}{m}.L{l}"]) for l in starts)
        # mat from the start layer is the lens tasks' mat at that layer, the same number
        lens_values = out[36 + k % 12]
        assert values["mat_kl.L2"] == pytest.approx(lens_values["kl.L2"], rel=1e-4, abs=1e-5)
    prov = out[0]["provenance"]["submodule"]
    assert prov["part"] == "attn" and prov["start_layers"] == starts and prov["passes_per_item"] == 1 + 3 * 2 * 2
    assert out[12]["provenance"]["submodule"]["part"] == "ffn"
    # replacing from start layer 0 changes more of the model than from layer 2: KL is larger on average
    kl = lambda l: np.mean([out[k][f"removed_kl.L{l}"] for k in range(12)])
    assert kl(0) > kl(2) > 0


def test_lm_eval_runs_the_sub_module_tasks_and_the_leaderboard_shows_them(tmp_path):
    from pathlib import Path

    from installed import run_lm_eval_on_tiny_model

    metadata = {"corpus": fixture_distribution(), "n_eval": 16, "n_fit": 300, "submodule_every": 2}
    proc, results, results_file, out = run_lm_eval_on_tiny_model(
        tmp_path, "custom_jtc_submodule_attn,custom_jtc_submodule_ffn,custom_jtc_mat", metadata)
    assert "removed_p@1.L2" in proc.stdout and "mat_kl.L0" in proc.stdout
    attn = results["results"]["custom_jtc_submodule_attn"]
    assert {f"p@1.L{l},none" for l in (0, 2)} <= set(attn) and "p@1.L1,none" not in attn
    # the mat baseline from layer 2 is the lens task's mat at layer 2
    assert attn["mat_p@1.L2,none"] == pytest.approx(results["results"]["custom_jtc_mat"]["p@1.L2,none"])
    prov = results["configs"]["custom_jtc_submodule_ffn"]["metadata"]["provenance"]["submodule"]
    assert prov["part"] == "ffn" and prov["maps"]["fit_positions"] == 300 and prov["layouts"] == ["sequential"]
    from jtc_lens.harness.sweep import summarise

    (line,) = [row for row in summarise(Path(results_file)) if "custom_jtc_submodule_attn" in row]
    assert f"from L2: linear {attn['p@1.L2,none']:.3f}" in line
    from jtc_lens.harness.report import submodule_table

    table = submodule_table(Path(results_file))
    assert "| 2 (0.50) | " + f"{attn['p@1.L2,none']:.3f} | {attn['removed_p@1.L2,none']:.3f}" in table
    from jtc_lens.leaderboard.build import build_site

    site = build_site([out], tmp_path / "site")
    page = next(p for p in site.pages if p.name.startswith("model-")).read_text()
    assert "Sub-module shortcuts" in page and page.count('class="submodule-table"') == 1
    assert "attn linear" in page and "ffn removed" in page and "mat from l" in page


def test_a_diverging_intervention_reports_nan_and_counts_it_never_a_number():
    from jtc_lens.harness.encoding import encode_all
    from jtc_lens.harness.fitting import get_least_squares
    from jtc_lens.harness.submodule_study import study

    name = fixture_distribution()
    lens = _lens("llama", layers=2)
    parts, _ = submodules.map_and_verify(lens)
    d = lens.d_model
    # norms that multiply by 1e30: the residual overflows, the final prediction is non-finite
    maps = {submodules.map_name("norm", i, k): torch.eye(d) * 1e30 for i in range(2) for k in range(2)}
    maps.update({submodules.map_name(p, i): torch.eye(d) for p in ("attn", "ffn") for i in range(2)})
    items = build_items(get_corpus(name), "validation", PAPER, limit=6)
    encoded, _ = encode_all(items, lens.tokenizer, PAPER, False)
    mat = get_least_squares(lens, FitSpec(name, PAPER, n_fit=100)).mat
    values, info = study(lens, encoded, ["norm"], maps, mat, every=1)
    row = values["norm"][encoded[0].item_id]
    assert np.isnan(row["p@1.L0"]) and np.isnan(row["kl.L0"]) and np.isnan(row["surprisal.L0"])
    assert info["nonfinite_positions"]["norm/linear/L0"] == 6
    assert np.isfinite(row["mat_p@1.L0"]) and np.isfinite(row["removed_kl.L1"])
