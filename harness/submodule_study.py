"""The paper's sub-module shortcuts: attention, the feed-forward or the norms of every block from a start layer on,
replaced by a linear map fitted from the sub-module's input to its output, and the model's final prediction then
scored against the unmodified model's. Baselines in the same pass: the sub-module removed, and mat jumping from the
start layer over the remaining blocks.

Maps are fitted like mat: float64 Gram statistics X^T X and X^T Y per mapped module, accumulated in one pass over the
fit items at their scored positions (the protocol's, the same positions mat is fitted on), then solved per module.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from .distributed import SINGLE, Group
from .encoding import batches
from .fitting import FitSpec, _uncached, fit_inputs, fit_warnings, model_key
from .metrics import final_stats, scores_or_nan
from .models import LensModel, _first_tensor
from .projectors.cache import load_entry, save_entry
from .projectors.least_squares import FitError, _solve_spd, ridge_penalty
from .provenance import versions
from .submodules import MODES, PARTS, BlockParts, _hidden_arg, intervene, map_and_verify, mapped_modules

log = logging.getLogger(__name__)
STUDY_METRICS = ("p@1", "surprisal", "kl")
# the per-item metric names of a part's task: the linear map, and the two baselines, at every start layer
PREFIX = {"linear": "", "removed": "removed_", "mat": "mat_"}


def start_layers(num_layers: int, every: int) -> list[int]:
    """Start layers 0, every, 2*every, ... below L: blocks start..L-1 are intervened on."""
    return list(range(0, num_layers, every))


def parts_of(lens: LensModel) -> tuple[list[BlockParts], dict]:
    """The verified sub-module map of ``lens``, made once per model object."""
    found = getattr(lens, "_jtc_submodule_parts", None)
    if found is None:
        found = map_and_verify(lens)
        lens._jtc_submodule_parts = found
    return found


@torch.no_grad()
def get_maps(lens: LensModel, spec: FitSpec, batch_size: int = 16, max_length: int | None = None,
             fingerprint: dict | None = None, group: Group = SINGLE) -> tuple[dict[str, torch.Tensor], dict]:
    """Linear maps (d, d) of every mapped module, v = x @ M, from the cache or fitted now."""
    parts, _ = parts_of(lens)
    modules = mapped_modules(parts)
    fingerprint = fingerprint or lens.fingerprint()
    corpus, encoded, too_short, data_hash = fit_inputs(lens, spec, max_length)
    ridge = spec.ridge if isinstance(spec.ridge, float) else 0.0
    key = {"kind": "submodule-maps", "model": model_key(fingerprint), "fit_data_sha256": data_hash, "fit_on": spec.fit_on,
           "protocol": spec.protocol.as_dict(), "n_fit": spec.n_fit, "ridge": ridge, "modules": sorted(modules)}
    cached = load_entry(key) if key["model"] else None
    if group.all(cached is not None):
        tensors, meta = cached
        return tensors, {**meta["info"], "cache": "hit"}
    start = time.perf_counter()
    d = lens.d_model
    names = sorted(modules)
    gram = {n: torch.zeros(d, d, dtype=torch.float64) for n in names}
    cross = {n: torch.zeros(d, d, dtype=torch.float64) for n in names}
    where: list = [None]  # (rows, cols) of the batch being run

    def make_hook(name):
        def hook(_m, args, kwargs, output):
            rows, cols = where[0]
            x = _hidden_arg(args, kwargs)[rows, cols].double().cpu()
            y = _first_tensor(output)[rows, cols].double().cpu()
            gram[name].addmm_(x.T, x)
            cross[name].addmm_(x.T, y)
        return hook

    pad = lens.pad_id
    share = group.shard(encoded)
    handles = [modules[n].register_forward_hook(make_hook(n), with_kwargs=True) for n in names]
    n_pos = 0
    try:
        with tqdm(total=len(share), desc=f"fit sub-module maps on {spec.fit_on}/train", unit="item") as bar:
            for batch in batches(share, batch_size, pad):
                where[0] = (batch.rows.to(lens.device), batch.cols.to(lens.device))
                lens.model.base_model(input_ids=batch.input_ids.to(lens.device),
                                      attention_mask=batch.attention_mask.to(lens.device))
                n_pos += len(batch.rows)
                bar.update(len(batch.encoded))
    finally:
        for h in handles:
            h.remove()
    totals = [gram[n] for n in names] + [cross[n] for n in names] + [torch.tensor([float(n_pos)], dtype=torch.float64)]
    group.sum_(totals)
    n_pos = int(totals[-1].item())
    maps = {}
    for n in names:
        g = ridge_penalty(gram[n], ridge) if ridge > 0 else gram[n]
        try:
            maps[n] = _solve_spd(g, cross[n]).float()
        except FitError as exc:
            raise FitError(f"sub-module map {n}: {exc}") from None
    info = {"fit_on": spec.fit_on, "fit_corpus_sha256": corpus.source_hash, "fit_split": "train",
            "fit_items": len(encoded), "fit_items_skipped": {"too_short": too_short}, "fit_positions": n_pos,
            "fit_data_sha256": data_hash, "ridge": ridge, "ridge_requested": spec.ridge,
            "accumulation": "float64 X^T X and X^T Y per mapped module, one pass, at the protocol's scored positions",
            "maps": len(maps), "fit_seconds": round(time.perf_counter() - start, 2),
            "warnings": fit_warnings(n_pos, d), "processes": group.world_size, "versions": versions()}
    if not key["model"]:
        info["cache"] = _uncached(fingerprint)
    elif group.is_main:
        meta = save_entry(key, maps, {"info": info})
        info = {**info, "cache": "miss", "cache_entry": meta["tensors_sha256"][:16]}
    info = group.gather(info)[0]
    return maps, info


@torch.no_grad()
def study(lens: LensModel, encoded: list, parts_wanted: list[str], maps: dict[str, torch.Tensor], mat, every: int,
          batch_size: int = 16, desc: str = "sub-modules") -> tuple[dict[str, dict[str, dict[str, float]]], dict]:
    """Per part, per item id, the metrics of the final prediction under every (mode, start layer) and of mat from
    the start layer, against the unmodified model's final prediction; and the count of non-finite values."""
    parts, _ = parts_of(lens)
    L = lens.num_layers
    starts = start_layers(L, every)
    index = {e.item_id: k for k, e in enumerate(encoded)}
    N = len(encoded)
    sums = {part: {(mode, m): torch.zeros(N, len(starts), dtype=torch.float64) for mode in (*MODES, "mat")
                   for m in STUDY_METRICS} for part in parts_wanted}
    counts = torch.zeros(N, dtype=torch.float64)
    nonfinite: dict[str, int] = defaultdict(int)
    pad = lens.pad_id
    passes = 1 + len(parts_wanted) * len(starts) * len(MODES)
    with tqdm(total=N * passes, desc=desc, unit="item-pass") as bar:
        for batch in batches(encoded, batch_size, pad):
            owner = torch.tensor([index[batch.encoded[o].item_id] for o in batch.owner.tolist()])
            args = (batch.input_ids, batch.attention_mask, batch.rows, batch.cols)
            states = lens.capture(*args)
            final = final_stats(lens.readout(states[L]).float())
            targets = batch.targets
            counts.index_add_(0, owner, torch.ones(len(owner), dtype=torch.float64))
            mat_logits = lens.readout(mat.project(states.float(), starts, L))  # (S, P, V)
            scores, bad = scores_or_nan(final, mat_logits, targets, STUDY_METRICS)
            if bad:
                nonfinite["mat"] += bad
            for m, v in scores.items():
                for part in parts_wanted:
                    sums[part][("mat", m)].index_add_(0, owner, v.T.double())
            bar.update(len(batch.encoded))
            for part in parts_wanted:
                for mode in MODES:
                    for s, start in enumerate(starts):
                        with intervene(parts, part, start, mode, maps):
                            logits = lens.readout(lens.capture(*args)[L])[None]
                        scores, bad = scores_or_nan(final, logits, targets, STUDY_METRICS)
                        if bad:
                            nonfinite[f"{part}/{mode}/L{start}"] += bad
                        for m, v in scores.items():
                            sums[part][(mode, m)][:, s].index_add_(0, owner, v[0].double())
                        bar.update(len(batch.encoded))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for part in parts_wanted:
        per_item: dict[str, dict[str, float]] = {}
        for k, e in enumerate(encoded):
            row = {}
            for (mode, m), values in sums[part].items():
                for s, start in enumerate(starts):
                    row[f"{PREFIX[mode]}{m}.L{start}"] = float(values[k, s] / counts[k])
            per_item[e.item_id] = row
        out[part] = per_item
    if nonfinite:
        log.warning("sub-module study: the intervened model's prediction is non-finite (it diverged) at %s positions; "
                    "those values are NaN and the counts are in the provenance (nonfinite_positions)",
                    ", ".join(f"{k}: {v}" for k, v in sorted(nonfinite.items())))
    return out, {"start_layers": starts, "every": every, "passes_per_item": passes,
                 "nonfinite_positions": dict(nonfinite),
                 "nonfinite_meaning": "positions whose final prediction was non-finite (the intervened model diverged); "
                                      "their metrics are NaN, so a mean over items containing one is NaN"}
