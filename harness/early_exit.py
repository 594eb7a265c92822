"""Early exit with a projector (Jump to Conclusions): the paper's exit rule, the accuracy / compute curve over a
grid of lambda, the fraction of blocks saved at a given accuracy retention, and paired bootstrap differences.

An item's record holds, for each of its scored positions, the token position t and, for every exit layer
l = 1 .. L-1 (the state after l of the L blocks), the projected distribution's confidence p_top1 - p_top2 and
whether its top-1 token is the model's own final top-1. A position exits at the first layer whose confidence
exceeds 0.9 lambda + 0.1 exp(-4 t / N), N the mean token length of the evaluation set's inputs; a position that
never exits uses all L blocks and the model's own output (correct by definition). The embedding output (layer 0,
no block run) is not an exit point. Accuracy is P@1 of the exited prediction against the model's final top-1,
so the full model's accuracy is 1 and accuracy is its retention.
"""

from __future__ import annotations

import numpy as np

LAMBDAS = np.linspace(0.0, 1.0, 101)
RETENTIONS = (0.99, 0.95, 0.90)
BOOTSTRAP_RESAMPLES = 1000
# The paper's blocks saved at 95% retention (24-layer GPT-2), shown beside ours
PAPER_SAVED_AT_95 = {"mat": 0.138, "id": 0.059}
# The projector each one is compared with (paired, same items): mat against the logit lens, tuned against mat.
PAIRED_BASE = {"mat": "id", "tuned": "mat"}


def _pct(r: float) -> int:
    return round(r * 100)


SAVED = {r: f"saved@{_pct(r)}" for r in RETENTIONS}
DIFF = {r: f"saved_diff@{_pct(r)}" for r in RETENTIONS}
DIFF_LOW = {r: f"saved_diff@{_pct(r)}_lo" for r in RETENTIONS}
DIFF_HIGH = {r: f"saved_diff@{_pct(r)}_hi" for r in RETENTIONS}


def metric_names(projector: str) -> tuple[str, ...]:
    """The headline metrics of an exit task: blocks saved at each retention, and for a projector with a paired
    base, the paired difference and its 95% bootstrap interval."""
    names = list(SAVED.values())
    if projector in PAIRED_BASE:
        for r in RETENTIONS:
            names += [DIFF[r], DIFF_LOW[r], DIFF_HIGH[r]]
    return tuple(names)


def thresholds(lambdas: np.ndarray, t: np.ndarray, mean_length: float) -> np.ndarray:
    """The paper's exit threshold, (lambdas, positions)."""
    return 0.9 * lambdas[:, None] + 0.1 * np.exp(-4.0 * t[None, :] / mean_length)


