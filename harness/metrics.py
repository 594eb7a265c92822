"""Metrics of a projector against the model's own final prediction: pure tensor functions.

Shapes: final logits (P, V) at P scored positions; projected logits (S, P, V) for S source layers;
next tokens (P,). Every function returns per-(layer, position) values so that per-item values, and
hence paired tests, stay possible. Natural logarithms throughout (nats).
"""

from __future__ import annotations

import math

import torch

TOPK = (1, 5, 10)
LENS_METRICS = ("p@1", "p@5", "p@10", "surprisal", "kl", "xent", "entropy")
NATS_PER_BIT = math.log(2.0)


def lens_metrics(final_logits: torch.Tensor, lens_logits: torch.Tensor, next_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision@k, surprisal, KL(p_final || p_lens), cross-entropy to the next token and entropy, each (S, P)."""
    final_lp = torch.log_softmax(final_logits.float(), dim=-1)  # (P, V)
    lens_lp = torch.log_softmax(lens_logits.float(), dim=-1)  # (S, P, V)
    top1 = lens_lp.argmax(dim=-1)  # (S, P)
    final_top = final_lp.topk(max(TOPK), dim=-1).indices  # (P, 10)
    hits = top1[..., None] == final_top[None]  # (S, P, 10)
    out = {f"p@{k}": hits[..., :k].any(dim=-1).float() for k in TOPK}
    out["surprisal"] = -final_lp[None].expand_as(lens_lp).gather(-1, top1[..., None])[..., 0]
    final_p = final_lp.exp()
    out["kl"] = (final_p[None] * (final_lp[None] - lens_lp)).sum(-1)
    out["xent"] = -lens_lp.gather(-1, next_tokens[None, :, None].expand(lens_lp.shape[0], -1, 1))[..., 0]
    out["entropy"] = -(lens_lp.exp() * lens_lp).sum(-1)
    return out


def squared_errors(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-coordinate squared error summed over positions: (S, d), in float64."""
    diff = projected.double() - target.double()[None]
    return (diff * diff).sum(dim=1)


def r2_per_item(sq_err: torch.Tensor, n_positions: torch.Tensor, target_var: torch.Tensor) -> torch.Tensor:
    """Per-item r^2, (N, S), whose mean over items of equal size is the coefficient of determination.

    r^2 = 1 - mean_j SSE_j / SST_j over coordinates j. Written per item i as
    1 - mean_j (sq_err_ij / n_i) / var_j, with var_j the population variance of target coordinate j
    over all positions of the evaluation set, the mean over items reproduces it exactly.
    """
    var = target_var.double().clamp_min(1e-12)
    mse = sq_err.double() / n_positions.double()[:, None, None]
    return 1.0 - (mse / var).mean(dim=-1)


def r2_pooled(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Reference r^2 over positions for each source layer: (S,). ``projected`` (S, P, d), ``target`` (P, d)."""
    t = target.double()
    sst = ((t - t.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    sse = ((projected.double() - t[None]) ** 2).sum(1)
    return 1.0 - (sse / sst).mean(-1)
