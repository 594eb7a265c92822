"""Training tuned lenses: streaming, memory-bounded, resumable, stopped on non-finite loss, never worse than the start.

Recipes:
- ``tuned-lens``: the published one. Zero-initialised translators; SGD with Nesterov momentum 0.9 and
  lr 1.0 in that convention (0.1 as PyTorch applies it); weight decay 1e-3 towards the identity;
  linear decay to zero, no warm-up; gradient-norm clipping at 1.0; KL(p_final || p_lens) summed over
  layers; documents joined with EOS and cut into chunks. The token budget is a parameter.
- ``warm``: started from an affine least-squares solution, then the same optimiser on a preconditioned
  gradient (see ``Preconditioner``): the step is the same whatever the scale of the hidden states. The start
  (``warm_start``) is the run's own ``affine`` projector (``affine``, the default: fitted on ``n_fit`` items of
  the train split, drawn like the evaluation's), or an affine fit on the first ``warm_fit_tokens`` tokens of the
  training stream (``stream``). Either way those stream tokens give the preconditioner its second moments
  (they count towards the budget and the time). How far a step may go before it hurts still differs between models (Gemma 3's
  readout is far more sensitive than SmolLM2's), so each layer backtracks: a layer whose held-out loss is not
  below its best after a step returns to its best state, loses its momentum and halves its step.
Each chunk is used once, so the training loss of a step is an estimate on unseen data; ``stop_at`` ends
training early once the mean loss over layers reaches it (recorded, with the tokens actually spent).

Held out: with ``warm_start=affine``, the train-split items that follow the ``n_fit`` fit items (the protocol's
items, scored positions and all, so that "no worse than affine" is measured on data drawn like the
evaluation); their documents are left out of the training stream. Otherwise the first ``heldout_chunks``
chunks of the stream, never trained on. The recipe's loss on ``heldout_positions`` of the held-out positions
is measured per layer before the first step and every ``heldout_every`` steps (and after the last). With
``keep_best`` (the default of ``warm``) each layer's returned translator is the best state seen, the start
included, so the lens never ends worse than it started on that slice. A state replaces the best only when its
held-out loss is lower by more than ``accept_z`` (2) standard errors of the per-position difference: a gain
within the noise of the slice is not taken, so that what is kept is better on new items too. The published
recipe returns its last state, as published; its held-out curve and the states keep-best (without that margin)
would have chosen are recorded beside it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from . import options
from .corpora import get_corpus
from .encoding import Encoded, batches
from .options import RECIPES, WARM_STARTS
from .distributed import SINGLE, Group
from .models import LensModel
from .projectors import GramAccumulator, LeastSquaresProjector, fit_least_squares
from .projectors.tuned import TunedProjector
from .store import atomic_write_bytes, sha256_json

# Learning rate (published convention: PyTorch's SGD gets lr * (1 - momentum)) when the recipe names none.
# The warm recipe's step is in units of the hidden states (see Preconditioner); 0.01 (then halved per layer
# where it hurts) was the largest rate that improved the held-out loss on both SmolLM2-135M and Gemma 3 270M.
DEFAULT_LR = {"tuned-lens": 1.0, "warm": 0.01}
CHECKPOINT_FORMAT = "jtc-tuned-checkpoint-2"
CHECKPOINT_FILE = "checkpoint.safetensors"
log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, too little text); the message names the cause."""