def item_table(records: list[dict], side: str = "lens", lambdas: np.ndarray = LAMBDAS,
               mean_length: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per item and lambda: the fraction of blocks used and the accuracy, each (items, lambdas), averaged over
    the item's positions (one position per item under the paper protocol). ``side``: "lens" for the
    projector's own values, "base" for its paired base's."""
    if mean_length is None:
        mean_length = mean_input_length(records)
    conf, correct, t, owner = [], [], [], []
    for i, rec in enumerate(records):
        part = rec[side]
        conf.append(np.asarray(part["conf"], dtype=np.float64).reshape(len(rec["t"]), -1))
        correct.append(np.asarray(part["correct"], dtype=bool).reshape(len(rec["t"]), -1))
        t.append(np.asarray(rec["t"], dtype=np.float64))
        owner.append(np.full(len(rec["t"]), i))
    conf_m, correct_m, t_m, owner_m = (np.concatenate(x) for x in (conf, correct, t, owner))
    blocks = int(records[0]["blocks"])
    if conf_m.shape[1] != blocks - 1:
        raise ValueError(f"exit record has {conf_m.shape[1]} exit layers for a model of {blocks} blocks (expected {blocks - 1})")
    above = conf_m[None] > thresholds(lambdas, t_m, mean_length)[:, :, None]  # (lambdas, positions, exit layers)
    exits = above.any(-1)
    first = above.argmax(-1)
    used = np.where(exits, first + 1, blocks) / blocks
    ok = np.where(exits, np.take_along_axis(np.broadcast_to(correct_m, above.shape), first[..., None], -1)[..., 0], True)
    counts = np.bincount(owner_m, minlength=len(records)).astype(np.float64)
    used_i = np.stack([np.bincount(owner_m, weights=u, minlength=len(records)) for u in used], axis=1) / counts[:, None]
    ok_i = np.stack([np.bincount(owner_m, weights=o.astype(np.float64), minlength=len(records)) for o in ok], axis=1) / counts[:, None]
    return used_i, ok_i


def mean_input_length(records: list[dict]) -> float:
    """N of the exit rule: the mean token length of the evaluation set's inputs (whole sentences or chunks)."""
    return float(np.mean([rec["length"] for rec in records]))


def blocks_saved(used: np.ndarray, accuracy: np.ndarray, retention: float) -> np.ndarray:
    """1 - the smallest fraction of blocks used at which the curve (points in lambda order, joined by straight
    lines, closed by the full model at (1, 1)) reaches ``retention``. Leading dimensions are kept (bootstrap)."""
    ones = np.ones(used.shape[:-1] + (1,))
    f = np.concatenate([used, ones], axis=-1)
    a = np.concatenate([accuracy, ones], axis=-1)
    best = np.where(a >= retention, f, np.inf).min(-1)
    f1, f2, a1, a2 = f[..., :-1], f[..., 1:], a[..., :-1], a[..., 1:]
    crosses = (a1 - retention) * (a2 - retention) < 0
    with np.errstate(divide="ignore", invalid="ignore"):
        at = f1 + (retention - a1) * (f2 - f1) / (a2 - a1)
    best = np.minimum(best, np.where(crosses, at, np.inf).min(-1))
    return 1.0 - best


def curve(records: list[dict], side: str = "lens") -> dict:
    """The set's curve: lambda grid, mean fraction of blocks used and accuracy, and blocks saved at each retention."""
    used, ok = item_table(records, side)
    u, a = used.mean(0), ok.mean(0)
    return {"lambdas": [round(x, 4) for x in LAMBDAS.tolist()], "fraction_used": [round(x, 6) for x in u.tolist()],
            "accuracy": [round(x, 6) for x in a.tolist()],
            "blocks_saved": {str(r): round(float(blocks_saved(u, a, r)), 6) for r in RETENTIONS}}


def paired_difference(records: list[dict], retention: float, seed: int, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Blocks saved by the projector minus its base on the same items, with a 95% percentile bootstrap interval:
    items are resampled and the whole curve of both is recomputed for each resample."""
    mean_length = mean_input_length(records)
    used, ok = item_table(records, "lens", mean_length=mean_length)
    bused, bok = item_table(records, "base", mean_length=mean_length)
    n = len(records)
    point = blocks_saved(used.mean(0), ok.mean(0), retention) - blocks_saved(bused.mean(0), bok.mean(0), retention)
    rng = np.random.default_rng(seed)
    weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)]) / n  # (B, items)
    diffs = (blocks_saved(weights @ used, weights @ ok, retention)
             - blocks_saved(weights @ bused, weights @ bok, retention))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"difference": float(point), "low": float(low), "high": float(high), "resamples": resamples, "seed": seed}


def _check(records: list[dict]) -> list[dict]:
    """The records in item order, each item once: lm-eval hands them over in the order the processes return them,
    and the bootstrap resamples by position, so the order is fixed here; an item twice must be the same record."""
    by_id: dict[str, dict] = {}
    for r in records:
        if not isinstance(r, dict):
            continue
        if by_id.setdefault(r["item_id"], r) != r:
            raise ValueError(f"item {r['item_id']} has two different exit records")
    if not by_id:
        raise ValueError("no exit record to aggregate")
    records = [by_id[k] for k in sorted(by_id)]
    if len({(r["blocks"], r.get("base_projector")) for r in records}) > 1:
        raise ValueError("exit records of different models or base projectors cannot be aggregated together")
    return records


def _saved(retention: float):
    def agg(records: list[dict]) -> float:
        records = _check(records)
        used, ok = item_table(records)
        return float(blocks_saved(used.mean(0), ok.mean(0), retention))
    agg.__name__ = f"blocks_saved_{_pct(retention)}"
    return agg


def _diff(retention: float, field: str):
    def agg(records: list[dict]) -> float:
        records = _check(records)
        return paired_difference(records, retention, int(records[0]["seed"]))[field]
    agg.__name__ = f"blocks_saved_{_pct(retention)}_{field}"
    return agg


# lm-eval aggregation functions, by metric name: each receives every item's record and recomputes the curve.
AGGREGATIONS = {**{SAVED[r]: _saved(r) for r in RETENTIONS},
                **{DIFF[r]: _diff(r, "difference") for r in RETENTIONS},
                **{DIFF_LOW[r]: _diff(r, "low") for r in RETENTIONS},
                **{DIFF_HIGH[r]: _diff(r, "high") for r in RETENTIONS}}
