"""Scoring projectors: one forward pass per item serves every projector and every layer.

Requests name a projector, an evaluation set (distribution, split, protocol) and an item. Items
shared by several requests (the same sentence under id, mat and affine) are run once. Projected
logits are computed only at scored positions, all layers of a projector in one batched product.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .corpora import get_corpus
from .distributed import SINGLE, Group
from .encoding import batches, encode
from .fitting import FitSpec, TunedSpec, get_least_squares, get_tuned
from .metrics import LENS_METRICS, final_stats, lens_metrics_from, r2_per_item
from .models import LensModel
from .projectors import FITTED, LEAST_SQUARES, NAMES, IdentityProjector, Projector
from .protocols import Item, ProtocolConfig
from .provenance import model_record, peak_memory, utc_now, versions
from .store import sha256_json

log = logging.getLogger(__name__)
METRICS = LENS_METRICS + ("r2",)
# Upper bound on logits materialised at once (elements): keeps memory flat for large vocabularies.
LOGIT_BUDGET = 1 << 22
# ...but never fewer rows than this per product: each product reads the whole unembedding (670 MB for a
# 262k vocabulary), which a few rows cannot amortise.
MIN_LOGIT_ROWS = 128


@dataclass(frozen=True)
class EvalRequest:
    projector: str
    distribution: str
    split: str
    protocol: ProtocolConfig
    item: Item
    fit: FitSpec | TunedSpec | None = None

    def __post_init__(self):
        if self.projector not in NAMES:
            raise ValueError(f"unknown projector {self.projector!r}; known: {', '.join(NAMES)}")
        if (self.projector in FITTED) != (self.fit is not None):
            raise ValueError(f"projector {self.projector!r} {'needs' if self.projector in FITTED else 'takes no'} fit spec")
        if self.fit is not None and (self.projector == "tuned") != isinstance(self.fit, TunedSpec):
            raise ValueError(f"projector {self.projector!r} needs a {'TunedSpec' if self.projector == 'tuned' else 'FitSpec'}")

    @property
    def projector_key(self) -> tuple:
        return (self.projector, self.fit)

    @property
    def group_key(self) -> tuple:
        return (self.distribution, self.split, self.protocol)


# Provenance records of finished evaluations, by id; responses carry only the id.
PROVENANCE: dict[str, dict] = {}


class Engine:
    """Scores requests on one model. Under data parallelism (``group`` of several processes) each process
    gets its own share of the requests; projectors are fitted on all fit data together, and everything
    an item's metrics depend on beyond the item itself (the target variance of r^2) is summed over the group."""

    def __init__(self, lens: LensModel, batch_size: int = 16, max_length: int | None = None, group: Group = SINGLE):
        self.lens = lens
        self.batch_size = batch_size
        self.max_length = max_length
        self.group = group
        self.fingerprint = lens.fingerprint()

    def run(self, requests: list[EvalRequest]) -> list[dict]:
        start = time.perf_counter()
        by_group: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            by_group[r.group_key].append(i)
        # Every process fits and visits the same projectors and sets, in the same order, even those it has
        # no items of: the collectives inside must match up.
        wanted = {g: {requests[i].projector_key for i in idx} for g, idx in by_group.items()}
        merged: dict[tuple, set] = defaultdict(set)
        for theirs in self.group.gather(wanted):
            for g, keys in theirs.items():
                merged[g] |= keys
        projectors, fit_info = self._projectors(set().union(*merged.values()))
        results = {}
        for group in sorted(merged, key=repr):
            items: dict[str, Item] = {}
            for i in by_group.get(group, []):
                item = requests[i].item
                if items.setdefault(item.item_id, item) != item:
                    raise ValueError(f"two requests name item {item.item_id} with different contents")
            keys = sorted(merged[group], key=repr)
            results[group] = self.evaluate_set(group, list(items.values()), {k: projectors[k] for k in keys})
        resources = {"peak_memory": self.group.gather(peak_memory()), "processes": self.group.world_size,
                     "run_seconds": round(time.perf_counter() - start, 2), "run_requests": len(requests)}
        responses: list[dict | None] = [None] * len(requests)
        for i, r in enumerate(requests):
            per_item, prov = results[r.group_key][r.projector_key]
            prov_full = {**prov, **resources, "projector_config": self._projector_config(r, fit_info)}
            prov_id = sha256_json(prov_full)[:16]
            PROVENANCE[prov_id] = prov_full
            responses[i] = {**per_item[r.item.item_id], "provenance": prov_id}
        log.info("jtc: %d requests scored in %.1f s; peak memory %s", len(requests), time.perf_counter() - start,
                 resources["peak_memory"])
        return responses  # type: ignore[return-value]

    # -- projectors -------------------------------------------------------------------------------

    def _projectors(self, keys: set[tuple]) -> tuple[dict[tuple, Projector], dict]:
        out: dict[tuple, Projector] = {}
        fit_info = {}
        # Imported lenses first: a missing or mismatched lens stops the run before anything is fitted.
        for name, fit in sorted(keys, key=lambda k: (not _imported(k), repr(k))):
            if name == "id":
                out[(name, fit)] = IdentityProjector()
                continue
            if name == "tuned":
                out[(name, fit)], fit_info[fit] = get_tuned(self.lens, fit, self.fingerprint, self.group)
                continue
            if fit not in fit_info:
                fitted = get_least_squares(self.lens, fit, self.batch_size, self.max_length, self.fingerprint, self.group)
                fit_info[fit] = fitted.info
                out[("mat", fit)], out[("affine", fit)] = fitted.mat, fitted.affine
        return out, fit_info

    def _projector_config(self, request: EvalRequest, fit_info: dict) -> dict:
        if request.fit is None:
            return {"name": request.projector}
        extra = {"intercept": LEAST_SQUARES[request.projector]} if request.projector in LEAST_SQUARES else {}
        return {"name": request.projector, **extra, **request.fit.as_dict(),
                **{k: v for k, v in fit_info[request.fit].items() if k != "versions"}}

    # -- evaluation -------------------------------------------------------------------------------

    def evaluate_set(self, group: tuple, items: list[Item], projectors: dict[tuple, Projector]) -> dict:
        """Per-item values and provenance of each projector on one evaluation set (distribution, split, protocol)."""
        distribution, split, protocol = group
        lens, L, d = self.lens, self.lens.num_layers, self.lens.d_model
        encoded = [encode(it, lens.tokenizer, protocol, lens.masked, self.max_length) for it in items]
        index = {e.item_id: k for k, e in enumerate(encoded)}
        N = len(encoded)
        values = {key: {m: torch.zeros(N, L, dtype=torch.float64) for m in LENS_METRICS} for key in projectors}
        sq_err = {key: torch.zeros(N, L, d, dtype=torch.float32) for key in projectors}
        n_pos = torch.zeros(N, dtype=torch.float64)
        # per-item sums of the target and its square: the variance of any subset of items follows
        t_sum = torch.zeros(N, d, dtype=torch.float64)
        t_sq = torch.zeros(N, d, dtype=torch.float64)
        pad = lens.tokenizer.pad_token_id if lens.tokenizer.pad_token_id is not None else 0
        sources = list(range(L))
        with torch.no_grad(), tqdm(total=N, desc=f"jtc {distribution}/{split} ({len(projectors)} projectors)", unit="item") as bar:
            for batch in batches(encoded, self.batch_size, pad):
                owner = torch.tensor([index[batch.encoded[o].item_id] for o in batch.owner.tolist()])
                states = lens.capture(batch.input_ids, batch.attention_mask, batch.rows, batch.cols).float()
                target = states[L]
                t64 = target.double().cpu()
                t_sum.index_add_(0, owner, t64)
                t_sq.index_add_(0, owner, t64 * t64)
                n_pos.index_add_(0, owner, torch.ones(len(owner), dtype=torch.float64))
                final_logits = lens.readout(target).float()
                targets = batch.targets.to(final_logits.device)
                for key, projector in projectors.items():
                    projected = projector.project(states, sources, L)
                    for m, v in self._score(final_logits, projected, targets).items():
                        values[key][m].index_add_(0, owner, v.T.double().cpu())
                    diff = (projected - target[None]).float()
                    sq_err[key].index_add_(0, owner, (diff * diff).permute(1, 0, 2).cpu())
                bar.update(len(batch.encoded))
        # The evaluation set is the union of every process's items; an item that reached several processes
        # counts once, for the first of them.
        everyone = self.group.gather([(e.item_id, e.input_ids, e.positions, e.at_position_zero, e.bos_added) for e in encoded])
        owner: dict[str, int] = {}
        for rank, records in enumerate(everyone):
            for rec in records:
                owner.setdefault(rec[0], rank)
        union = sorted({rec[0]: rec for records in everyone for rec in records}.values())
        mine = torch.tensor([owner[e.item_id] == self.group.rank for e in encoded], dtype=torch.bool)
        pos0 = torch.tensor([e.at_position_zero for e in encoded], dtype=torch.bool)
        keep = mine & ~pos0
        var = self._set_variance(t_sum, t_sq, n_pos, mine)
        var_no0 = self._set_variance(t_sum, t_sq, n_pos, keep)
        # r^2 without the items at position 0: per projector, the sum over owned items and their count
        no0_sums = torch.zeros(len(projectors), L + 1, dtype=torch.float64)
        r2_all = {}
        for j, key in enumerate(projectors):
            r2_all[key] = r2_per_item(sq_err[key], n_pos, var)
            if keep.any():
                no0_sums[j, :L] = r2_per_item(sq_err[key][keep], n_pos[keep], var_no0).sum(0)
                no0_sums[j, L] = keep.sum()
        self.group.sum_([no0_sums])
        n_pos0 = sum(1 for rec in union if rec[3])
        prov = self._group_provenance(group, union, n_pos0)
        prov["items_per_process"] = [len(records) for records in everyone]
        out = {}
        for j, key in enumerate(projectors):
            r2 = r2_all[key]
            per_item = {}
            for k, e in enumerate(encoded):
                row = {}
                for m in LENS_METRICS:
                    layer_vals = (values[key][m][k] / n_pos[k]).tolist()
                    row.update({f"{m}.L{l}": layer_vals[l] for l in range(L)})
                    row[m] = sum(layer_vals) / L
                r2_vals = r2[k].tolist()
                row.update({f"r2.L{l}": r2_vals[l] for l in range(L)})
                row["r2"] = sum(r2_vals) / L
                row.update({"position": e.positions[0], "n_positions": len(e.positions), "n_tokens": len(e.input_ids)})
                per_item[e.item_id] = row
            key_prov = dict(prov)
            if 0 < n_pos0 < len(union):
                mean_no0 = no0_sums[j, :L] / no0_sums[j, L]
                key_prov["r2_by_layer_without_position_0"] = [round(x, 6) for x in mean_no0.tolist()]
            out[key] = (per_item, key_prov)
        return out

    def _set_variance(self, t_sum, t_sq, n_pos, rows: torch.Tensor) -> torch.Tensor:
        """Variance per target coordinate over all positions of the selected items of every process."""
        sums = [t_sum[rows].sum(0), t_sq[rows].sum(0), n_pos[rows].sum().reshape(1)]
        self.group.sum_(sums)
        return _variance(sums[0][None], sums[1][None], sums[2])

    def _score(self, final_logits: torch.Tensor, projected: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Lens metrics (S, P), the logits materialised a slice of positions and layers at a time.

        Slices stay near LOGIT_BUDGET elements (at least MIN_LOGIT_ROWS rows), small enough for the
        passes over each to run from cache; the final prediction's share of the metrics is computed once per slice of positions.
        When the readout ends in a plain linear map (no soft-capping), sum_v p_v z_v, the expected
        lens logit under the final distribution p, is (p W) . f + p . b for the normalised vector f:
        a (P, d) product per slice of positions instead of a pass over every layer's logits.
        """
        S, P, _ = projected.shape
        V = final_logits.shape[-1]
        lens = self.lens
        rows = max(MIN_LOGIT_ROWS, LOGIT_BUDGET // V)
        pos_step = max(1, min(P, rows))
        layer_step = max(1, rows // pos_step)
        linear = not lens.softcap and isinstance(lens.unembed, torch.nn.Linear)
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        for p0 in range(0, P, pos_step):
            final = final_stats(final_logits[p0:p0 + pos_step])
            if linear:
                pw = (final.probs @ lens.unembed.weight.float()).to(lens.dtype)  # (p, d)
                pb = final.probs @ lens.unembed.bias.float() if lens.unembed.bias is not None else None
            row: dict[str, list[torch.Tensor]] = defaultdict(list)
            for s0 in range(0, S, layer_step):
                features = lens.final_norm(projected[s0:s0 + layer_step, p0:p0 + pos_step].to(lens.dtype))
                logits = lens.readout_features(features)
                expected = None
                if linear:
                    expected = torch.linalg.vecdot(features, pw[None]).float()
                    if pb is not None:
                        expected = expected + pb[None]
                for m, v in lens_metrics_from(final, logits, targets[p0:p0 + pos_step], expected).items():
                    row[m].append(v)
            for m, v in row.items():
                parts[m].append(torch.cat(v, dim=0))
        return {m: torch.cat(v, dim=1) for m, v in parts.items()}

    def _group_provenance(self, group, union: list[tuple], n_pos0: int) -> dict:
        """``union``: (item id, token ids, scored positions, at position 0, BOS added) of every item of the set."""
        distribution, split, protocol = group
        corpus = get_corpus(distribution)
        return {
            "model": self.fingerprint,
            "model_record": model_record(getattr(self.lens.model.config, "_name_or_path", "") or ""),
            "distribution": distribution,
            "corpus_sha256": corpus.source_hash,
            "split": split,
            "protocol": protocol.as_dict(),
            "seed": protocol.seed,
            "items": len(union),
            "positions": sum(len(rec[2]) for rec in union),
            "items_data_sha256": sha256_json([list(rec[:3]) for rec in union]),
            "bos_added": any(rec[4] for rec in union),
            "items_at_position_0": n_pos0,
            "adapter_checks": {k: float(v) for k, v in self.lens.checks.items()},
            "dtype": str(self.lens.dtype).replace("torch.", ""),
            "device": str(self.lens.device),
            "versions": versions(),
            "date": utc_now(),
        }


def _imported(key: tuple) -> bool:
    return key[0] == "tuned" and bool(key[1].import_from)


def _variance(t_sum: torch.Tensor, t_sq: torch.Tensor, n_pos: torch.Tensor) -> torch.Tensor:
    """Population variance per coordinate of the target over all positions of the given items."""
    n = n_pos.sum()
    mean = t_sum.sum(0) / n
    return t_sq.sum(0) / n - mean * mean