@dataclass(frozen=True)
class TunedRecipe:
    """A recipe's user options take their defaults from the options schema; the rest are the recipe's constants."""

    name: str = options.default("recipe")
    token_budget: int = options.default("token_budget")
    chunk_len: int = options.default("tuned_chunk_len")
    tokens_per_step: int = options.default("tokens_per_step")
    lr: float | None = None  # None: DEFAULT_LR of the recipe
    momentum: float = 0.9
    weight_decay: float = 1e-3
    clip: float = 1.0
    loss: str = options.default("tuned_loss")
    warm_fit_tokens: int = options.default("warm_fit_tokens")
    warm_start: str | None = options.default("warm_start")  # warm: "affine" (the run's projector) or "stream"; else None
    stop_at: float | None = options.default("stop_at")  # mean KL over layers (nats) at which to stop early
    seed: int = options.default("seed")
    # held-out slice: the first chunks of the stream, never trained on (not counted in token_budget)
    heldout_chunks: int = 4
    heldout_positions: int = 256  # positions scored per measurement, spread evenly over the held-out data (at most all)
    heldout_every: int = 1  # steps between held-out measurements (the last step is always measured)
    keep_best: bool | None = None  # None: True for warm, False for the published recipe
    accept_z: float = 2.0  # keep-best: a state is kept only if its held-out gain exceeds this many standard errors
    damping: float = 1e-3  # warm: ridge on the Jacobi-scaled covariance in the preconditioner

    def __post_init__(self):
        if self.name not in RECIPES:
            raise ValueError(f"unknown recipe {self.name!r}; expected one of {RECIPES}")
        if self.loss not in ("kl", "xent"):
            raise ValueError(f"loss must be 'kl' or 'xent', got {self.loss!r}")
        if self.tokens_per_step % self.chunk_len:
            raise ValueError("tokens_per_step must be a multiple of chunk_len")
        if self.token_budget < self.tokens_per_step:
            raise ValueError(f"token_budget ({self.token_budget}) is smaller than one step ({self.tokens_per_step} tokens)")
        if self.heldout_chunks < 1 or self.heldout_every < 1:
            raise ValueError("heldout_chunks and heldout_every must be at least 1")
        if self.heldout_positions < 1:
            raise ValueError("heldout_positions must be at least 1")
        # resolve recipe-dependent defaults, so that as_dict (the cache key) names what was run
        if self.name != "warm":
            object.__setattr__(self, "warm_start", None)
        elif self.warm_start not in WARM_STARTS:
            raise ValueError(f"unknown warm_start {self.warm_start!r}; expected one of {WARM_STARTS}")
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.name])
        if self.keep_best is None:
            object.__setattr__(self, "keep_best", self.name == "warm")

    @property
    def steps(self) -> int:
        return self.token_budget // self.tokens_per_step

    def as_dict(self) -> dict:
        return asdict(self)


def token_chunks(tokenizer, corpus_name: str, chunk_len: int, seed: int, split: str = "train",
                 exclude_docs: frozenset[str] = frozenset()):
    """Chunks of ``chunk_len`` token ids: the split's documents in seeded order (but ``exclude_docs``), joined with EOS.

    A generator: documents are tokenized as they are reached, so memory stays flat.
    """
    corpus = get_corpus(corpus_name)
    docs = [d for d in corpus.split(split, seed=seed) if d.doc_id not in exclude_docs]
    order = np.random.default_rng(seed).permutation(len(docs))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise TrainingError("the tokenizer has no EOS (or SEP) token to join documents with")
    buffer: list[int] = []
    for i in order:
        buffer += tokenizer(docs[i].text, add_special_tokens=False)["input_ids"] + [eos]
        while len(buffer) >= chunk_len:
            yield torch.tensor(buffer[:chunk_len])
            buffer = buffer[chunk_len:]


def stream_hash(corpus_name: str, recipe: TunedRecipe, tokenizer_vocab: int,
                exclude_docs: frozenset[str] = frozenset()) -> str:
    corpus = get_corpus(corpus_name)
    fields = {"corpus": corpus.source_hash, "chunk_len": recipe.chunk_len, "seed": recipe.seed, "vocab": tokenizer_vocab}
    if exclude_docs:
        fields["exclude_docs"] = sorted(exclude_docs)
    return sha256_json(fields)


def item_doc(item_id: str) -> str:
    """The document an item was drawn from (item ids are ``<doc id>#s<k>`` or ``<doc id>#b<k>``)."""
    return item_id.rsplit("#", 1)[0]


@dataclass
class WarmStart:
    """``warm_start=affine``: the run's affine projector and the train items held out to measure the lens on."""

    affine: LeastSquaresProjector
    heldout: list[Encoded]  # encoded items of the train split after the fit items
    record: dict  # provenance: the fit it came from, the held-out items

    @property
    def exclude_docs(self) -> frozenset[str]:
        return frozenset(item_doc(e.item_id) for e in self.heldout)


def _lens_loss_sum(lens: LensModel, projected: torch.Tensor, final_lp: torch.Tensor, batch: torch.Tensor, kind: str) -> torch.Tensor:
    """KL(p_final || p_lens) summed over positions, or cross-entropy to the next token within each chunk.

    Sums, not means: a step's loss is divided by the positions of the whole step, wherever they were scored.
    """
    lp = torch.log_softmax(lens.readout(projected).float(), dim=-1)
    if kind == "kl":
        return (final_lp.exp() * (final_lp - lp)).sum()
    B, T = batch.shape
    return torch.nn.functional.nll_loss(lp.view(B, T, -1)[:, :-1].reshape(-1, lp.shape[-1]), batch[:, 1:].reshape(-1),
                                        reduction="sum")


