"""Metrics of a projector against the model's own final prediction: pure tensor functions.

Shapes: final logits (P, V) at P scored positions; projected logits (S, P, V) for S source layers;
next tokens (P,). Every function returns per-(layer, position) values so that per-item values, and
hence paired tests, stay possible. Natural logarithms throughout (nats).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TOPK = (1, 5, 10)
LENS_METRICS = ("p@1", "p@5", "p@10", "surprisal", "kl", "xent", "entropy")
# r^2 against the last layer's state: the paper's coordinate-averaged one and the variance-weighted one. Neither
# is averaged over layers per item: the coordinate-averaged r^2 of one layer can be -3,933 while the others lie
# in [0, 1], so a layer mean says nothing about the other layers.
R2_METRICS = ("r2", "r2w")
NATS_PER_BIT = math.log(2.0)
CONFIDENCE = "confidence"  # also returned by lens_metrics_from: p_top1 - p_top2, what early exit thresholds
# Direction of every per-layer metric (None: neither); lm-eval reports it, the leaderboard says which projector is better by it.
HIGHER_IS_BETTER = {"p@1": True, "p@5": True, "p@10": True, "surprisal": False, "kl": False, "xent": False,
                    "entropy": None, "r2": True, "r2w": True}


@dataclass(frozen=True)
class FinalStats:
    """What every layer's metrics need from the final prediction at P positions; computed once per position."""

    log_probs: torch.Tensor  # (P, V)
    probs: torch.Tensor  # (P, V)
    top: torch.Tensor  # (P, max k): the final top-k tokens
    neg_entropy: torch.Tensor  # (P,): sum_v p log p


