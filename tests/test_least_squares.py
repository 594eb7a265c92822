import numpy as np
import pytest
import torch
from torch import nn

import tiny
from fixture_corpus import fixture_distribution
from jtc_lens.harness.fitting import FitSpec, get_least_squares
from jtc_lens.harness.models import build_lens_model
from jtc_lens.harness.projectors import GramAccumulator, LeastSquaresProjector, fit_least_squares
from jtc_lens.harness.protocols import ProtocolConfig


def _random_states(num_states=4, positions=300, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(positions, d, generator=gen, dtype=torch.float64)
    states = [base]
    for _ in range(num_states - 1):
        mix = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
        states.append(states[-1] @ mix + 0.3 * torch.randn(positions, d, generator=gen, dtype=torch.float64) + 1.5)
    # a few coordinates on a much larger scale, as in real residual streams
    out = torch.stack(states)
    out[:, :, 0] *= 300.0
    return out.float()


def _rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("pairs", ["all", "last"])
def test_mat_and_affine_equal_numpy_least_squares(pairs):
    states = _random_states()
    acc = GramAccumulator(4, 16, pairs, buffer_rows=64)
    for chunk in states.split(37, dim=1):  # uneven batches, buffered
        acc.update(chunk)
    mat = fit_least_squares(acc, intercept=False)
    affine = fit_least_squares(acc, intercept=True)
    expected_pairs = [(l, m) for l in range(4) for m in range(l + 1, 4)] if pairs == "all" else [(0, 3), (1, 3), (2, 3)]
    assert sorted(mat) == expected_pairs
    x = states.double().numpy()
    for l, m in expected_pairs:
        ref, *_ = np.linalg.lstsq(x[l], x[m], rcond=None)
        assert _rel_err(mat[(l, m)][0].numpy(), ref) < 1e-5
        design = np.hstack([x[l], np.ones((x.shape[1], 1))])
        ref_aff, *_ = np.linalg.lstsq(design, x[m], rcond=None)
        assert _rel_err(affine[(l, m)][0].numpy(), ref_aff[:-1]) < 1e-5
        assert _rel_err(affine[(l, m)][1].numpy(), ref_aff[-1]) < 1e-5


def test_projector_applies_all_layers_in_one_product():
    states = _random_states()
    acc = GramAccumulator(4, 16, "last")
    acc.update(states)
    proj = LeastSquaresProjector("affine", fit_least_squares(acc, intercept=True))
    out = proj.project(states, [0, 1, 2], 3)
    for l in range(3):
        M, b = proj.solutions[(l, 3)]
        torch.testing.assert_close(out[l], (states[l].double() @ M + b).float(), rtol=1e-4, atol=1e-3)
    restored = LeastSquaresProjector.from_tensors("affine", proj.tensors())
    torch.testing.assert_close(restored.project(states, [0, 1, 2], 3), out)


def test_underdetermined_fit_falls_back_to_minimum_norm():
    states = _random_states(positions=8, d=16)  # fewer positions than dimensions
    acc = GramAccumulator(4, 16, "last")
    acc.update(states)
    mat = fit_least_squares(acc, intercept=False)
    M = mat[(0, 3)][0]
    assert torch.isfinite(M).all()
    residual = states[0].double() @ M - states[3].double()
    assert float(residual.norm() / states[3].double().norm()) < 1e-3  # interpolates the few points


class LinearBlock(nn.Module):
    """A transformer block replaced by a fixed linear map of its input."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states @ self.weight


def test_mat_recovers_the_exact_map_of_linear_blocks():
    model, tok = tiny.build("llama", layers=3, d=32)
    gen = torch.Generator().manual_seed(3)
    weights = [torch.eye(32) + 0.3 * torch.randn(32, 32, generator=gen) for _ in range(3)]
    model.model.layers = nn.ModuleList([LinearBlock(w) for w in weights])
    lens = build_lens_model(model, tok)
    spec = FitSpec(fixture_distribution(), ProtocolConfig("dense", seed=0, chunk_len=24), n_fit=40, pairs="all")
    fitted = get_least_squares(lens, spec, batch_size=8)
    assert fitted.info["fit_positions"] > 32 * 10
    for l in range(3):
        for m in range(l + 1, 4):
            exact = torch.eye(32, dtype=torch.float64)
            for w in weights[l:m]:
                exact = exact @ w.double()
            M = fitted.mat.solutions[(l, m)][0]
            assert _rel_err(M.double().numpy(), exact.numpy()) < 1e-4, (l, m)


def test_a_bfloat16_model_is_fitted_in_float64():
    from jtc_lens.harness.corpora import get_corpus
    from jtc_lens.harness.encoding import batches, encode
    from jtc_lens.harness.fitting import accumulate
    from jtc_lens.harness.protocols import build_items

    model, tok = tiny.build("llama", layers=2)
    lens = build_lens_model(model.to(torch.bfloat16), tok)
    assert lens.dtype == torch.bfloat16
    protocol = ProtocolConfig("dense", chunk_len=32)
    items = build_items(get_corpus(fixture_distribution()), "train", protocol, limit=12)
    encoded = [encode(it, tok, protocol, False) for it in items]
    acc, _ = accumulate(lens, encoded, "all", batch_size=4, desc="fit")
    assert acc.gram.dtype == torch.float64 and acc.n > lens.d_model
    ours = fit_least_squares(acc, intercept=False)
    # reference: the same bfloat16 states, solved in float64 by lstsq
    states = torch.cat([lens.capture(b.input_ids, b.attention_mask, b.rows, b.cols).double()
                        for b in batches(encoded, 4, tok.pad_token_id or 0)], dim=1)
    for l, m in ((0, 2), (1, 2), (0, 1)):
        ref = torch.linalg.lstsq(states[l], states[m], driver="gelsd").solution
        err = (ours[(l, m)][0] - ref).abs().max() / ref.abs().max()
        assert err < 1e-6, (l, m, err)  # a bfloat16 accumulation would be off by ~1e-2
