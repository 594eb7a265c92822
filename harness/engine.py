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

from . import early_exit, nonfinite
from .corpora import get_corpus
from .distributed import SINGLE, Group
from .encoding import ItemError, batches, encode_all
from .fitting import FitSpec, FittedLeastSquares, TunedSpec, get_least_squares, get_tuned
from .metrics import CONFIDENCE, LENS_METRICS, R2_METRICS, final_stats, lens_metrics_from, r2_from_weighted, r2_weights
from .models import LensModel
from .projectors import FITTED, LEAST_SQUARES, NAMES, IdentityProjector, Projector
from .protocols import NO_TARGET, Item, ProtocolConfig
from .provenance import model_record, peak_memory, utc_now, versions
from .squared_errors import SquaredErrors
from .store import sha256_json
from .submodules import PARTS

log = logging.getLogger(__name__)
METRICS = LENS_METRICS + R2_METRICS
# Upper bound on logits materialised at once (elements): keeps memory flat for large vocabularies.
LOGIT_BUDGET = 1 << 22
# ...but never fewer rows than this per product: each product reads the whole unembedding (670 MB for a
# 262k vocabulary), which a few rows cannot amortise.
MIN_LOGIT_ROWS = 128
ANALYSES = ("lens", "exit", "submodule", "layers")
EXIT_PROJECTORS = ("id", "mat", "tuned")


@dataclass(frozen=True)
class EvalRequest:
    projector: str
    distribution: str
    split: str
    protocol: ProtocolConfig
    item: Item
    fit: FitSpec | TunedSpec | None = None
    analysis: str = "lens"  # lens: the item's lens metrics; exit: its early-exit record
    base: tuple | None = None  # exit: the key (name, fit) of the projector it is paired with, on the same items
    part: str | None = None  # submodule: attn, ffn or norm (the request's projector, mat, is the baseline and its fit the maps')
    every: int = 1  # submodule, layers: every k-th start layer

    def __post_init__(self):
        if self.analysis not in ANALYSES:
            raise ValueError(f"unknown analysis {self.analysis!r}; known: {', '.join(ANALYSES)}")
        if self.analysis == "exit" and self.projector not in EXIT_PROJECTORS:
            raise ValueError(f"early exit is measured with {', '.join(EXIT_PROJECTORS)}, not {self.projector!r}")
        if self.analysis == "submodule" and (self.projector != "mat" or self.part not in PARTS):
            raise ValueError(f"a sub-module request names a part of {', '.join(PARTS)} (not {self.part!r}) and the mat "
                             "projector as its baseline and fit")
        if self.analysis == "layers" and self.projector != "id":
            raise ValueError("a layer-intervention request scores the model's own output: its projector is id")
        if self.base is not None and (self.analysis != "exit" or self.base[0] not in EXIT_PROJECTORS):
            raise ValueError(f"a paired base projector ({self.base[0]!r}) is for early exit with {', '.join(EXIT_PROJECTORS)}")
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
    def projector_keys(self) -> tuple:
        """Every projector the request needs scored: its own and its paired base."""
        return (self.projector_key,) + ((self.base,) if self.base is not None else ())

    @property
    def group_key(self) -> tuple:
        return (self.distribution, self.split, self.protocol)


