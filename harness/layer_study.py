"""The layer-intervention study ("Transformer Layers as Painters", Sun et al. 2024) on one evaluation set.

For every intervention kind and every middle span [s, L-1-s] (start s = 1, 1 + every, ...; the first and last
blocks are never altered, as in the paper), the intervened model's final prediction at each scored position is
compared with the unmodified model's, which one reference pass per batch gives for all of them: P@1 (the two
top tokens agree), KL(p_unmodified || p_intervened), and cross-entropy to the true next token, beside the
unmodified model's own cross-entropy. Paired tests over items compare each intervention with the unmodified
model, and the interventions with each other where the paper makes a claim.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

from .encoding import batches
from .layer_interventions import intervened
from .layer_spec import LayerSpec
from .metrics import final_stats, lens_metrics_from, scores_or_nan
from .models import LensModel
from .stats import paired_bootstrap_ci, sign_flip_pvalue

log = logging.getLogger(__name__)
KINDS = ("skip", "middle_repeat", "reverse", "random", "parallel", "looped_parallel")
LOOPS = 3  # looped_parallel: times the parallel span is applied
LAYER_METRICS = ("p@1", "kl", "xent")
REFERENCE = "xent.none"  # the unmodified model's cross-entropy, per item
# Paired comparisons the paper makes a claim about: (better, worse, claim). The test is on cross-entropy,
# better - worse: the claim holds at a span where that difference is below 0.
CLAIMS = (
    ("skip", "middle_repeat", "repeating the middle block is worse than skipping the span"),
    ("random", "reverse", "a random order is better than the reverse order"),
    ("looped_parallel", "parallel", "looping the parallel span is better than one parallel pass"),
    ("parallel", "skip", "running the span in parallel is better than skipping it"),
)
RESAMPLES = 2000  # bootstrap resamples and sign flips per test


def starts(num_layers: int, every: int) -> list[int]:
    """Start layers s of the middle spans [s, L-1-s]: 1, 1 + every, ... while the span holds a block."""
    if num_layers < 3:
        raise ValueError(f"the layer study needs at least 3 blocks (a span between the first and the last), not {num_layers}")
    return list(range(1, (num_layers - 1) // 2 + 1, every))


def spec_of(kind: str, start: int, num_layers: int) -> LayerSpec:
    return LayerSpec(kind, start, num_layers - 1 - start, LOOPS if kind == "looped_parallel" else None)


def key(metric: str, kind: str, start: int) -> str:
    return f"{metric}.{kind}.S{start}"


def _scores(final, logits: torch.Tensor, targets: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """P@1, KL and cross-entropy (P,) of one intervened prediction, NaN where it is non-finite; how many those are."""
    values, bad = scores_or_nan(final, logits[None], targets, LAYER_METRICS)
    return {m: v[0] for m, v in values.items()}, bad


@torch.no_grad()
def study(lens: LensModel, encoded: list, every: int, seed: int, batch_size: int = 16,
          desc: str = "layer interventions") -> tuple[dict[str, dict[str, float]], dict]:
    """Per item id, every (metric, kind, start) value and the unmodified model's cross-entropy (means over the
    item's scored positions); and the study's record (spans, programs, non-finite counts)."""
    L = lens.num_layers
    spans = starts(L, every)
    index = {e.item_id: k for k, e in enumerate(encoded)}
    N = len(encoded)
    columns = [REFERENCE] + [key(m, kind, s) for kind in KINDS for s in spans for m in LAYER_METRICS]
    col = {c: j for j, c in enumerate(columns)}
    sums = torch.zeros(N, len(columns), dtype=torch.float64)
    counts = torch.zeros(N, dtype=torch.float64)
    nonfinite: dict[str, int] = defaultdict(int)
    programs: dict[str, list] = {}
    pad = lens.pad_id
    passes = 1 + len(KINDS) * len(spans)
    with tqdm(total=N * passes, desc=desc, unit="item-pass") as bar:
        for batch in batches(encoded, batch_size, pad):
            owner = torch.tensor([index[batch.encoded[o].item_id] for o in batch.owner.tolist()])
            args = (batch.input_ids, batch.attention_mask, batch.rows, batch.cols)
            reference = lens.readout(lens.capture(*args)[L]).float()
            final = final_stats(reference)
            counts.index_add_(0, owner, torch.ones(len(owner), dtype=torch.float64))
            own = lens_metrics_from(final, reference[None], batch.targets)["xent"][0]
            sums[:, col[REFERENCE]].index_add_(0, owner, own.double())
            bar.update(len(batch.encoded))
            for kind in KINDS:
                for s in spans:
                    spec = spec_of(kind, s, L)
                    with intervened(lens.model, spec, seed=seed, blocks=lens.blocks) as record:
                        logits = lens.readout(lens.capture(*args)[L])
                    programs.setdefault(spec.text, record.get("program"))
                    values, bad = _scores(final, logits, batch.targets)
                    if bad:
                        nonfinite[spec.text] += bad
                    for m, v in values.items():
                        sums[:, col[key(m, kind, s)]].index_add_(0, owner, v.double())
                    bar.update(len(batch.encoded))
    per_item = {e.item_id: {c: float(sums[k, j] / counts[k]) for c, j in col.items()} for k, e in enumerate(encoded)}
    if nonfinite:
        log.warning("layer study: the intervened model's prediction is non-finite (it diverged) at %s positions; those "
                    "values are NaN and the counts are in the provenance (nonfinite_positions)",
                    ", ".join(f"{k}: {v}" for k, v in sorted(nonfinite.items())))
    return per_item, {"kinds": list(KINDS), "starts": spans, "spans": {s: [s, L - 1 - s] for s in spans},
                      "layers_altered": {s: L - 2 * s for s in spans}, "loops": LOOPS, "every": every, "seed": seed,
                      "programs": programs, "passes_per_item": passes, "vocab_size": int(lens.unembed.weight.shape[0]),
                      "nonfinite_positions": dict(nonfinite)}


def _test(a: np.ndarray, b: np.ndarray, seed: int) -> dict:
    """mean(a - b) over the items where both are finite, its 95% BCa interval and the sign-flip p-value."""
    ok = np.isfinite(a) & np.isfinite(b)
    out = {"items": int(ok.sum()), "items_nonfinite": int((~ok).sum())}
    if ok.sum() < 2:
        return {**out, "diff": None, "lo": None, "hi": None, "p": None}
    lo, hi = paired_bootstrap_ci(a[ok], b[ok], n_resamples=RESAMPLES, seed=seed)
    return {**out, "diff": float(np.mean(a[ok] - b[ok])), "lo": lo, "hi": hi,
            "p": sign_flip_pvalue(a[ok], b[ok], n_resamples=RESAMPLES, seed=seed)}


def summarise(per_item: dict[str, dict[str, float]], info: dict, seed: int) -> dict:
    """From every item's values (all processes'): per kind and start the means, the normalised score
    (0: a uniform prediction's cross-entropy, 1: the unmodified model's), the paired test of cross-entropy
    against the unmodified model; and the paired tests of the paper's claims."""
    ids = sorted(per_item)
    column = lambda c: np.array([per_item[i][c] for i in ids], dtype=np.float64)  # noqa: E731
    ref = column(REFERENCE)
    log_v = math.log(info["vocab_size"])
    ref_mean = float(np.nanmean(ref))
    rows: dict[str, dict[str, dict]] = {}
    for kind in info["kinds"]:
        rows[kind] = {}
        for s in info["starts"]:
            means = {m: float(np.mean(column(key(m, kind, s)))) for m in LAYER_METRICS}  # NaN if any item diverged
            score = (log_v - means["xent"]) / (log_v - ref_mean) if math.isfinite(means["xent"]) else None
            rows[kind][str(s)] = {**means, "score": score, "vs_unmodified": _test(column(key("xent", kind, s)), ref, seed)}
    claims = []
    for a, b, claim in CLAIMS:
        tests = {str(s): _test(column(key("xent", a, s)), column(key("xent", b, s)), seed) for s in info["starts"]}
        claims.append({"a": a, "b": b, "claim": claim, "metric": "xent", "holds_if": "a - b < 0", "by_start": tests})
    return {"items": len(ids), "xent_unmodified": ref_mean, "log_vocab": log_v, "by_kind": rows, "claims": claims,
            "test": f"paired over items: mean difference, 95% BCa bootstrap interval and two-sided sign-flip p-value "
                    f"({RESAMPLES} resamples each)"}
