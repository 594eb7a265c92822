"""Fitting the least-squares projectors (mat and affine) of a model on the train split of a corpus, cached."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .corpora import get_corpus
from .distributed import SINGLE, Group
from .encoding import batches, encode
from .models import LensModel
from .projectors import GramAccumulator, LeastSquaresProjector, choose_pair_mode, fit_least_squares
from .projectors.cache import load_entry, save_entry
from .protocols import ProtocolConfig, build_items
from .projectors.tuned import TunedProjector, import_tuned_lens
from .provenance import versions
from .store import cache_root, sha256_file, sha256_json
from .tuned_training import TunedRecipe, TunedTrainer, stream_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitSpec:
    fit_on: str
    protocol: ProtocolConfig
    n_fit: int
    pairs: str = "last"

    def as_dict(self) -> dict:
        return {"fit_on": self.fit_on, "protocol": self.protocol.as_dict(), "n_fit": self.n_fit, "pairs": self.pairs}


@dataclass
class FittedLeastSquares:
    mat: LeastSquaresProjector
    affine: LeastSquaresProjector
    info: dict  # provenance of the fit: data hash, positions, time, cache entry


def fit_inputs(lens: LensModel, spec: FitSpec, max_length: int | None = None):
    corpus = get_corpus(spec.fit_on)
    items = build_items(corpus, "train", spec.protocol, limit=spec.n_fit)
    encoded = [encode(it, lens.tokenizer, spec.protocol, lens.masked, max_length) for it in items]
    data_hash = sha256_json([[e.item_id, e.input_ids, e.positions] for e in encoded])
    return corpus, encoded, data_hash


def accumulate(lens: LensModel, encoded, pairs: str, batch_size: int, desc: str, group: Group = SINGLE) -> GramAccumulator:
    """Gram statistics over ``encoded``: each process of ``group`` reads its share, then the sums are combined."""
    acc = GramAccumulator(lens.num_layers + 1, lens.d_model, pairs)
    pad = lens.tokenizer.pad_token_id if lens.tokenizer.pad_token_id is not None else 0
    share = group.shard(encoded)
    if group.distributed:
        desc += f" [process {group.rank + 1}/{group.world_size}]"
    with tqdm(total=len(share), desc=desc, unit="item") as bar:
        for batch in batches(share, batch_size, pad):
            acc.update(lens.capture(batch.input_ids, batch.attention_mask, batch.rows, batch.cols))
            bar.update(len(batch.encoded))
    acc.flush()
    acc.reduce(group.sum_)
    return acc


def get_least_squares(lens: LensModel, spec: FitSpec, batch_size: int = 16, max_length: int | None = None,
                      fingerprint: dict | None = None, group: Group = SINGLE) -> FittedLeastSquares:
    """mat and affine for ``lens`` fitted on ``spec``: from the cache when a valid entry exists, else fitted now
    (by all processes of ``group`` together; the main one writes the cache entry)."""
    fingerprint = fingerprint or lens.fingerprint()
    corpus, encoded, data_hash = fit_inputs(lens, spec, max_length)
    pairs = choose_pair_mode(spec.pairs, lens.num_layers + 1, lens.d_model)
    key = {
        "model": {k: fingerprint[k] for k in ("config_sha256", "unembed_sha256")},
        "fit_data_sha256": data_hash,
        "fit_on": spec.fit_on,
        "protocol": spec.protocol.as_dict(),
        "n_fit": spec.n_fit,
        "pairs": pairs,
    }
    cached = load_entry(key)
    if group.all(cached is not None):
        tensors, meta = cached
        log.info("least-squares projectors for %s loaded from the cache", spec.fit_on)
        return FittedLeastSquares(
            LeastSquaresProjector.from_tensors("mat", {k[4:]: v for k, v in tensors.items() if k.startswith("mat.")}),
            LeastSquaresProjector.from_tensors("affine", {k[7:]: v for k, v in tensors.items() if k.startswith("affine.")}),
            {**meta["info"], "cache": "hit"},
        )
    start = time.perf_counter()
    acc = accumulate(lens, encoded, pairs, batch_size, desc=f"fit mat/affine on {spec.fit_on}/train", group=group)
    if acc.n <= lens.d_model:
        log.warning("only %d fit positions for %d dimensions: least squares is underdetermined (minimum-norm solution)", acc.n, lens.d_model)
    mat = LeastSquaresProjector("mat", fit_least_squares(acc, intercept=False))
    affine = LeastSquaresProjector("affine", fit_least_squares(acc, intercept=True))
    info = {
        "fit_on": spec.fit_on,
        "fit_corpus_sha256": corpus.source_hash,
        "fit_split": "train",
        "fit_items": len(encoded),
        "fit_positions": acc.n,
        "fit_data_sha256": data_hash,
        "pairs": pairs,
        "fit_seconds": round(time.perf_counter() - start, 2),
        "accumulation": "float64 Gram matrices, one pass",
        "processes": group.world_size,
        "versions": versions(),
    }
    if group.is_main:
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

    def as_dict(self) -> dict:
        if self.import_from:
            return {"imported_from": self.import_from, "allow_unverified_lens": self.allow_unverified}
        return {"fit_on": self.fit_on, "recipe": self.recipe.as_dict()}


def import_tuned(lens: LensModel, spec: TunedSpec):
    """The lens saved at ``spec.import_from``, checked against ``lens`` (layers, width, unembedding, tensor shapes)."""
    folder = Path(spec.import_from).expanduser()
    projector, check = import_tuned_lens(folder, lens.num_layers, lens.d_model, lens.unembed.weight, spec.allow_unverified)
    return projector, {"imported_from": str(folder), "params_sha256": sha256_file(folder / "params.pt"),
                       "config_sha256": sha256_file(folder / "config.json"), **check,
                       "recipe": "imported (trained elsewhere; see its config.json)", "cache": "not cached"}


def get_tuned(lens: LensModel, spec: TunedSpec, fingerprint: dict | None = None, group: Group = SINGLE):
    """A tuned lens for ``lens`` trained under ``spec``: imported, from the cache, or trained now (resuming a
    checkpoint; the processes of ``group`` share each step's chunks and sum their gradients)."""
    fingerprint = fingerprint or lens.fingerprint()
    if spec.import_from:
        return import_tuned(lens, spec)
    key = {
        "family": "tuned",
        "model": {k: fingerprint[k] for k in ("config_sha256", "unembed_sha256")},
        "fit_on": spec.fit_on,
        "stream_sha256": stream_hash(spec.fit_on, spec.recipe, len(lens.tokenizer)),
        "recipe": spec.recipe.as_dict(),
    }
    cached = load_entry(key)
    if group.all(cached is not None):
        tensors, meta = cached
        return TunedProjector.from_tensors(tensors), {**meta["info"], "cache": "hit"}
    checkpoint = cache_root() / "tuned-checkpoints" / sha256_json(key)[:24]
    projector, info = TunedTrainer(lens, spec.recipe, spec.fit_on, checkpoint, group=group).train()
    info = {**info, "fit_corpus_sha256": get_corpus(spec.fit_on).source_hash, "stream_sha256": key["stream_sha256"],
            "processes": group.world_size, "versions": versions()}
    if group.is_main:
        meta = save_entry(key, projector.tensors(), {"info": info})
        shutil.rmtree(checkpoint, ignore_errors=True)  # the cache entry supersedes it (weights and momentum: large)
        info = {**info, "cache": "miss", "cache_entry": meta["tensors_sha256"][:16]}
    return projector, group.gather(info)[0]