class Engine:
    """Scores requests on one model. Under data parallelism (``group`` of several processes) each process
    gets its own share of the requests; projectors are fitted on all fit data together, and everything
    an item's metrics depend on beyond the item itself (the target variance of r^2) is summed over the group."""

    def __init__(self, lens: LensModel, batch_size: int = 16, max_length: int | None = None, group: Group = SINGLE,
                 on_nonfinite: str = "error"):
        self.lens = lens
        self.on_nonfinite = nonfinite.check_mode(on_nonfinite)
        self.batch_size = batch_size
        self.max_length = max_length
        self.group = group
        self.fingerprint = lens.fingerprint()
        self._fitted: dict[FitSpec, FittedLeastSquares] = {}

    def run(self, requests: list[EvalRequest]) -> list[dict]:
        """One dict per request: the item's metric values, and under "provenance" the record of how they were
        obtained (one record object shared by every item of the same evaluation set and projector)."""
        responses: list[dict | None] = [None] * len(requests)
        for analyses, runner in ((("lens", "exit"), self._run_lenses), (("submodule",), self._run_submodules),
                                 (("layers",), self._run_layers)):
            # every runner runs, even with no request here: under data parallelism its collectives must match up
            mine = [i for i, r in enumerate(requests) if r.analysis in analyses]
            for i, response in zip(mine, runner([requests[i] for i in mine])):
                responses[i] = response
        return responses  # type: ignore[return-value]

    def _run_layers(self, requests: list[EvalRequest]) -> list[dict]:
        """The layer-intervention study of every (evaluation set, every) asked for, each process on its items; the
        per-item values of all processes are gathered for the paired tests."""
        from .layer_interventions import active_record
        from .layer_study import study, summarise

        active = active_record(self.lens.blocks)
        if requests and active is not None:
            raise ValueError(f"jtc_layers_* tasks intervene on the model themselves, but it already runs under "
                             f"jtc_layers={active['spec']}: run them without jtc_layers")
        by_key: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            by_key[(r.group_key, r.every)].append(i)
        keys: set = set()
        for theirs in self.group.gather(sorted(by_key, key=repr)):
            keys |= set(theirs)
        responses: list[dict | None] = [None] * len(requests)
        for key in sorted(keys, key=repr):
            group, every = key
            distribution, split, protocol = group
            encoded, too_short = encode_all(self._items_of(requests, by_key.get(key, [])), self.lens.tokenizer, protocol,
                                            self.lens.masked, self.max_length)
            values, info = study(self.lens, encoded, every, protocol.seed, self.batch_size,
                                 desc=f"jtc layer interventions {distribution}/{split}")
            everyone = {k: v for theirs in self.group.gather(values) for k, v in theirs.items()}
            info = {**info, "nonfinite_positions": self._summed(info["nonfinite_positions"]),
                    "nonfinite_meaning": "positions whose final prediction was non-finite (the intervened model "
                                         "diverged); their metrics are NaN, so a mean over items containing one is NaN"}
            prov = self._set_provenance(group, encoded)
            record = {**prov, "projector_config": {"name": "id"},
                      "layers": {**info, "summary": summarise(everyone, info, protocol.seed) if everyone else None}}
            record = {**record, "record_id": sha256_json(record)[:16]}
            for i in by_key.get(key, []):
                item_id = requests[i].item.item_id
                if item_id in too_short:
                    responses[i] = {"skipped": too_short[item_id], "provenance": record}
                else:
                    responses[i] = {**values[item_id], "provenance": record}
        return responses  # type: ignore[return-value]

    def _run_submodules(self, requests: list[EvalRequest]) -> list[dict]:
        """The sub-module study of every (evaluation set, fit, every) asked for, on every process together."""
        from .submodule_study import get_maps, parts_of, study

        by_key: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            by_key[(r.group_key, r.fit, r.every)].append(i)
        merged: dict[tuple, set] = defaultdict(set)
        for theirs in self.group.gather({k: {requests[i].part for i in idx} for k, idx in by_key.items()}):
            for k, wanted in theirs.items():
                merged[k] |= wanted
        responses: list[dict | None] = [None] * len(requests)
        for key in sorted(merged, key=repr):
            group, fit, every = key
            distribution, split, protocol = group
            parts, adapter = parts_of(self.lens)
            maps, map_info = get_maps(self.lens, fit, self.batch_size, self.max_length, self.fingerprint, self.group)
            projectors, fit_info = self._projectors({("mat", fit)})
            encoded, too_short = encode_all(self._items_of(requests, by_key.get(key, [])), self.lens.tokenizer, protocol,
                                            self.lens.masked, self.max_length)
            values, info = study(self.lens, encoded, sorted(merged[key]), maps, projectors[("mat", fit)], every,
                                 self.batch_size, desc=f"jtc sub-modules {distribution}/{split}")
            # every process's diverged positions, not this one's alone
            info = {**info, "nonfinite_positions": self._summed(info["nonfinite_positions"])}
            prov = self._set_provenance(group, encoded)
            records = {}
            for part in sorted(merged[key]):
                baseline = EvalRequest("mat", distribution, split, protocol, Item("-", "", 0.0), fit)
                record = {**prov, "projector_config": self._projector_config(baseline, fit_info),
                          "submodule": {"part": part, "maps": map_info, **info,
                                        "adapter_recomposition": {k: float(v) for k, v in adapter.items()},
                                        "layouts": sorted({p.layout for p in parts}), "wiring_block_0": parts[0].wiring}}
                records[part] = {**record, "record_id": sha256_json(record)[:16]}
            for i in by_key.get(key, []):
                r = requests[i]
                item_id = r.item.item_id
                if item_id in too_short:
                    responses[i] = {"skipped": too_short[item_id], "provenance": records[r.part]}
                else:
                    responses[i] = {**values[r.part][item_id], "provenance": records[r.part]}
        return responses  # type: ignore[return-value]

    @staticmethod
    def _items_of(requests: list[EvalRequest], indices: list[int]) -> list[Item]:
        """The distinct items of ``requests[indices]`` (one per id), in request order; two different items under
        one id stop the run."""
        items: dict[str, Item] = {}
        for i in indices:
            item = requests[i].item
            if items.setdefault(item.item_id, item) != item:
                raise ValueError(f"two requests name item {item.item_id} with different contents")
        return list(items.values())

    def _summed(self, counts: dict[str, int]) -> dict[str, int]:
        """Per key, the counts of every process added up."""
        total: dict[str, int] = defaultdict(int)
        for theirs in self.group.gather(counts):
            for k, n in theirs.items():
                total[k] += n
        return dict(total)

    def _set_provenance(self, group: tuple, encoded: list) -> dict:
        """The evaluation set's provenance from every process's encoded items (each item once)."""
        gathered = self.group.gather([(e.item_id, e.input_ids, e.positions, e.at_position_zero, e.bos_added)
                                      for e in encoded])
        union = sorted({rec[0]: rec for records in gathered for rec in records}.values())
        return self._group_provenance(group, union, sum(1 for rec in union if rec[3]))

    def _run_lenses(self, requests: list[EvalRequest]) -> list[dict]:
        start = time.perf_counter()
        by_group: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            by_group[r.group_key].append(i)
        # Every process fits and visits the same projectors and sets, in the same order, even those it has
        # no items of: the collectives inside must match up.
        wanted = {g: {k for i in idx for k in requests[i].projector_keys} for g, idx in by_group.items()}
        exits = {g: {k for i in idx if requests[i].analysis == "exit" for k in requests[i].projector_keys}
                 for g, idx in by_group.items()}
        merged: dict[tuple, set] = defaultdict(set)
        merged_exits: dict[tuple, set] = defaultdict(set)
        for theirs, their_exits in self.group.gather((wanted, exits)):
            for g, keys in theirs.items():
                merged[g] |= keys
            for g, keys in their_exits.items():
                merged_exits[g] |= keys
        projectors, fit_info = self._projectors(set().union(*merged.values()))
        results = {}
        for group in sorted(merged, key=repr):
            keys = sorted(merged[group], key=repr)
            results[group] = self.evaluate_set(group, self._items_of(requests, by_group.get(group, [])),
                                               {k: projectors[k] for k in keys},
                                               exit_keys=merged_exits[group])
        resources = {"peak_memory": self.group.gather(peak_memory()), "processes": self.group.world_size,
                     "run_seconds": round(time.perf_counter() - start, 2), "run_requests": len(requests)}
        responses: list[dict | None] = [None] * len(requests)
        records: dict[tuple, dict] = {}  # one provenance record per evaluation set and projector, shared by its items
        for i, r in enumerate(requests):
            per_item, prov = results[r.group_key][r.projector_key]
            key = (r.group_key, r.projector_key, r.analysis, r.base)
            if key not in records:
                record = {**prov, **resources, "projector_config": self._projector_config(r, fit_info)}
                if r.analysis == "exit":
                    record["exit"] = self._exit_summary(r, results[r.group_key], fit_info)
                records[key] = {**record, "record_id": sha256_json(record)[:16]}
            values = per_item[r.item.item_id]
            if r.analysis == "exit" and "skipped" not in values:
                values = {"exit": self._exit_record(r, results[r.group_key]["exit"], r.item.item_id)}
            responses[i] = {**values, "provenance": records[key]}
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
                out[(name, fit)], fit_info[fit] = get_tuned(self.lens, fit, self.fingerprint, self.group,
                                                            least_squares=self._least_squares, max_length=self.max_length)
                continue
            fitted = self._least_squares(fit)
            fit_info[fit] = fitted.info
            out[("mat", fit)], out[("affine", fit)] = fitted.mat, fitted.affine
        return out, fit_info

    def _least_squares(self, spec: FitSpec) -> FittedLeastSquares:
        """mat and affine fitted on ``spec``, once per engine: the lens tasks, the sub-module baseline and the tuned
        lens's warm start of one run share them (without a usable cache, they would otherwise be fitted again)."""
        if spec not in self._fitted:
            self._fitted[spec] = get_least_squares(self.lens, spec, self.batch_size, self.max_length, self.fingerprint,
                                                   self.group, on_nonfinite=self.on_nonfinite)
        return self._fitted[spec]

    # -- early exit -------------------------------------------------------------------------------

    def _exit_record(self, request: EvalRequest, exit_data: dict, item_id: str) -> dict:
        """An item's early-exit record: its positions, and per exit layer the confidence and correctness of the
        projector and of its paired base (what the lm-eval aggregation recomputes the curve from)."""
        mine = exit_data["items"][item_id]
        record = {"item_id": item_id, "blocks": self.lens.num_layers, "length": mine["length"], "t": mine["t"],
                  "lens": mine["by_projector"][request.projector_key], "seed": request.protocol.seed,
                  "base_projector": request.base[0] if request.base else None}
        if request.base is not None:
            record["base"] = mine["by_projector"][request.base]
        return record

    def _exit_summary(self, request: EvalRequest, group_results: dict, fit_info: dict) -> dict:
        """The evaluation set's exit curve (every process's items), and the paired difference with the base."""
        exit_data = group_results["exit"]
        records = [self._exit_record(request, exit_data, item_id) for item_id in sorted(exit_data["items"])]
        summary = {"rule": "exit at the first layer l in 1..L-1 whose confidence p_top1 - p_top2 exceeds "
                           "0.9*lambda + 0.1*exp(-4 t / N); no exit: all L blocks and the model's own output",
                   "items": len(records), "mean_input_length": round(early_exit.mean_input_length(records), 4),
                   "curve": early_exit.curve(records)}
        if request.base is not None:
            summary["base"] = {"projector": request.base[0],
                               "config": self._projector_config(EvalRequest(request.base[0], *request.group_key,
                                                                            request.item, request.base[1]), fit_info),
                               "curve": early_exit.curve(records, "base")}
            summary["paired_difference"] = {str(r): early_exit.paired_difference(records, r, request.protocol.seed)
                                            for r in early_exit.RETENTIONS}
        return summary

    def _projector_config(self, request: EvalRequest, fit_info: dict) -> dict:
        if request.fit is None:
            return {"name": request.projector}
        extra = {"intercept": LEAST_SQUARES[request.projector]} if request.projector in LEAST_SQUARES else {}
        return {"name": request.projector, **extra, **request.fit.as_dict(),
                **{k: v for k, v in fit_info[request.fit].items() if k != "versions"}}

    # -- evaluation -------------------------------------------------------------------------------

    def evaluate_set(self, group: tuple, items: list[Item], projectors: dict[tuple, Projector],
                     exit_keys: set | frozenset = frozenset()) -> dict:
        """Per-item values and provenance of each projector on one evaluation set (distribution, split, protocol).
        For the projectors in ``exit_keys``, also the per-position exit values of every process's items,
        under the key "exit"."""
        lens = self.lens
        encoded, too_short = encode_all(items, lens.tokenizer, group[2], lens.masked, self.max_length)
        # on disk, not in memory: r^2 weighs each item's errors by the whole set's variance, known only at the end
        sq_err = {key: SquaredErrors(len(encoded), lens.num_layers, lens.d_model) for key in projectors}
        try:
            return self._score_set(group, items, encoded, too_short, projectors, exit_keys, sq_err)
        finally:
            for errors in sq_err.values():
                errors.close()

    def _score_set(self, group: tuple, items: list[Item], encoded: list, too_short: dict, projectors: dict,
                   exit_keys, sq_err: dict[tuple, SquaredErrors]) -> dict:
        distribution, split, protocol = group
        lens, L, d = self.lens, self.lens.num_layers, self.lens.d_model
        index = {e.item_id: k for k, e in enumerate(encoded)}
        N = len(encoded)
        values = {key: {m: torch.zeros(N, L, dtype=torch.float64) for m in LENS_METRICS} for key in projectors}
        n_pos = torch.zeros(N, dtype=torch.float64)
        n_next = torch.zeros(N, dtype=torch.float64)  # scored positions with a next token: those cross-entropy averages
        # per-item sums of the target and its square: the variance of any subset of items follows
        t_sum = torch.zeros(N, d, dtype=torch.float64)
        t_sq = torch.zeros(N, d, dtype=torch.float64)
        bad_model: dict[str, dict] = {}  # items with non-finite hidden states or final logits
        bad_projector: dict[str, dict] = {}  # items a projector turned non-finite (a projector fault: never dropped)
        pad = lens.pad_id
        sources = list(range(L))
        exit_parts: dict[tuple, list] = {key: [] for key in exit_keys}  # (owner, token position, confidence, correct)
        with torch.no_grad(), tqdm(total=N, desc=f"jtc {distribution}/{split} ({len(projectors)} projectors)", unit="item") as bar:
            for batch in batches(encoded, self.batch_size, pad):
                bar.update(len(batch.encoded))
                owner = torch.tensor([index[batch.encoded[o].item_id] for o in batch.owner.tolist()])
                states = lens.capture(batch.input_ids, batch.attention_mask, batch.rows, batch.cols).float()
                final_logits = lens.readout(states[L]).float()
                targets = batch.targets.to(final_logits.device)
                cols = batch.cols
                mask, first = nonfinite.bad_positions(states, final_logits)
                if mask.any():
                    # the item leaves before anything is pooled over items (r^2's target variance)
                    found = nonfinite.per_item([e.item_id for e in encoded], owner, mask, first)
                    bad_model.update(found)
                    keep = torch.tensor([encoded[o].item_id not in found for o in owner.tolist()])
                    owner, targets, cols = owner[keep], targets[keep.to(targets.device)], cols[keep]
                    states, final_logits = states[:, keep.to(states.device)], final_logits[keep.to(final_logits.device)]
                if not len(owner) or (bad_model and self.on_nonfinite == "error"):
                    continue  # the run will stop: only the list of bad items is still wanted
                target = states[L]
                t64 = target.double().cpu()
                t_sum.index_add_(0, owner, t64)
                t_sq.index_add_(0, owner, t64 * t64)
                n_pos.index_add_(0, owner, torch.ones(len(owner), dtype=torch.float64))
                has_next = targets >= 0
                n_next.index_add_(0, owner, has_next.double().cpu())
                # a slice of positions at a time: the final prediction's share is computed once for every projector
                pos_step, layer_step = self._steps(len(owner), final_logits.shape[-1])
                for p0 in range(0, len(owner), pos_step):
                    sl = slice(p0, p0 + pos_step)
                    part = self._final_part(final_logits[sl])
                    for key, projector in projectors.items():
                        projected = projector.project(states[:, sl], sources, L)
                        scores = self._slice_scores(part, projected, targets[sl], layer_step)
                        confidence = scores.pop(CONFIDENCE)
                        if key in exit_parts:  # exit points: the states after blocks 1..L-1
                            exit_parts[key].append((owner[sl], cols[sl], confidence[1:].T.cpu(), scores["p@1"][1:].T.cpu()))
                        # undefined without a next token, not 0: n_next counts the positions that have one
                        scores["xent"] = torch.where(has_next[sl][None], scores["xent"], 0.0)
                        self._note_nonfinite(key, projected, scores, owner[sl], encoded, bad_projector)
                        for m, v in scores.items():
                            values[key][m].index_add_(0, owner[sl], v.T.double().cpu())
                        diff = (projected - target[None, sl]).float()
                        sq_err[key].add(owner[sl], diff * diff)
        # The evaluation set is the union of every process's items; an item that reached several processes
        # counts once, for the first of them. Every process learns of every problem before any of them stops.
        gathered = self.group.gather(([(e.item_id, e.input_ids, e.positions, e.at_position_zero, e.bos_added,
                                        NO_TARGET in e.targets) for e in encoded],
                                      too_short, bad_model, bad_projector))
        where = f"{distribution}/{split}"
        too_short_all = {k: v for g in gathered for k, v in g[1].items()}
        dropped = self._bad_items_agreed([g[2] for g in gathered], [g[3] for g in gathered], where)
        everyone = [[rec for rec in g[0] if rec[0] not in dropped] for g in gathered]
        owner: dict[str, int] = {}
        for rank, records in enumerate(everyone):
            for rec in records:
                owner.setdefault(rec[0], rank)
        union = sorted({rec[0]: rec for records in everyone for rec in records}.values())
        if not union:
            raise ItemError(f"no item of {where} can be scored: {len(too_short_all)} too short "
                            f"(e.g. {next(iter(too_short_all.values()), 'none')}), {len(dropped)} with non-finite values")
        if too_short_all:
            log.warning("jtc: %d item(s) of %s are too short to score; they are skipped and listed in the provenance",
                        len(too_short_all), where)
        mine = torch.tensor([owner.get(e.item_id) == self.group.rank for e in encoded], dtype=torch.bool)
        pos0 = torch.tensor([e.at_position_zero for e in encoded], dtype=torch.bool)
        scored = torch.tensor([e.item_id not in dropped for e in encoded], dtype=torch.bool)
        var = self._set_variance(t_sum, t_sq, n_pos, mine)
        var_without_pos0 = self._set_variance(t_sum, t_sq, n_pos, mine & ~pos0)
        # one read of each projector's errors: r^2 and r2w against the whole set's variance, then without position 0
        weighted = {key: sq_err[key].weighted_sums(torch.cat([r2_weights(var), r2_weights(var_without_pos0)], dim=1))
                    for key in projectors}
        r2 = {key: {m: r2_from_weighted(w[..., i], n_pos) for i, m in enumerate(R2_METRICS)} for key, w in weighted.items()}
        r2_without_pos0 = {key: {m: r2_from_weighted(w[..., len(R2_METRICS) + i], n_pos) for i, m in enumerate(R2_METRICS)}
                           for key, w in weighted.items()}
        # dropped items have no position, and items drawn at their last token no cross-entropy: those values are
        # not reported (lm-eval then leaves them out of the means), never reported as 0
        divisor = {m: (n_next if m == "xent" else n_pos).clamp_min(1)[:, None] for m in LENS_METRICS}
        present = {"xent": n_next > 0}
        item_values = {key: {**{m: values[key][m] / divisor[m] for m in LENS_METRICS},
                             **r2[key]}
                       for key in projectors}
        n_pos0 = sum(1 for rec in union if rec[3])
        without_pos0 = self._means_without_position_0(mine & ~pos0, r2_without_pos0, item_values, present)
        prov = self._group_provenance(group, union, n_pos0)
        prov["items_skipped"] = {"too_short": sorted(too_short_all), "nonfinite": sorted(dropped)}
        prov["on_nonfinite"] = self.on_nonfinite
        prov["items_per_process"] = [len(records) for records in everyone]
        if protocol.name == "paper" and not lens.masked:
            prov["position_draw"] = protocol.position_draw
            if protocol.position_draw == "all":  # drawn at their last token: no next token, no cross-entropy
                prov["items_without_next_token"] = sorted(rec[0] for rec in union if rec[5])
        if n_pos0 < len(union):  # (under the dense protocol every item is)
            prov["items_at_position_0_ids"] = sorted(rec[0] for rec in union if rec[3])
        out = {}
        for key in projectors:
            per_item = {}
            for k, e in enumerate(encoded):
                if not scored[k]:
                    per_item[e.item_id] = {"skipped": "non-finite values from "
                                           + nonfinite.layer_name(dropped[e.item_id]["layer"], L)}
                    continue
                row = {}
                for m, v in item_values[key].items():
                    if m in present and not present[m][k]:
                        continue
                    layer_vals = v[k].tolist()
                    row.update({f"{m}.L{l}": layer_vals[l] for l in range(L)})
                    if m in LENS_METRICS:  # r^2 has no layer mean (see R2_METRICS)
                        row[m] = sum(layer_vals) / L
                row.update({"position": e.positions[0], "n_positions": len(e.positions), "n_tokens": len(e.input_ids)})
                per_item[e.item_id] = row
            for item_id, reason in too_short.items():
                per_item[item_id] = {"skipped": reason}  # no metric values: lm-eval leaves it out of every mean
            key_prov = dict(prov)
            if 0 < n_pos0 < len(union):
                key_prov["without_position_0"] = without_pos0[key]
            out[key] = (per_item, key_prov)
        self._check_same_metrics(items, out, where)
        if exit_keys:
            out["exit"] = self._exit_values(exit_parts, encoded, dropped)
        return out

    def _exit_values(self, exit_parts: dict, encoded: list, dropped: dict) -> dict:
        """Per item of every process (an item several processes scored: the first one's), its length, scored
        token positions and, per projector, confidence and correctness at exit layers 1..L-1, per position."""
        mine = {e.item_id: {"length": e.length, "t": [], "by_projector": {key: {"conf": [], "correct": []} for key in exit_parts}}
                for e in encoded if e.item_id not in dropped}
        first = next(iter(exit_parts), None)  # every projector saw the same positions in the same order: one records t
        for key, parts in exit_parts.items():
            for owner, cols, conf, correct in parts:
                for o, t, c, ok in zip(owner.tolist(), cols.tolist(), conf.tolist(), correct.tolist()):
                    entry = mine[encoded[o].item_id]
                    if key == first:
                        entry["t"].append(t)
                    entry["by_projector"][key]["conf"].append([round(x, 5) for x in c])
                    entry["by_projector"][key]["correct"].append([int(x) for x in ok])
        every: dict[str, dict] = {}
        for theirs in self.group.gather(mine):
            for item_id, entry in theirs.items():
                every.setdefault(item_id, entry)
        return {"items": every}

    def _check_same_metrics(self, items: list, out: dict, where: str) -> None:
        """Every process that scored items of a set must report the same metrics: lm-eval 0.4.13 merges the
        processes' values metric by metric as named on the first process, so a metric some process lacks would
        fail the merge there (KeyError) or vanish from the results."""
        mine = {k.split(".")[0] for per_item, _ in out.values() for row in per_item.values() for k in row
                if k.split(".")[0] in METRICS}
        theirs = self.group.gather((bool(items), sorted(mine)))
        keysets = {tuple(keys) for has_items, keys in theirs if has_items}
        if len(keysets) > 1:
            detail = "; ".join(f"process {r}: {', '.join(keys) or 'none'}" for r, (has, keys) in enumerate(theirs) if has)
            raise ItemError(f"{where}: the processes have values of different metrics ({detail}), which lm-eval cannot "
                            "combine; some process has no scorable item (or no item with a next token). Run with fewer processes")

    def _means_without_position_0(self, rows: torch.Tensor, r2_of_rows: dict, item_values, present) -> dict:
        """Per projector, every metric's per-layer mean over the items not scored at position 0 (``rows``: this
        process's share of them) that have a value of it, summed over processes. r^2 is taken against the
        variance of those items (``r2_of_rows``: per-item r^2 under that variance)."""
        keys = list(item_values)
        metrics = list(item_values[keys[0]]) if keys else []
        sums = torch.zeros(len(keys), len(metrics), self.lens.num_layers, dtype=torch.float64)
        counts = torch.zeros(len(metrics), dtype=torch.float64)
        for i, m in enumerate(metrics):
            chosen = rows & present[m] if m in present else rows
            counts[i] = chosen.sum()
            for j, key in enumerate(keys):
                source = r2_of_rows[key] if m in R2_METRICS else item_values[key]
                sums[j, i] = source[m][chosen].sum(0)
        self.group.sum_([sums, counts])
        n = int(counts[metrics.index("p@1")].item()) if metrics else 0
        out = {}
        for j, key in enumerate(keys):
            means = {m: [round(x, 6) for x in (sums[j, i] / counts[i]).tolist()] for i, m in enumerate(metrics) if counts[i] > 0}
            extra = {f"items_{m}": int(counts[i]) for i, m in enumerate(metrics) if int(counts[i]) != n}
            out[key] = {"items": n, **extra, "means": means}
        return out

    def _note_nonfinite(self, key: tuple, projected: torch.Tensor, scores: dict, owner: torch.Tensor,
                        encoded: list, bad: dict) -> None:
        """Record items whose projected states or metrics a projector made non-finite (from finite hidden states)."""
        flags = ~torch.isfinite(projected).all(dim=-1)  # (S, P)
        for v in scores.values():
            flags |= ~torch.isfinite(v).to(flags.device)
        if flags.any():
            for o, layer in zip(owner[flags.any(0).cpu()].tolist(), flags.int().argmax(0)[flags.any(0)].tolist()):
                bad.setdefault(encoded[o].item_id, {"projector": key[0], "layer": layer})

    def _bad_items_agreed(self, bad_model: list[dict], bad_projector: list[dict], where: str) -> dict[str, dict]:
        """Items to drop, the same on every process; or the error that stops the run, raised on every process."""
        projector = {k: v for theirs in bad_projector for k, v in theirs.items()}
        if projector:
            some = sorted(projector.items())[:5]
            raise nonfinite.NonFiniteError(
                f"projector output is non-finite on {len(projector)} item(s) of {where} whose hidden states are finite: "
                + "; ".join(f"{k} ({v['projector']}, layer {v['layer']})" for k, v in some)
                + ". The projector, not the model, is at fault (a fit on non-finite or degenerate data?)")
        model = {k: v for theirs in bad_model for k, v in theirs.items()}
        if model and self.on_nonfinite == "error":
            raise nonfinite.NonFiniteError(nonfinite.message(self.lens.name, where, model, self.lens.num_layers))
        if model:
            log.warning("jtc: %d item(s) of %s have non-finite hidden states or logits; dropped and listed in the provenance",
                        len(model), where)
        return model

    def _set_variance(self, t_sum, t_sq, n_pos, rows: torch.Tensor) -> torch.Tensor:
        """Variance per target coordinate over all positions of the selected items of every process."""
        sums = [t_sum[rows].sum(0), t_sq[rows].sum(0), n_pos[rows].sum().reshape(1)]
        self.group.sum_(sums)
        return _variance(sums[0][None], sums[1][None], sums[2])

    def _score(self, final_logits: torch.Tensor, projected: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Lens metrics (S, P) of one projector's states at P positions, the way the engine computes them."""
        S, P, _ = projected.shape
        pos_step, layer_step = self._steps(P, final_logits.shape[-1])
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        for p0 in range(0, P, pos_step):
            sl = slice(p0, p0 + pos_step)
            for m, v in self._slice_scores(self._final_part(final_logits[sl]), projected[:, sl], targets[sl], layer_step).items():
                parts[m].append(v)
        return {m: torch.cat(v, dim=1) for m, v in parts.items()}

    def _steps(self, P: int, V: int) -> tuple[int, int]:
        """Positions and layers per slice of logits: near LOGIT_BUDGET elements (at least MIN_LOGIT_ROWS rows),
        small enough for the passes over each slice to run from cache."""
        rows = max(MIN_LOGIT_ROWS, LOGIT_BUDGET // V)
        pos_step = max(1, min(P, rows))
        return pos_step, max(1, rows // pos_step)

    def _final_part(self, final_logits: torch.Tensor) -> tuple:
        """What every layer and projector needs from the final prediction at a slice of positions.

        When the readout ends in a plain linear map (no soft-capping), sum_v p_v z_v, the expected lens logit
        under the final distribution p, is (p W) . f + p . b for the normalised vector f: a (P, d) product per
        slice of positions instead of a pass over every layer's logits.
        """
        lens = self.lens
        final = final_stats(final_logits)
        if lens.softcap or not isinstance(lens.unembed, torch.nn.Linear):
            return final, None, None
        # p W in float32 (a float64 product would need W in float64, 1.3 GB for 262k x 640, or its conversion at every
        # slice); the dot product with f in float64, also for low-precision models
        pw = (final.probs @ lens.unembed.weight.float()).double()  # (p, d)
        pb = final.probs.double() @ lens.unembed.bias.double() if lens.unembed.bias is not None else None
        return final, pw, pb

    def _slice_scores(self, part: tuple, projected: torch.Tensor, targets: torch.Tensor, layer_step: int) -> dict[str, torch.Tensor]:
        """Lens metrics (S, p) of projected states (S, p, d) at a slice of positions, a few layers' logits at a time."""
        final, pw, pb = part
        lens = self.lens
        out: dict[str, list[torch.Tensor]] = defaultdict(list)
        for s0 in range(0, projected.shape[0], layer_step):
            features = lens.final_norm(projected[s0:s0 + layer_step].to(lens.dtype))
            logits = lens.readout_features(features)
            expected = None
            if pw is not None:
                expected = torch.linalg.vecdot(features.double(), pw[None])
                if pb is not None:
                    expected = expected + pb[None]
            for m, v in lens_metrics_from(final, logits, targets, expected).items():
                out[m].append(v)
        return {m: torch.cat(v, dim=0) for m, v in out.items()}

    def _group_provenance(self, group, union: list[tuple], n_pos0: int) -> dict:
        """``union``: (item id, token ids, scored positions, at position 0, BOS added) of every item of the set."""
        distribution, split, protocol = group
        corpus = get_corpus(distribution)
        return {
            "model": self.fingerprint,
            "model_record": model_record(getattr(self.lens.model.config, "_name_or_path", "") or ""),
            "distribution": distribution,
            "corpus_sha256": corpus.source_hash,
            "corpus_pin": corpus.notes.get("pin"),  # bundled distributions: do the sources match the pinned ones
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