def final_stats(final_logits: torch.Tensor, chunk: int = 1 << 22) -> FinalStats:
    """The final prediction's log-probabilities, in float64 (``chunk`` elements at a time), kept in float32.

    Not log_softmax: PyTorch's CPU softmax kernels approximate exp, and over a 50k-260k vocabulary their
    probabilities sum to 1 + 6e-6 .. 4e-5, which biased KL low by 1e-4 .. 8e-4 nats. This is per
    position, not per layer, so float64 costs nothing measurable.
    """
    z = final_logits.float()
    P, V = z.shape
    log_probs = torch.empty_like(z)
    neg_entropy = torch.empty(P, dtype=torch.float64, device=z.device)
    rows = max(1, chunk // max(V, 1))
    for r0 in range(0, P, rows):
        z64 = z[r0:r0 + rows].double()
        lp = z64 - torch.logsumexp(z64, dim=-1, keepdim=True)
        neg_entropy[r0:r0 + rows] = torch.linalg.vecdot(lp.exp(), lp)
        log_probs[r0:r0 + rows] = lp
    probs = log_probs.exp()
    return FinalStats(log_probs, probs, log_probs.topk(max(TOPK), dim=-1).indices, neg_entropy)


def lens_metrics(final_logits: torch.Tensor, lens_logits: torch.Tensor, next_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision@k, surprisal, KL(p_final || p_lens), cross-entropy to the next token, entropy and the confidence
    p_top1 - p_top2, each (S, P).
    Cross-entropy is NaN at positions whose next token is negative (none)."""
    return lens_metrics_from(final_stats(final_logits), lens_logits, next_tokens)


def lens_metrics_from(final: FinalStats, lens_logits: torch.Tensor, next_tokens: torch.Tensor,
                      expected_logit: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``lens_metrics`` with the final prediction's part done beforehand.

    Beyond the unembedding product, the passes over the (S, P, V) lens logits z are the cost of
    scoring, so they are kept few, each a fused row-wise kernel: max (top-1), softmax q, its sum s and
    the dot product sum q z. PyTorch's softmax kernel approximates exp: its q sums to s = 1 + O(1e-5) on
    large vocabularies, nearly a uniform scale, so q / s is the distribution (the bias left is below 1e-8
    nats). With lse = max z - log(q[top-1] / s) (exact for a peaked q, unlike log sum exp),
      H(q) = lse - sum q z / s,   KL(p || q) = sum p log p - sum p z + lse,   xent = lse - z[next].
    ``expected_logit``, sum_v p_v z_v (S, P), may come from a cheaper route (see Engine._score).
    """
    z = lens_logits.float()
    best = z.topk(2, dim=-1)  # top-2 costs about what max does, and gives the exit confidence
    zmax, top1, second = best.values[..., 0], best.indices[..., 0], best.values[..., 1]  # (S, P)
    q = torch.softmax(z, dim=-1)
    total = q.sum(dim=-1)
    # max z is exact and the correction small: added in float64, lse keeps its precision when logits are large
    # (id lens logits of early layers reach ~800, where float32 spacing is 6e-5)
    lse64 = zmax.double() + (total.log() - q.gather(-1, top1[..., None])[..., 0].log()).double()
    lse = lse64.float()
    hits = top1[..., None] == final.top[None]  # (S, P, k)
    out = {f"p@{k}": hits[..., :k].any(dim=-1).float() for k in TOPK}
    out["surprisal"] = -final.log_probs.gather(-1, top1.T).T
    if expected_logit is None:
        expected_logit = torch.linalg.vecdot(z, final.probs[None])
    out["kl"] = (final.neg_entropy[None] - expected_logit.double() + lse64).float()
    # a position without a next token (a negative id: the paper's draw over every token) has no cross-entropy: NaN
    has_next = next_tokens >= 0
    true_logit = z.gather(-1, next_tokens.clamp_min(0)[None, :, None].expand(z.shape[0], -1, 1))[..., 0]
    out["xent"] = torch.where(has_next[None], (lse64 - true_logit.double()).float(), torch.full_like(lse, float("nan")))
    out["entropy"] = (lse64 - (torch.linalg.vecdot(q, z) / total).double()).float()
    # early exit's confidence, p_top1 - p_top2 of the lens distribution (not a reported lens metric)
    out[CONFIDENCE] = ((zmax.double() - lse64).exp() - (second.double() - lse64).exp()).float()
    return out


def squared_errors(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-coordinate squared error summed over positions: (S, d), in float64."""
    diff = projected.double() - target.double()[None]
    return (diff * diff).sum(dim=1)


def r2_weights(target_var: torch.Tensor) -> torch.Tensor:
    """(d, 2): per-coordinate weights of squared errors for ``r2`` and ``r2w`` (the order of R2_METRICS), so that an item's value is
    1 - (sum_j sq_err_j w_j) / n_positions. ``r2``: w_j = 1 / (d var_j), the mean over coordinates of SSE_j / SST_j;
    ``r2w``: w_j = 1 / sum_k var_k, so a coordinate of nearly constant target (var ~ 0) cannot send the value to
    minus thousands; each counts by its share of the variance. var_j is the population variance of target
    coordinate j over all positions of the evaluation set."""
    var = target_var.double()
    per_coordinate = 1.0 / (var.clamp_min(1e-12) * var.numel())
    pooled = torch.full_like(var, 1.0 / float(var.sum().clamp_min(1e-12)))
    return torch.stack([per_coordinate, pooled], dim=1)


def r2_from_weighted(weighted: torch.Tensor, n_positions: torch.Tensor) -> torch.Tensor:
    """Per-item r^2 (N, S) from weighted squared-error sums (N, S) (see ``r2_weights``)."""
    return 1.0 - weighted / n_positions.double().clamp_min(1)[:, None]


def r2_per_item(sq_err: torch.Tensor, n_positions: torch.Tensor, target_var: torch.Tensor) -> torch.Tensor:
    """Per-item r^2, (N, S), whose mean over items of equal size is the coefficient of determination.

    r^2 = 1 - mean_j SSE_j / SST_j over coordinates j. Written per item i as
    1 - mean_j (sq_err_ij / n_i) / var_j, with var_j the population variance of target coordinate j
    over all positions of the evaluation set, the mean over items reproduces it exactly.
    """
    return r2_from_weighted(sq_err.double() @ r2_weights(target_var)[:, 0], n_positions)


def r2w_per_item(sq_err: torch.Tensor, n_positions: torch.Tensor, target_var: torch.Tensor) -> torch.Tensor:
    """Per-item variance-weighted r^2, (N, S), whose mean over items of equal size is 1 - sum_j SSE_j / sum_j SST_j."""
    return r2_from_weighted(sq_err.double() @ r2_weights(target_var)[:, 1], n_positions)


def r2_pooled(projected: torch.Tensor, target: torch.Tensor, weighted: bool = False) -> torch.Tensor:
    """Reference r^2 over positions for each source layer: (S,). ``projected`` (S, P, d), ``target`` (P, d).
    ``weighted``: 1 - sum_j SSE_j / sum_j SST_j instead of the mean over coordinates of 1 - SSE_j / SST_j."""
    t = target.double()
    sst = ((t - t.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    sse = ((projected.double() - t[None]) ** 2).sum(1)
    if weighted:
        return 1.0 - sse.sum(-1) / sst.sum()
    return 1.0 - (sse / sst).mean(-1)


def scores_or_nan(final: FinalStats, logits: torch.Tensor, next_tokens: torch.Tensor,
                  names: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], int]:
    """The ``names`` metrics (S, P) of an intervened model's predictions ``logits`` (S, P, V) against ``final``, and how
    many of the S x P predictions are non-finite. A non-finite prediction (the model diverged there) has no top token:
    its every metric is NaN, never a number such as P@1 = 0, so a mean over items holding one is NaN."""
    out = lens_metrics_from(final, logits.float(), next_tokens)
    bad = ~torch.isfinite(logits).all(dim=-1)  # (S, P)
    return {m: torch.where(bad, torch.full_like(out[m], float("nan")), out[m]) for m in names}, int(bad.sum())
