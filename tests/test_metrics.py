import math

import numpy as np
import pytest
import torch

import tiny
from jtc_lens.harness.metrics import lens_metrics, r2_per_item, r2_pooled, r2w_per_item
from jtc_lens.harness.models import build_lens_model
from jtc_lens.harness.projectors import IdentityProjector


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_lens_metrics_match_hand_computed_values():
    final = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0]])  # P = 1, V = 12
    lens = torch.stack([
        final.clone(),  # identical: top-1 agrees, KL 0
        torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]),  # top-1 = token 5 (final rank 6)
        torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0]]),  # top-1 = token 11 (final rank 12)
    ])
    nxt = torch.tensor([2])
    out = lens_metrics(final, lens, nxt)
    pf = _softmax(final[0].numpy().astype(np.float64))
    for s, top1, in_top5, in_top10 in [(0, 0, 1, 1), (1, 5, 0, 1), (2, 11, 0, 0)]:
        pl = _softmax(lens[s, 0].numpy().astype(np.float64))
        assert out["p@1"][s, 0] == float(top1 == 0)
        assert out["p@5"][s, 0] == in_top5
        assert out["p@10"][s, 0] == in_top10
        assert math.isclose(out["surprisal"][s, 0], -math.log(pf[top1]), rel_tol=1e-5)
        assert math.isclose(out["kl"][s, 0], float(np.sum(pf * (np.log(pf) - np.log(pl)))), rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(out["xent"][s, 0], -math.log(pl[2]), rel_tol=1e-5)
        # the entropy is the difference of two float32 numbers near 9 (log-sum-exp and sum q z), whose spacing
        # is 9.5e-7: it cannot be held to better than about two of those in absolute terms
        assert math.isclose(out["entropy"][s, 0], float(-np.sum(pl * np.log(pl))), rel_tol=1e-5, abs_tol=2e-6)
    assert abs(float(out["kl"][0, 0])) < 1e-6


def test_r2_per_item_mean_is_the_coefficient_of_determination():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(50, 6, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2, 3, 4, 5, 100])
    projected = torch.stack([target + 0.5 * torch.randn(50, 6, generator=gen, dtype=torch.float64), torch.zeros(50, 6, dtype=torch.float64)])
    sq = ((projected - target[None]) ** 2).permute(1, 0, 2)  # (N, S, d): one position per item
    var = target.var(0, unbiased=False)
    per_item = r2_per_item(sq, torch.ones(50), var)
    torch.testing.assert_close(per_item.mean(0), r2_pooled(projected, target))
    # against the textbook definition, coordinate by coordinate
    t, p = target.numpy(), projected[0].numpy()
    ref = np.mean([1 - np.sum((t[:, j] - p[:, j]) ** 2) / np.sum((t[:, j] - t[:, j].mean()) ** 2) for j in range(6)])
    assert math.isclose(float(per_item.mean(0)[0]), ref, rel_tol=1e-9)
    assert float(per_item.mean(0)[1]) < 0  # predicting zeros is worse than the mean: negative r^2


def test_variance_weighted_r2_is_one_minus_total_error_over_total_variance():
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(60, 5, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 3.0, 10.0, 0.5, 2.0])
    # coordinate 3 is nearly constant, as some coordinates of h_L are: the coordinate average is swamped by it
    target[:, 3] = 7.0 + 1e-4 * torch.randn(60, generator=gen, dtype=torch.float64)
    projected = (target + 0.3 * torch.randn(60, 5, generator=gen, dtype=torch.float64))[None]
    sq = ((projected - target[None]) ** 2).permute(1, 0, 2)
    var = target.var(0, unbiased=False)
    per_item = r2w_per_item(sq, torch.ones(60), var)
    t, p = target.numpy(), projected[0].numpy()
    expected = 1 - np.sum((t - p) ** 2) / np.sum((t - t.mean(0)) ** 2)
    assert math.isclose(float(per_item.mean(0)[0]), expected, rel_tol=1e-12)
    torch.testing.assert_close(per_item.mean(0), r2_pooled(projected, target, weighted=True))
    assert 0.9 < expected < 1  # the large coordinates are predicted well...
    assert float(r2_per_item(sq, torch.ones(60), var).mean(0)[0]) < -1000  # ...yet the coordinate average is hugely negative