def scored_positions(recipe: "TunedRecipe", chunks: int) -> int:
    return chunks * (recipe.chunk_len if recipe.loss == "kl" else recipe.chunk_len - 1)


def _next_chunks(chunks, n: int, what: str) -> list[torch.Tensor]:
    try:
        return [next(chunks) for _ in range(n)]
    except StopIteration:
        raise TrainingError(f"the training split ran out of text for the {what}") from None


# -- the warm recipe's step ---------------------------------------------------------------------------


@dataclass
class Preconditioner:
    """Makes the warm recipe's step independent of the scale (and any invertible affine change) of the hidden states.

    Per layer the translator is the affine map v = A x on x = [h; 1]. Plain SGD moves A by -lr G with
    G = E[g x^T] (g = dloss/dv per position), which changes the projected states by -lr G x: the change grows
    with the square of the scale of h along each direction, so a few huge directions (Gemma's hidden states
    have coordinates in the thousands) make one step overshoot by orders of magnitude. Here G is replaced by

        s^2 G C^-1,   C = E[x x^T] (the warm start's second moments), s^2 = E[h_L^2] per coordinate,

    so the states move by -lr s^2 (G C^-1) x: the least-squares affine fit of the per-position direction -g,
    measured in units of the target's scale. Multiply every state by 1,000 (or transform h by any invertible
    affine map) and the change of the lens output is the same function of the data, hence the same loss
    trajectory. It is the input factor of K-FAC/natural-gradient methods, fixed at the warm start (C comes
    from the same pass as the affine fit) with a scalar output factor. The covariance is Jacobi-scaled and
    damped (+damping on its unit diagonal) so that directions the warm-start tokens barely sample are not
    amplified without bound. Clipping bounds the RMS relative change of the projected states per unit lr.
    """

    mean: torch.Tensor  # (L, d) E[h_l]
    inv_cov: torch.Tensor  # (L, d, d) damped inverse covariance of h_l
    scale2: torch.Tensor  # (L,) mean square of the target's coordinates

    @classmethod
    def from_moments(cls, acc: GramAccumulator, num_layers: int, damping: float) -> "Preconditioner":
        acc.flush()
        n = acc.n
        mean = acc.sums / n
        inv = []
        for l in range(num_layers):
            cov = acc.block(l, l) / n - torch.outer(mean[l], mean[l])
            scale = cov.diagonal().clamp_min(1e-300).sqrt()
            unit = cov / scale[:, None] / scale[None, :]
            unit.diagonal().add_(damping)
            inv.append(torch.linalg.inv(unit) / scale[:, None] / scale[None, :])
        target_sq = acc.block(num_layers, num_layers).diagonal().sum() / (n * acc.d)
        return cls(mean[:num_layers].clone(), torch.stack(inv), target_sq.expand(num_layers).clone())

    def precondition_(self, W: torch.nn.Parameter, b: torch.nn.Parameter, clip: float, layer_scale: list[float]) -> float:
        """Replace W.grad and b.grad by the preconditioned direction, clipped, times each layer's step scale;
        returns its RMS relative size before clipping.

        In centred coordinates (v = (I+W)(h - mean) + b'), the directions are decoupled:
        dW = s^2 (G_W - G_b mean^T) cov^-1, db' = s^2 G_b, and db = db' - dW mean.
        """
        device = W.grad.device
        mean, inv_cov = self.mean.to(device), self.inv_cov.to(device)
        s2 = self.scale2.to(device)[:, None]
        g_w, g_b = W.grad.double(), b.grad.double()
        g_centred = g_w - g_b[:, :, None] * mean[:, None, :]
        d_w = s2[:, :, None] * torch.bmm(g_centred, inv_cov)
        d_b_centred = s2 * g_b
        # E|dv|^2 / (d s^2) per layer: <dW, G'> + s^2 |G_b|^2, over d (the metric the preconditioner defines)
        sq = ((d_w * g_centred).sum((1, 2)) + (d_b_centred * g_b).sum(1)) / W.shape[1]
        rms = float(sq.clamp_min(0).mean().sqrt())
        factor = min(1.0, clip / rms) if rms > 0 else 1.0
        d_b = d_b_centred - torch.bmm(d_w, mean[:, :, None])[:, :, 0]
        scale = factor * torch.tensor(layer_scale, dtype=torch.float64, device=device)
        W.grad.copy_(scale[:, None, None] * d_w)
        b.grad.copy_(scale[:, None] * d_b)
        return rms


