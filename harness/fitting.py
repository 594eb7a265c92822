"""Fitting the least-squares projectors (mat and affine) of a model on the train split of a corpus, cached."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import nonfinite
from .corpora import get_corpus
from .distributed import SINGLE, Group
from .encoding import ItemError, batches, encode_all
from .models import LensModel
from .projectors import GramAccumulator, LeastSquaresProjector, choose_pair_mode, fit_least_squares
from .projectors.least_squares import RIDGE_GRID, choose_ridge
from .projectors.cache import load_entry, save_entry
from .protocols import ProtocolConfig, build_items, no_items_reason
from .projectors.tuned import TunedProjector, import_tuned_lens
from .provenance import versions
from .store import cache_root, sha256_file, sha256_json
from .tuned_training import TunedRecipe, TunedTrainer, WarmStart, item_doc, stream_hash

log = logging.getLogger(__name__)


MODEL_KEY = ("config_sha256", "unembed_sha256", "weights_sha256")


def model_key(fingerprint: dict) -> dict | None:
    """What identifies the model in a cache key: its config, every weight and its layer intervention. None when
    the weights could not be hashed: then no entry can be known to belong to this model, and the cache is not used."""
    if not fingerprint.get("weights_sha256"):
        return None
    key = {k: fingerprint[k] for k in MODEL_KEY}
    if fingerprint.get("layers"):
        key["layers"] = fingerprint["layers"]  # blocks skipped or reordered: other hidden states, other fits
    return key


def _uncached(fingerprint: dict) -> str:
    return f"not used: {fingerprint.get('weights_not_hashed') or 'the weights were not hashed'}"


@dataclass(frozen=True)
class FitSpec:
    fit_on: str
    protocol: ProtocolConfig
    n_fit: int
    pairs: str = "last"
    ridge: float | str = 0.0  # relative to the Gram matrix's mean diagonal; "auto": chosen on held-out fit items

    def as_dict(self) -> dict:
        return {"fit_on": self.fit_on, "protocol": self.protocol.as_dict(), "n_fit": self.n_fit, "pairs": self.pairs,
                "ridge": self.ridge}


# Positions per dimension below which a least-squares map is poorly determined (recorded as a warning).
FIT_POSITIONS_PER_DIM = 10
HELD_OUT_EVERY = 5  # ridge=auto: every 5th fit item is held out to choose the penalty


@dataclass
class FittedLeastSquares:
    mat: LeastSquaresProjector
    affine: LeastSquaresProjector
    info: dict  # provenance of the fit: data hash, positions, time, cache entry


def fit_inputs(lens: LensModel, spec: FitSpec, max_length: int | None = None):
    """The fit items that can be scored, the ids of those too short to be (skipped, listed in the fit info), and
    the hash of the data used."""
    corpus = get_corpus(spec.fit_on)
    items = build_items(corpus, "train", spec.protocol, limit=spec.n_fit)
    if not items:
        raise ValueError(f"cannot fit on {spec.fit_on}: its train split has no items: "
                         + no_items_reason(corpus, "train", spec.protocol))
    encoded, skipped = encode_all(items, lens.tokenizer, spec.protocol, lens.masked, max_length)
    if not encoded:
        raise ItemError(f"none of the {len(items)} fit item(s) of {spec.fit_on}/train can be scored "
                        f"({next(iter(skipped.values()), 'no items')})")
    if skipped:
        log.warning("%d of %d fit item(s) of %s/train are too short to score and are skipped (listed in the fit info)",
                    len(skipped), len(items), spec.fit_on)
    data_hash = sha256_json([[e.item_id, e.input_ids, e.positions] for e in encoded])
    return corpus, encoded, sorted(skipped), data_hash


def fit_warnings(positions: int, d: int) -> list[str]:
    if positions < FIT_POSITIONS_PER_DIM * d:
        return [f"{positions} fit positions for d = {d} dimensions ({positions / d:.1f} per dimension, fewer than "
                f"{FIT_POSITIONS_PER_DIM}): mat / affine may extrapolate badly to states unlike the fit data; raise n_fit or set ridge"]
    return []


def accumulate(lens: LensModel, encoded, pairs: str, batch_size: int, desc: str, group: Group = SINGLE,
               on_nonfinite: str = "error", where: str = "the fit data") -> tuple[GramAccumulator, dict[str, dict]]:
    """Gram statistics over ``encoded``: each process of ``group`` reads its share, then the sums are combined.

    Items with non-finite hidden states never reach the sums; they are returned (id: first bad state and count,
    over every process), and under ``on_nonfinite="error"`` stop the fit with a message naming them.
    """
    acc = GramAccumulator(lens.num_layers + 1, lens.d_model, pairs)
    pad = lens.pad_id
    share = group.shard(encoded)
    bad: dict[str, dict] = {}
    if group.distributed:
        desc += f" [process {group.rank + 1}/{group.world_size}]"
    with tqdm(total=len(share), desc=desc, unit="item") as bar:
        for batch in batches(share, batch_size, pad):
            states = lens.capture(batch.input_ids, batch.attention_mask, batch.rows, batch.cols)
            mask, first = nonfinite.bad_positions(states)
            if mask.any():
                found = nonfinite.per_item([e.item_id for e in batch.encoded], batch.owner, mask, first)
                bad.update(found)
                keep = torch.tensor([batch.encoded[o].item_id not in found for o in batch.owner.tolist()])
                states = states[:, keep.to(states.device)]
            if not (bad and on_nonfinite == "error"):  # once the fit is bound to stop, only the list of bad items is wanted
                acc.update(states)
            bar.update(len(batch.encoded))
    # every process learns of every bad item before any of them stops, so none waits in a collective
    bad = {k: v for theirs in group.gather(bad) for k, v in theirs.items()}
    if bad and on_nonfinite == "error":
        raise nonfinite.NonFiniteError(nonfinite.message(lens.name, where, bad, lens.num_layers))
    if encoded and len(bad) == len(encoded):
        raise nonfinite.NonFiniteError(f"model {lens.name}: every item of {where} has non-finite hidden states; nothing to fit on")
    acc.flush()
    acc.reduce(group.sum_)
    return acc, bad


def get_least_squares(lens: LensModel, spec: FitSpec, batch_size: int = 16, max_length: int | None = None,
                      fingerprint: dict | None = None, group: Group = SINGLE, on_nonfinite: str = "error") -> FittedLeastSquares:
    """mat and affine for ``lens`` fitted on ``spec``: from the cache when a valid entry exists, else fitted now
    (by all processes of ``group`` together; the main one writes the cache entry). Fit items with non-finite
    hidden states stop the fit, or under ``on_nonfinite="drop"`` are left out and listed in the fit info."""
    fingerprint = fingerprint or lens.fingerprint()
    corpus, encoded, too_short, data_hash = fit_inputs(lens, spec, max_length)
    pairs = choose_pair_mode(spec.pairs, lens.num_layers + 1, lens.d_model)
    key = {
        "model": model_key(fingerprint),
        "fit_data_sha256": data_hash,
        "fit_on": spec.fit_on,
        "protocol": spec.protocol.as_dict(),
        "n_fit": spec.n_fit,
        "pairs": pairs,
        "ridge": spec.ridge,
    }
    if nonfinite.check_mode(on_nonfinite) == "drop":
        key["on_nonfinite"] = "drop"  # a fit that may have dropped items never stands in for one that may not
    cached = load_entry(key) if key["model"] else None
    if group.all(cached is not None):
        tensors, meta = cached
        log.info("least-squares projectors for %s loaded from the cache", spec.fit_on)
        return FittedLeastSquares(
            LeastSquaresProjector.from_tensors("mat", {k[4:]: v for k, v in tensors.items() if k.startswith("mat.")}),
            LeastSquaresProjector.from_tensors("affine", {k[7:]: v for k, v in tensors.items() if k.startswith("affine.")}),
            {**meta["info"], "cache": "hit"},
        )
    start = time.perf_counter()
    desc = f"fit mat/affine on {spec.fit_on}/train"
    checked = {"group": group, "on_nonfinite": on_nonfinite, "where": f"{spec.fit_on}/train (fit data)"}
    ridge_info: dict = {"ridge": spec.ridge}
    if spec.ridge == "auto":
        held_items = encoded[::HELD_OUT_EVERY]
        train_items = [e for k, e in enumerate(encoded) if k % HELD_OUT_EVERY]
        train, bad = accumulate(lens, train_items, pairs, batch_size, desc=desc + " (fit part)", **checked)
        held, bad_held = accumulate(lens, held_items, pairs, batch_size, desc=desc + " (held-out part)", **checked)
        acc, bad = train.add(held), {**bad, **bad_held}
        ridges, rel_err = {}, {}
        for name, intercept in (("mat", False), ("affine", True)):
            ridges[name], errors = choose_ridge(train, held, intercept)
            rel_err[name] = {str(l): [round(e, 6) for e in errs] for l, errs in errors.items()}
        ridge_info = {"ridge": "auto", "ridge_grid": list(RIDGE_GRID), "held_out_items": len(held_items),
                      "ridge_chosen": {name: {str(l): lam for l, lam in r.items()} for name, r in ridges.items()},
                      "held_out_error_relative_to_ridge_0": rel_err}
    else:
        acc, bad = accumulate(lens, encoded, pairs, batch_size, desc=desc, **checked)
        ridges = {"mat": float(spec.ridge), "affine": float(spec.ridge)}
    if bad:
        log.warning("%d fit item(s) with non-finite hidden states dropped (listed in the fit info)", len(bad))
    warnings_ = fit_warnings(acc.n, lens.d_model)
    for message in warnings_:
        log.warning("fitting on %s: %s", spec.fit_on, message)
    mat = LeastSquaresProjector("mat", fit_least_squares(acc, intercept=False, ridge=ridges["mat"]))
    affine = LeastSquaresProjector("affine", fit_least_squares(acc, intercept=True, ridge=ridges["affine"]))
    info = {
        "fit_on": spec.fit_on,
        "fit_corpus_sha256": corpus.source_hash,
        "fit_corpus_pin": corpus.notes.get("pin"),
        "fit_split": "train",
        "fit_items": len(encoded) - len(bad),
        "fit_items_skipped": {"too_short": too_short, "nonfinite": sorted(bad)},
        "fit_positions": acc.n,
        "fit_data_sha256": data_hash,
        "pairs": pairs,
        "fit_seconds": round(time.perf_counter() - start, 2),
        "accumulation": "float64 Gram matrices, one pass",
        **ridge_info,
        "warnings": warnings_,
        "processes": group.world_size,
        "versions": versions(),
    }
    if not key["model"]:
        info = {**info, "cache": _uncached(fingerprint)}
    elif group.is_main:
        tensors = {f"mat.{k}": v for k, v in mat.tensors().items()} | {f"affine.{k}": v for k, v in affine.tensors().items()}
        meta = save_entry(key, tensors, {"info": info})
        info = {**info, "cache": "miss", "cache_entry": meta["tensors_sha256"][:16]}
    info = group.gather(info)[0]  # every process reports the main one's record
    return FittedLeastSquares(mat, affine, info)


@dataclass(frozen=True)
class TunedSpec:
    fit_on: str
    recipe: TunedRecipe
    import_from: str | None = None  # a lens saved by the tuned-lens package, used instead of training
    allow_unverified: bool = False  # use an imported lens whose config names no hash of the unembedding
    start: FitSpec | None = None  # warm_start=affine: the least-squares fit the run's affine projector comes from

    def __post_init__(self):
        if not self.import_from and (self.recipe.warm_start == "affine") != (self.start is not None):
            raise ValueError("warm_start=affine starts from the run's affine projector: the TunedSpec needs its FitSpec "
                             "(start=), and no other recipe takes one")

    def as_dict(self) -> dict:
        if self.import_from:
            return {"imported_from": self.import_from, "allow_unverified_lens": self.allow_unverified}
        out = {"fit_on": self.fit_on, "recipe": self.recipe.as_dict()}
        if self.start is not None:
            out["start"] = self.start.as_dict()
        return out


def _require_training_text(spec: TunedSpec) -> None:
    """An empty train split would leave the lens at its start (the identity, or the affine fit of nothing)."""
    corpus = get_corpus(spec.fit_on)
    if not any(d.text.strip() for d in corpus.split("train", seed=spec.recipe.seed)):
        raise ValueError(f"cannot train a tuned lens on {spec.fit_on}: its train split has no text: "
                         + no_items_reason(corpus, "train", ProtocolConfig("dense", seed=spec.recipe.seed)))


def import_tuned(lens: LensModel, spec: TunedSpec):
    """The lens saved at ``spec.import_from``, checked against ``lens`` (layers, width, unembedding, tensor shapes)."""
    folder = Path(spec.import_from).expanduser()
    projector, check = import_tuned_lens(folder, lens.num_layers, lens.d_model, lens.unembed.weight, spec.allow_unverified)
    return projector, {"imported_from": str(folder), "params_sha256": sha256_file(folder / "params.pt"),
                       "config_sha256": sha256_file(folder / "config.json"), **check,
                       "recipe": "imported (trained elsewhere; see its config.json)", "cache": "not cached"}


HELDOUT_MAX_DOCUMENTS = 8  # spread over several documents, so that keep-best is not decided on one topic


def heldout_documents(n_documents: int) -> int:
    """How many train documents the held-out items come from: a tenth of the split's, between 1 and 8."""
    return max(1, min(HELDOUT_MAX_DOCUMENTS, n_documents // 10))


def from_few_documents(items: list, wanted: int, n_docs: int) -> list:
    """``wanted`` of ``items`` from ``n_docs`` documents (more only if those run short): up to wanted / n_docs items
    of each document in the order ``items`` meets them, in that order. The held-out items' documents are left out of
    the tuned lens's stream; 256 items in the protocol's order would come from 60 of Wikipedia's 74 train documents,
    and leave 3% of its text to train on."""
    per_doc = -(-wanted // n_docs)
    by_doc: dict[str, list] = {}
    for it in items:
        by_doc.setdefault(item_doc(it.item_id), []).append(it)
    out: list = []
    for doc_items in by_doc.values():
        if len(out) >= wanted:
            break
        out += doc_items[:per_doc]
    return out[:wanted]


def heldout_items(lens: LensModel, spec: FitSpec, positions: int, max_length: int | None = None):
    """Train items after the ``n_fit`` fit items of ``spec`` (drawn like them), from a few documents, enough for
    about ``positions`` scored positions; the hash of what they hold; how many documents they come from."""
    corpus = get_corpus(spec.fit_on)
    protocol = spec.protocol
    per_item = 1 if protocol.name == "paper" else (protocol.stride or protocol.chunk_len - 1)
    wanted = -(-positions // per_item)
    n_docs = heldout_documents(len(corpus.split("train", seed=protocol.seed)))
    items = from_few_documents(build_items(corpus, "train", protocol)[spec.n_fit:], wanted, n_docs)
    encoded, _ = encode_all(items, lens.tokenizer, protocol, lens.masked, max_length) if items else ([], {})
    if not encoded:
        total = len(build_items(corpus, "train", protocol))
        raise ValueError(f"warm_start=affine holds out the train items of {spec.fit_on} after the n_fit={spec.n_fit} fit "
                         f"items, but its train split has {total} item(s) and none of them is left to score: lower n_fit, "
                         "or set warm_start=stream")
    docs = len({item_doc(it.item_id) for it in items})
    return encoded, sha256_json([[e.item_id, e.input_ids, e.positions] for e in encoded]), docs


def _warm_start(lens: LensModel, spec: TunedSpec, fitted: FittedLeastSquares,
                max_length: int | None) -> tuple[WarmStart, dict]:
    """The run's affine projector and the held-out items (encoded like the fit items); the key fields that name them."""
    encoded, heldout_hash, docs = heldout_items(lens, spec.start, spec.recipe.heldout_positions, max_length)
    record = {"projector": "affine", "fit": spec.start.as_dict(), "fit_data_sha256": fitted.info["fit_data_sha256"],
              "fit_positions": fitted.info["fit_positions"], "fit_seconds": fitted.info.get("fit_seconds"),
              "fit_cache": fitted.info.get("cache"),
              "heldout_items": len(encoded), "heldout_first_item": spec.start.n_fit, "heldout_documents": docs,
              "heldout_selection": "the train items after the fit items, in the protocol's order, from a tenth of the split's "
                                   "documents (1 to 8), an equal share from each",
              "heldout_sha256": heldout_hash}
    return WarmStart(fitted.affine, encoded, record), {"start_fit_data_sha256": fitted.info["fit_data_sha256"],
                                                       "heldout_sha256": heldout_hash}


def get_tuned(lens: LensModel, spec: TunedSpec, fingerprint: dict | None = None, group: Group = SINGLE,
              least_squares: Callable[[FitSpec], FittedLeastSquares] | None = None, max_length: int | None = None):
    """A tuned lens for ``lens`` trained under ``spec``: imported, from the cache, or trained now (resuming a
    checkpoint; the processes of ``group`` share each step's chunks and sum their gradients). With
    ``warm_start=affine`` the run's affine projector (fitted on ``spec.start`` by ``least_squares``, by default
    ``get_least_squares`` with its defaults) is the start; ``max_length`` encodes its held-out items as the fit's."""
    fingerprint = fingerprint or lens.fingerprint()
    if spec.import_from:
        return import_tuned(lens, spec)
    warm, start_key = None, {}
    if spec.start is not None:
        fit = least_squares or (lambda s: get_least_squares(lens, s, max_length=max_length, fingerprint=fingerprint,
                                                            group=group))
        warm, start_key = _warm_start(lens, spec, fit(spec.start), max_length)
    key = {
        "family": "tuned",
        "model": model_key(fingerprint),
        "fit_on": spec.fit_on,
        "stream_sha256": stream_hash(spec.fit_on, spec.recipe, len(lens.tokenizer),
                                     warm.exclude_docs if warm else frozenset()),
        "recipe": spec.recipe.as_dict(),
        **({"start": spec.start.as_dict(), **start_key} if warm else {}),
    }
    cached = load_entry(key) if key["model"] else None
    if group.all(cached is not None):
        tensors, meta = cached
        return TunedProjector.from_tensors(tensors), {**meta["info"], "cache": "hit"}
    _require_training_text(spec)
    # no checkpoint for unidentified weights: it could be resumed by another model
    checkpoint = cache_root() / "tuned-checkpoints" / sha256_json(key)[:24] if key["model"] else None
    projector, info = TunedTrainer(lens, spec.recipe, spec.fit_on, checkpoint, group=group, warm=warm).train()
    fit_corpus = get_corpus(spec.fit_on)
    info = {**info, "fit_corpus_sha256": fit_corpus.source_hash, "fit_corpus_pin": fit_corpus.notes.get("pin"),
            "stream_sha256": key["stream_sha256"],
            "processes": group.world_size, "versions": versions()}
    if not key["model"]:
        info = {**info, "cache": _uncached(fingerprint)}
    elif group.is_main:
        meta = save_entry(key, projector.tensors(), {"info": info})
        shutil.rmtree(checkpoint, ignore_errors=True)  # the cache entry supersedes it (weights and momentum: large)
        info = {**info, "cache": "miss", "cache_entry": meta["tensors_sha256"][:16]}
    return projector, group.gather(info)[0]