def test_identity_at_the_last_layer_is_exact():
    model, tok = tiny.build("gemma3")
    lens = build_lens_model(model, tok)
    ids = tok("volunteers around the world predicted the next token", return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    states = lens.capture(ids, torch.ones_like(ids), torch.zeros(n, dtype=torch.long), torch.arange(n))
    L = lens.num_layers
    with torch.no_grad():
        final = lens.readout(states[L])
        projected = IdentityProjector().project(states, [L], L)
        out = lens_metrics(final, lens.readout(projected), ids[0])
    assert torch.all(out["p@1"] == 1)
    assert float(out["kl"].abs().max()) < 1e-5
    torch.testing.assert_close(out["entropy"][0], -(final.log_softmax(-1).exp() * final.log_softmax(-1)).sum(-1))


def test_lens_metrics_agree_with_a_float64_reference_on_wide_logits():
    # logits of very different scales, as id-lens logits of early layers are; ties broken the same way
    gen = torch.Generator().manual_seed(3)
    S, P, V = 4, 6, 5000
    final = torch.randn(P, V, generator=gen) * 4
    lens = torch.randn(S, P, V, generator=gen) * torch.tensor([0.1, 2.0, 15.0, 60.0])[:, None, None]
    nxt = torch.randint(0, V, (P,), generator=gen)
    out = lens_metrics(final, lens, nxt)
    lf = torch.log_softmax(final.double(), -1)
    ll = torch.log_softmax(lens.double(), -1)
    top1 = ll.argmax(-1)
    ref = {
        "kl": (lf.exp()[None] * (lf[None] - ll)).sum(-1),
        "entropy": -(ll.exp() * ll).sum(-1),
        "xent": -ll.gather(-1, nxt[None, :, None].expand(S, -1, 1))[..., 0],
        "surprisal": -lf[None].expand(S, -1, -1).gather(-1, top1[..., None])[..., 0],
    }
    # float32 logits carry an absolute error of an ulp of their largest value; allow a few of those
    ulps = 4 * torch.finfo(torch.float32).eps * lens.abs().amax(dim=(1, 2)).double()[:, None]
    for name, expected in ref.items():
        err = (out[name].double() - expected).abs()
        assert (err <= 1e-5 * expected.abs() + ulps + 1e-6).all(), (name, err.max())
    final_top10 = lf.topk(10, -1).indices
    for k in (1, 5, 10):
        expected = (top1[..., None] == final_top10[None, :, :k]).any(-1).float()
        assert torch.equal(out[f"p@{k}"], expected)


def _realistic_logits(gen, rows: int, V: int) -> torch.Tensor:
    """Logits spread like a language model's: a broad bulk (std 2.5) and a few tokens 5-20 nats above it."""
    z = torch.randn(rows, V, generator=gen) * 2.5
    z[:, :20] += torch.rand(rows, 20, generator=gen) * 20
    return z


def _reference(final: torch.Tensor, lens: torch.Tensor, nxt: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metrics in float64 from their definitions."""
    lf = torch.log_softmax(final.double(), -1)
    ll = torch.log_softmax(lens.double(), -1)
    S = lens.shape[0]
    top1 = ll.argmax(-1)
    return {
        "kl": (lf.exp()[None] * (lf[None] - ll)).sum(-1),
        "entropy": -(ll.exp() * ll).sum(-1),
        "xent": -ll.gather(-1, nxt[None, :, None].expand(S, -1, 1))[..., 0],
        "surprisal": -lf[None].expand(S, -1, -1).gather(-1, top1[..., None])[..., 0],
    }


@pytest.mark.parametrize("V", [49_152, 262_144])
def test_metrics_on_a_real_vocabulary_are_unbiased(V):
    # PyTorch's softmax kernels sum to 1 + 6e-6 (V = 49k) .. 4e-5 (V = 262k); a KL that assumes they sum to
    # 1 came out 1.2e-4 .. 7.6e-4 nats low on such logits
    gen = torch.Generator().manual_seed(11)
    S, P = 3, 24
    final = _realistic_logits(gen, P, V)
    lens = final[None] + torch.randn(S, P, V, generator=gen) * torch.tensor([0.5, 2.0, 5.0])[:, None, None]
    nxt = torch.randint(0, V, (P,), generator=gen)
    out = lens_metrics(final, lens, nxt)
    for name, expected in _reference(final, lens, nxt).items():
        err = out[name].double() - expected
        assert float(err.abs().mean()) < 2e-5, (name, float(err.mean()), float(err.abs().mean()))
        assert abs(float(err.mean())) < 5e-6, (name, float(err.mean()))  # no systematic offset


def test_the_engine_scorer_is_unbiased_on_a_real_vocabulary():
    # the scorer's own route: slices, a linear readout through the final norm and (p W) . f for sum p z
    from jtc_lens.harness.engine import Engine

    lens = build_lens_model(*tiny.build("llama", layers=2))
    gen = torch.Generator().manual_seed(12)
    V, d, P = 49_152, lens.d_model, 20
    unembed = torch.nn.Linear(d, V, bias=False)
    with torch.no_grad():
        unembed.weight.copy_(torch.randn(V, d, generator=gen) * 0.45)
        unembed.weight[:20] *= 4  # a few tokens with large logits, as the bulk / head split of a real model
    lens.unembed = unembed
    target = torch.randn(P, d, generator=gen)
    projected = target[None] + torch.randn(2, P, d, generator=gen) * torch.tensor([0.3, 1.0])[:, None, None]
    nxt = torch.randint(0, V, (P,), generator=gen)
    with torch.no_grad():
        final = lens.readout(target).float()
        out = Engine(lens)._score(final, projected, nxt)
        lens_logits = lens.readout(projected).float()
    for name, expected in _reference(final, lens_logits, nxt).items():
        err = out[name].double() - expected
        assert float(err.abs().mean()) < 2e-5, (name, float(err.mean()), float(err.abs().mean()))


def test_cross_entropy_is_undefined_without_a_next_token():
    gen = torch.Generator().manual_seed(4)
    final, lens = torch.randn(3, 50, generator=gen), torch.randn(2, 3, 50, generator=gen)
    out = lens_metrics(final, lens, torch.tensor([7, -1, 3]))
    assert torch.isnan(out["xent"][:, 1]).all() and torch.isfinite(out["xent"][:, [0, 2]]).all()
    assert all(torch.isfinite(v).all() for k, v in out.items() if k != "xent")