# -- the held-out slice -------------------------------------------------------------------------------


@dataclass
class HeldOut:
    """Hidden states and next tokens at this process's share of the held-out positions (captured once)."""

    states: torch.Tensor  # (L+1, P_mine, d)
    next_tokens: torch.Tensor  # (P_mine,)
    total: int  # positions over all processes

    @staticmethod
    def positions(chunks: int, chunk_len: int, count: int) -> list[tuple[int, int]]:
        """``count`` (chunk, position) pairs evenly spaced over the positions that have a next token."""
        span = chunk_len - 1
        flat = [int((i + 0.5) * chunks * span / count) for i in range(count)]
        return [(f // span, f % span) for f in flat]


def _heldout_loss_positions(lens: LensModel, heldout: HeldOut, W: torch.Tensor, b: torch.Tensor, kind: str,
                            rows: int = 128) -> torch.Tensor:
    """The loss at each of this process's held-out positions, per layer (L, P_mine), ``rows`` positions at a time."""
    L = lens.num_layers
    P = heldout.states.shape[1]
    out = torch.zeros(L, P, dtype=torch.float64)
    with torch.no_grad():
        for p0 in range(0, P, rows):
            h = heldout.states[:, p0:p0 + rows]
            final_lp = torch.log_softmax(lens.readout(h[L]).float(), dim=-1)
            nxt = heldout.next_tokens[p0:p0 + rows].to(h.device)
            for l in range(L):
                lp = torch.log_softmax(lens.readout(h[l] + h[l] @ W[l].T + b[l]).float(), dim=-1)
                if kind == "kl":
                    out[l, p0:p0 + rows] = (final_lp.exp() * (final_lp - lp)).sum(-1).double().cpu()
                else:
                    out[l, p0:p0 + rows] = (-lp.gather(1, nxt[:, None])[:, 0]).double().cpu()
    return out


@dataclass
class KeepBest:
    """Per layer: the lowest held-out loss measured so far (the start included), the step it was measured
    after, and (when the recipe keeps the best) the translator that reached it."""

    start: list[float]
    best: list[float]
    best_step: list[int]
    last: list[float]
    curve: list[list[float]] = field(default_factory=list)  # [step, mean held-out loss over layers]
    scale: list[float] = field(default_factory=list)  # per-layer step scale (halved at each backtrack)
    W: torch.Tensor | None = None
    b: torch.Tensor | None = None

    @classmethod
    def at_start(cls, losses: list[float], W: torch.Tensor, b: torch.Tensor, keep: bool) -> "KeepBest":
        return cls(list(losses), list(losses), [0] * len(losses), list(losses), [[0, sum(losses) / len(losses)]],
                   [1.0] * len(losses), W.detach().clone() if keep else None, b.detach().clone() if keep else None)

    def update(self, step: int, losses: list[float], W: torch.Tensor, b: torch.Tensor,
               better: list[bool] | None = None) -> None:
        """``better``: per layer, whether the state is clearly better than the best so far (``TunedTrainer._clearly_better``);
        by default, strictly lower (a NaN never is)."""
        for l, v in enumerate(losses):
            if (better[l] if better is not None else v < self.best[l]):
                self.best[l], self.best_step[l] = v, step
                if self.W is not None:
                    self.W[l].copy_(W[l].detach())
                    self.b[l].copy_(b[l].detach())
        self.last = list(losses)
        self.curve.append([step, sum(losses) / len(losses)])

    def backtrack_(self, step: int, W: torch.nn.Parameter, b: torch.nn.Parameter, opt: torch.optim.Optimizer) -> None:
        """Every layer the last step did not improve goes back to its best state, without momentum, at half the step."""
        for l, kept in enumerate(self.best_step):
            if kept == step:
                continue
            with torch.no_grad():
                W[l].copy_(self.W[l])
                b[l].copy_(self.b[l])
            for p in (W, b):
                buf = opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf[l].zero_()
            self.scale[l] *= 0.5

    def record(self) -> dict:
        return {"start": self.start, "best": self.best, "best_step": self.best_step, "last": self.last, "curve": self.curve,
                "scale": self.scale}

    @classmethod
    def from_record(cls, rec: dict, W: torch.Tensor | None, b: torch.Tensor | None) -> "KeepBest":
        return cls(rec["start"], rec["best"], rec["best_step"], rec["last"], rec["curve"], rec["scale"], W, b)


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 6) for v in values]


# -- training -----------------------------------------------------------------------------------------


class TunedTrainer:
    def __init__(self, lens: LensModel, recipe: TunedRecipe, fit_on: str, checkpoint: Path | None = None,
                 group: Group = SINGLE, warm: WarmStart | None = None):
        if lens.masked:
            raise TrainingError("tuned lenses are trained on causal language models only")
        if (recipe.warm_start == "affine") != (warm is not None):
            raise ValueError("warm_start=affine trains from the run's affine projector: pass it (WarmStart), and only then")
        self.lens, self.recipe, self.fit_on, self.group, self.warm = lens, recipe, fit_on, group, warm
        self.checkpoint = Path(checkpoint) if checkpoint else None
        for p in lens.model.parameters():
            p.requires_grad_(False)  # the model is frozen; only the lens learns

    # -- state -----------------------------------------------------------------------------------

    def _init_params(self, chunks):
        """(W, b, warm tokens, warm seconds, preconditioner or None)."""
        L, d = self.lens.num_layers, self.lens.d_model
        used, warm_seconds, precond = 0, 0.0, None
        if self.recipe.name == "warm":
            start = time.perf_counter()
            acc = GramAccumulator(L + 1, d, "last")
            while used < self.recipe.warm_fit_tokens:
                step_chunks = _next_chunks(chunks, self.recipe.tokens_per_step // self.recipe.chunk_len, "warm start")
                mine = self.group.shard(step_chunks)
                if mine:
                    acc.update(self._states(torch.stack(mine)))
                used += sum(c.numel() for c in step_chunks)
            acc.reduce(self.group.sum_)
            if self.warm is not None:
                affine = self.warm.affine
            else:
                affine = LeastSquaresProjector("affine", fit_least_squares(acc, intercept=True))
            init = TunedProjector.from_affine(affine, L)
            precond = Preconditioner.from_moments(acc, L, self.recipe.damping)
            warm_seconds = time.perf_counter() - start
        else:
            init = TunedProjector.zeros(L, d)
        W = torch.nn.Parameter(init.weight.clone().to(self.lens.device))
        b = torch.nn.Parameter(init.bias.clone().to(self.lens.device))
        return W, b, used, warm_seconds, precond

    def _states(self, batch: torch.Tensor) -> torch.Tensor:
        B, T = batch.shape
        rows = torch.arange(B).repeat_interleave(T)
        cols = torch.arange(T).repeat(B)
        return self.lens.capture(batch, torch.ones_like(batch), rows, cols).float()

    def _heldout(self, chunks: list[torch.Tensor]) -> HeldOut:
        """States at this process's share of the held-out positions: the chunks are shared out, each process
        captures its own chunks once."""
        r = self.recipe
        wanted = HeldOut.positions(len(chunks), r.chunk_len, min(r.heldout_positions, len(chunks) * (r.chunk_len - 1)))
        mine = self.group.shard(list(range(len(chunks))))
        picks = [(mine.index(c), p) for c, p in wanted if c in mine]
        L, d = self.lens.num_layers, self.lens.d_model
        if not picks:
            return HeldOut(torch.zeros(L + 1, 0, d, device=self.lens.device), torch.zeros(0, dtype=torch.long), len(wanted))
        batch = torch.stack([chunks[c] for c in mine])
        states = self._states(batch)  # positions in row-major (chunk, position) order
        flat = torch.tensor([k * r.chunk_len + p for k, p in picks])
        nxt = torch.stack([batch[k, p + 1] for k, p in picks])
        return HeldOut(states[:, flat.to(states.device)].contiguous(), nxt, len(wanted))

    def _heldout_items(self, encoded: list[Encoded]) -> HeldOut:
        """States at this process's share of ``heldout_positions`` scored positions of the held-out items, spread
        evenly over all their positions (those with a next token when the loss is cross-entropy)."""
        r, lens = self.recipe, self.lens
        L, d = lens.num_layers, lens.d_model
        usable = [(i, k) for i, e in enumerate(encoded) for k, t in enumerate(e.targets) if r.loss == "kl" or t >= 0]
        if not usable:
            raise TrainingError("the held-out items have no scored position to measure the lens on")
        count = min(r.heldout_positions, len(usable))
        chosen = {usable[int((j + 0.5) * len(usable) / count)] for j in range(count)}
        mine = self.group.shard(list(range(len(encoded))))
        pad = lens.pad_id
        index = {e.item_id: i for i, e in enumerate(encoded)}
        states, targets = [], []
        for batch in batches([encoded[i] for i in mine], 16, pad):
            captured = lens.capture(batch.input_ids, batch.attention_mask, batch.rows, batch.cols).float()
            keep, seen = [], {}
            for p, o in enumerate(batch.owner.tolist()):  # an item's positions come in order
                k = seen[o] = seen.get(o, -1) + 1
                if (index[batch.encoded[o].item_id], k) in chosen:
                    keep.append(p)
            states.append(captured[:, torch.tensor(keep, dtype=torch.long, device=captured.device)])
            targets.append(batch.targets[keep])
        if not states:
            return HeldOut(torch.zeros(L + 1, 0, d, device=lens.device), torch.zeros(0, dtype=torch.long), count)
        return HeldOut(torch.cat(states, 1).contiguous(), torch.cat(targets), count)

    def _heldout_losses(self, heldout: HeldOut, W, b, step: int) -> tuple[list[float], torch.Tensor]:
        """Mean held-out loss per layer over all processes' positions (of the lens after ``step`` steps), and the
        loss at each of this process's positions (L, P_mine)."""
        positions = _heldout_loss_positions(self.lens, heldout, W, b, self.recipe.loss)
        sums = positions.sum(1)
        self.group.sum_([sums])
        losses = (sums / heldout.total).tolist()
        bad = [l for l, v in enumerate(losses) if not math.isfinite(v)]
        if bad:
            raise TrainingError(f"non-finite held-out {self.recipe.loss} loss ({losses[bad[0]]}) at layer {bad[0]} "
                                f"after {step} steps; the lens is not saved")
        return losses, positions

    def _clearly_better(self, positions: torch.Tensor, best: torch.Tensor, total: int) -> list[bool]:
        """Per layer: is the held-out loss lower than the best state's by more than ``accept_z`` standard errors of
        the paired difference over positions? A step whose gain is within the noise of the held-out slice is not
        kept, so that what is kept is better on new items too, not only on these."""
        d = positions - best
        moments = torch.stack([d.sum(1), (d * d).sum(1)])
        self.group.sum_([moments])
        mean = moments[0] / total
        var = (moments[1] - total * mean * mean).clamp_min(0) / max(1, total - 1)
        se = (var / total).sqrt()
        return (mean < -self.recipe.accept_z * se).tolist()

    def _save_checkpoint(self, W, b, opt, sched, step, tokens, losses, tracker: KeepBest) -> None:
        """One file, written atomically: the tensors and, in its metadata, the state they belong to.

        A kill at any moment leaves either the previous checkpoint or this one, never a mix of two steps."""
        if self.checkpoint is None or not self.group.is_main:
            return
        tensors = {"W": W.detach().cpu().contiguous(), "b": b.detach().cpu().contiguous()}
        for i, p in enumerate((W, b)):
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum{i}"] = buf.detach().cpu().contiguous()
        if tracker.W is not None:
            tensors["best_W"], tensors["best_b"] = tracker.W.cpu().contiguous(), tracker.b.cpu().contiguous()
        state = {"format": CHECKPOINT_FORMAT, "step": step, "tokens": tokens, "losses": losses,
                 "scheduler": sched.state_dict(), "recipe": self.recipe.as_dict(), "fit_on": self.fit_on,
                 "heldout": tracker.record()}
        atomic_write_bytes(self.checkpoint / CHECKPOINT_FILE, st_save(tensors, metadata={"state": json.dumps(state)}))

    def _load_checkpoint(self):
        """(state, tensors) of this run's checkpoint, or None: missing, another run's, or unreadable (logged)."""
        if self.checkpoint is None:
            return None
        path = self.checkpoint / CHECKPOINT_FILE
        if not path.is_file():
            if (self.checkpoint / "state.json").is_file():
                log.warning("%s holds a checkpoint of an older format (two files, not atomic); starting over", self.checkpoint)
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                state = json.loads((fh.metadata() or {})["state"])
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            log.warning("checkpoint %s is unreadable (%s); starting over", path, exc)
            return None
        if state.get("format") != CHECKPOINT_FORMAT or state.get("recipe") != self.recipe.as_dict() or state.get("fit_on") != self.fit_on:
            return None  # a checkpoint of another run: start over
        return state, tensors

    def _resume(self, W, b, opt, sched, tracker: KeepBest, chunks, per_step: int):
        """Restore a checkpoint into the optimiser state; (step, tokens, losses, tracker) or None."""
        resumed = self._load_checkpoint()
        if not self.group.all(resumed is not None):
            return None  # every process resumes from the same checkpoint, or none does
        state, tensors = resumed
        self.group.check_same(state["step"], "the checkpoint step to resume from")
        with torch.no_grad():
            W.copy_(tensors["W"])
            b.copy_(tensors["b"])
        for i, p in enumerate((W, b)):
            if f"momentum{i}" in tensors:
                opt.state[p]["momentum_buffer"] = tensors[f"momentum{i}"].to(p.device)
        sched.load_state_dict(state["scheduler"])
        for group, lr in zip(opt.param_groups, sched.get_last_lr()):
            group["lr"] = lr  # loading a scheduler's state does not set the optimiser's current rate
        for _ in range(state["step"] * per_step):  # the stream is deterministic: skip what was consumed
            next(chunks)
        best = (tensors["best_W"].to(W.device), tensors["best_b"].to(W.device)) if tracker.W is not None else (None, None)
        return state["step"], state["tokens"], state["losses"], KeepBest.from_record(state["heldout"], *best)

    # -- training ---------------------------------------------------------------------------------

    def train(self, progress: bool = True) -> tuple[TunedProjector, dict]:
        r, lens = self.recipe, self.lens
        L = lens.num_layers
        per_step = r.tokens_per_step // r.chunk_len
        start = time.perf_counter()
        if self.warm is not None:
            chunks = token_chunks(lens.tokenizer, self.fit_on, r.chunk_len, r.seed, exclude_docs=self.warm.exclude_docs)
            heldout = self._heldout_items(self.warm.heldout)
        else:
            chunks = token_chunks(lens.tokenizer, self.fit_on, r.chunk_len, r.seed)
            heldout = self._heldout(_next_chunks(chunks, r.heldout_chunks, "held-out slice"))
        W, b, warm_tokens, warm_seconds, precond = self._init_params(chunks)
        opt = torch.optim.SGD([W, b], lr=r.lr * (1 - r.momentum), momentum=r.momentum, nesterov=True, weight_decay=r.weight_decay)
        total_steps = max(1, (r.token_budget - warm_tokens) // r.tokens_per_step)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total_steps))
        heldout_seconds = time.perf_counter()
        start_losses, best_positions = self._heldout_losses(heldout, W, b, 0)
        tracker = KeepBest.at_start(start_losses, W, b, keep=r.keep_best)
        heldout_seconds = time.perf_counter() - heldout_seconds
        backtrack = precond is not None and r.keep_best  # the warm recipe's step rule (module docstring)
        step, tokens, losses = 0, warm_tokens, []
        resumed = self._resume(W, b, opt, sched, tracker, chunks, per_step)
        if resumed is not None:
            step, tokens, losses, tracker = resumed
            if tracker.W is not None:  # the kept states' held-out losses, position by position, measured again
                best_positions = self._heldout_losses(heldout, tracker.W, tracker.b, step)[1]
        stopped_early = stream_exhausted = False
        bar = tqdm(total=r.token_budget, initial=tokens, desc=f"tuned lens ({r.name}) on {self.fit_on}", unit="tok",
                   unit_scale=True, disable=not progress)
        try:
            while step < total_steps:
                try:
                    step_chunks = [next(chunks) for _ in range(per_step)]
                except StopIteration:
                    stream_exhausted = True  # recorded below, and said now: the lens trained on less than asked
                    log.warning("tuned lens on %s: the train split's stream ran out after %d of %d steps (%d tokens of "
                                "the %d budgeted); the lens is what those steps made of it", self.fit_on, step,
                                total_steps, tokens, r.token_budget)
                    break
                step_losses = self._accumulate_gradients(W, b, step_chunks)
                bad = [l for l, v in enumerate(step_losses) if not math.isfinite(v)]
                if bad:
                    raise TrainingError(f"non-finite {r.loss} loss ({step_losses[bad[0]]}) at layer {bad[0]}, step {step}; "
                                        "the lens is not saved")
                if precond is not None:
                    precond.precondition_(W, b, r.clip, tracker.scale)
                else:
                    torch.nn.utils.clip_grad_norm_([W, b], r.clip)
                opt.step()
                opt.zero_grad(set_to_none=False)
                sched.step()
                step += 1
                step_tokens = sum(c.numel() for c in step_chunks)
                tokens += step_tokens
                mean_loss = sum(step_losses) / L
                losses.append(round(mean_loss, 6))
                if r.stop_at is not None and mean_loss <= r.stop_at:
                    stopped_early = True
                if step % r.heldout_every == 0 or step >= total_steps or stopped_early:
                    best_positions = self._measure(tracker, heldout, W, b, step, best_positions)
                    if backtrack:
                        tracker.backtrack_(step, W, b, opt)
                bar.update(step_tokens)
                bar.set_postfix(loss=f"{mean_loss:.4f}", heldout=f"{tracker.curve[-1][1]:.4f}", step=step)
                self._save_checkpoint(W, b, opt, sched, step, tokens, losses, tracker)
                if stopped_early:
                    break
        finally:
            bar.close()
        if tracker.curve[-1][0] != step:  # the split ran out between two measurements: measure the last state
            best_positions = self._measure(tracker, heldout, W, b, step, best_positions)
        if r.keep_best:
            weight, bias, end = tracker.W, tracker.b, tracker.best
        else:
            weight, bias, end = W.detach(), b.detach(), tracker.last
        info = {
            "recipe": r.as_dict(),
            "fit_on": self.fit_on,
            "steps": step,
            "tokens_spent": tokens,
            "warm_fit_tokens": warm_tokens,
            "warm_fit_seconds": round(warm_seconds, 2),
            "stopped_early": stopped_early,
            "budget_exhausted": step >= total_steps,
            "stream_exhausted": stream_exhausted,
            "loss_curve": losses,
            **self._heldout_record(heldout),
            "heldout_seconds_per_measure": round(heldout_seconds, 2),
            "heldout_start": _rounded(tracker.start),
            "heldout_end": _rounded(end),
            "steps_kept": tracker.best_step if r.keep_best else [step] * L,
            "kept_if": (f"its held-out loss is below the best so far by more than {r.accept_z} standard errors of the "
                        "paired difference over held-out positions" if r.keep_best else "the last state (as published)"),
            "heldout_curve": [[s, round(v, 6)] for s, v in tracker.curve],
            "step_scale": tracker.scale if backtrack else None,
            "train_seconds": round(time.perf_counter() - start, 2),
        }
        if not r.keep_best:  # what keep-best would have returned, for comparison
            info["heldout_best"], info["steps_best"] = _rounded(tracker.best), tracker.best_step
        return TunedProjector(weight.cpu().clone(), bias.cpu().clone()), info

    def _measure(self, tracker: KeepBest, heldout: HeldOut, W, b, step: int, best_positions: torch.Tensor) -> torch.Tensor:
        """Held-out losses after ``step`` steps into the tracker; the per-position losses of the best states."""
        losses, positions = self._heldout_losses(heldout, W, b, step)
        better = self._clearly_better(positions, best_positions, heldout.total) if self.recipe.keep_best else None
        tracker.update(step, losses, W, b, better)
        if better is None:
            return best_positions
        keep = torch.tensor(better)[:, None]
        return torch.where(keep, positions, best_positions)

    def _heldout_record(self, heldout: HeldOut) -> dict:
        r = self.recipe
        if self.warm is not None:
            return {"warm_start": self.warm.record,
                    "heldout_measure": f"{r.loss} (nats), mean over {heldout.total} scored positions of "
                                       f"{len(self.warm.heldout)} held-out train items (their documents left out of the stream)"}
        return {"heldout_tokens": r.heldout_chunks * r.chunk_len,
                "heldout_measure": f"{r.loss} (nats), mean over {heldout.total} positions of the held-out chunks"}

    def _accumulate_gradients(self, W, b, step_chunks: list[torch.Tensor]) -> list[float]:
        """Gradients of the step's mean loss (summed over layers) in W.grad and b.grad; the per-layer losses.

        Each process scores its share of the chunks; gradients and losses are summed over the processes,
        which leaves every process with the gradient of the whole step.
        """
        lens, r, L = self.lens, self.recipe, self.lens.num_layers
        n = scored_positions(r, len(step_chunks))
        losses = torch.zeros(L, dtype=torch.float64)
        mine = self.group.shard(step_chunks)
        if mine:
            batch = torch.stack(mine)
            states = self._states(batch)
            with torch.no_grad():
                final_lp = torch.log_softmax(lens.readout(states[L]).float(), dim=-1)
            batch_on_device = batch.to(states.device)
            for l in range(L):
                h = states[l]
                projected = h + h @ W[l].T + b[l]
                loss = _lens_loss_sum(lens, projected, final_lp, batch_on_device, r.loss) / n
                loss.backward()
                losses[l] = loss.item()
        if W.grad is None:  # this process scored nothing
            W.grad, b.grad = torch.zeros_like(W), torch.zeros_like(b)
        if self.group.distributed:
            self.group.sum_([W.grad, b.grad, losses])
        return losses.tolist()
