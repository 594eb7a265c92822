"""Training tuned lenses: streaming, memory-bounded, resumable, and stopped on non-finite loss.

Recipes:
- ``tuned-lens``: the published one. Zero-initialised translators; SGD with Nesterov momentum 0.9 and
  lr 1.0 in that convention (0.1 as PyTorch applies it); weight decay 1e-3 towards the identity;
  linear decay to zero, no warm-up; gradient-norm clipping at 1.0; KL(p_final || p_lens) summed over
  layers; documents joined with EOS and cut into chunks. The token budget is a parameter.
- ``warm``: the same optimiser started from the affine least-squares solution, fitted in one pass over
  the first ``warm_fit_tokens`` tokens of the same stream (they count towards the budget and the time).
Each chunk is used once, so the training loss of a step is an estimate on unseen data; ``stop_at`` ends
training early once the mean loss over layers reaches it (recorded, with the tokens actually spent).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from . import options
from .corpora import get_corpus
from .options import RECIPES
from .distributed import SINGLE, Group
from .models import LensModel
from .projectors import GramAccumulator, LeastSquaresProjector, fit_least_squares
from .projectors.tuned import TunedProjector
from .store import atomic_write_bytes, atomic_write_json, sha256_json



class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss); the message names the layer and step."""


@dataclass(frozen=True)
class TunedRecipe:
    """A recipe's user options take their defaults from the options schema; the rest are the recipe's constants."""

    name: str = options.default("recipe")
    token_budget: int = options.default("token_budget")
    chunk_len: int = options.default("tuned_chunk_len")
    tokens_per_step: int = options.default("tokens_per_step")
    lr: float = 1.0  # the tuned-lens convention: PyTorch's SGD gets lr * (1 - momentum)
    momentum: float = 0.9
    weight_decay: float = 1e-3
    clip: float = 1.0
    loss: str = options.default("tuned_loss")
    warm_fit_tokens: int = options.default("warm_fit_tokens")
    stop_at: float | None = options.default("stop_at")  # mean KL over layers (nats) at which to stop early
    seed: int = options.default("seed")

    def __post_init__(self):
        if self.name not in RECIPES:
            raise ValueError(f"unknown recipe {self.name!r}; expected one of {RECIPES}")
        if self.loss not in ("kl", "xent"):
            raise ValueError(f"loss must be 'kl' or 'xent', got {self.loss!r}")
        if self.tokens_per_step % self.chunk_len:
            raise ValueError("tokens_per_step must be a multiple of chunk_len")
        if self.token_budget < self.tokens_per_step:
            raise ValueError(f"token_budget ({self.token_budget}) is smaller than one step ({self.tokens_per_step} tokens)")

    @property
    def steps(self) -> int:
        return self.token_budget // self.tokens_per_step

    def as_dict(self) -> dict:
        return asdict(self)


def token_chunks(tokenizer, corpus_name: str, chunk_len: int, seed: int, split: str = "train"):
    """Chunks of ``chunk_len`` token ids: the split's documents in seeded order, joined with EOS.

    A generator: documents are tokenized as they are reached, so memory stays flat.
    """
    corpus = get_corpus(corpus_name)
    docs = corpus.split(split, seed=seed)
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


def stream_hash(corpus_name: str, recipe: TunedRecipe, tokenizer_vocab: int) -> str:
    corpus = get_corpus(corpus_name)
    return sha256_json({"corpus": corpus.source_hash, "chunk_len": recipe.chunk_len, "seed": recipe.seed,
                        "vocab": tokenizer_vocab})


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


class TunedTrainer:
    def __init__(self, lens: LensModel, recipe: TunedRecipe, fit_on: str, checkpoint: Path | None = None,
                 group: Group = SINGLE):
        if lens.masked:
            raise TrainingError("tuned lenses are trained on causal language models only")
        self.lens, self.recipe, self.fit_on, self.group = lens, recipe, fit_on, group
        self.checkpoint = Path(checkpoint) if checkpoint else None
        for p in lens.model.parameters():
            p.requires_grad_(False)  # the model is frozen; only the lens learns

    # -- state -----------------------------------------------------------------------------------

    def _init_params(self, chunks) -> tuple[torch.nn.Parameter, torch.nn.Parameter, int, float]:
        L, d = self.lens.num_layers, self.lens.d_model
        used, warm_seconds = 0, 0.0
        if self.recipe.name == "warm":
            start = time.perf_counter()
            acc = GramAccumulator(L + 1, d, "last")
            while used < self.recipe.warm_fit_tokens:
                step_chunks = [next(chunks) for _ in range(self.recipe.tokens_per_step // self.recipe.chunk_len)]
                mine = self.group.shard(step_chunks)
                if mine:
                    acc.update(self._states(torch.stack(mine)))
                used += sum(c.numel() for c in step_chunks)
            acc.reduce(self.group.sum_)
            affine = LeastSquaresProjector("affine", fit_least_squares(acc, intercept=True))
            init = TunedProjector.from_affine(affine, L)
            warm_seconds = time.perf_counter() - start
        else:
            init = TunedProjector.zeros(L, d)
        W = torch.nn.Parameter(init.weight.clone().to(self.lens.device))
        b = torch.nn.Parameter(init.bias.clone().to(self.lens.device))
        return W, b, used, warm_seconds

    def _states(self, batch: torch.Tensor) -> torch.Tensor:
        B, T = batch.shape
        rows = torch.arange(B).repeat_interleave(T)
        cols = torch.arange(T).repeat(B)
        return self.lens.capture(batch, torch.ones_like(batch), rows, cols).float()

    def _save_checkpoint(self, W, b, opt, sched, step, tokens, losses) -> None:
        if self.checkpoint is None or not self.group.is_main:
            return
        self.checkpoint.mkdir(parents=True, exist_ok=True)
        tensors = {"W": W.detach().cpu().contiguous(), "b": b.detach().cpu().contiguous()}
        for i, p in enumerate((W, b)):
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum{i}"] = buf.detach().cpu().contiguous()
        atomic_write_bytes(self.checkpoint / "state.safetensors", st_save(tensors))
        atomic_write_json(self.checkpoint / "state.json", {
            "step": step, "tokens": tokens, "losses": losses, "scheduler": sched.state_dict(),
            "recipe": self.recipe.as_dict(), "fit_on": self.fit_on})

    def _load_checkpoint(self):
        if self.checkpoint is None or not (self.checkpoint / "state.json").is_file():
            return None
        meta = json.loads((self.checkpoint / "state.json").read_text("utf-8"))
        if meta.get("recipe") != self.recipe.as_dict() or meta.get("fit_on") != self.fit_on:
            return None  # a checkpoint of another run: start over
        return meta, load_file(str(self.checkpoint / "state.safetensors"))

    # -- training ---------------------------------------------------------------------------------

    def train(self, progress: bool = True) -> tuple[TunedProjector, dict]:
        r, lens = self.recipe, self.lens
        L = lens.num_layers
        per_step = r.tokens_per_step // r.chunk_len
        chunks = token_chunks(lens.tokenizer, self.fit_on, r.chunk_len, r.seed)
        start = time.perf_counter()
        W, b, warm_tokens, warm_seconds = self._init_params(chunks)
        opt = torch.optim.SGD([W, b], lr=r.lr * (1 - r.momentum), momentum=r.momentum, nesterov=True, weight_decay=r.weight_decay)
        total_steps = max(1, (r.token_budget - warm_tokens) // r.tokens_per_step)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total_steps))
        step, tokens, losses = 0, warm_tokens, []
        resumed = self._load_checkpoint()
        if not self.group.all(resumed is not None):
            resumed = None  # every process resumes from the same checkpoint, or none does
        if resumed is not None:
            self.group.check_same(resumed[0]["step"], "the checkpoint step to resume from")
            meta, state = resumed
            step, tokens, losses = meta["step"], meta["tokens"], meta["losses"]
            with torch.no_grad():
                W.copy_(state["W"])
                b.copy_(state["b"])
            for i, p in enumerate((W, b)):
                if f"momentum{i}" in state:
                    opt.state[p]["momentum_buffer"] = state[f"momentum{i}"].clone()
            sched.load_state_dict(meta["scheduler"])
            for group, lr in zip(opt.param_groups, sched.get_last_lr()):
                group["lr"] = lr  # loading a scheduler's state does not set the optimiser's current rate
            for _ in range(step * per_step):  # the stream is deterministic: skip what was consumed
                next(chunks)
        stopped_early = False
        bar = tqdm(total=r.token_budget, initial=tokens, desc=f"tuned lens ({r.name}) on {self.fit_on}", unit="tok",
                   unit_scale=True, disable=not progress)
        try:
            while step < total_steps:
                try:
                    step_chunks = [next(chunks) for _ in range(per_step)]
                except StopIteration:
                    break  # the split is exhausted before the budget: recorded below
                step_losses = self._accumulate_gradients(W, b, step_chunks)
                bad = [l for l, v in enumerate(step_losses) if not math.isfinite(v)]
                if bad:
                    raise TrainingError(f"non-finite {r.loss} loss ({step_losses[bad[0]]}) at layer {bad[0]}, step {step}; "
                                        "the lens is not saved")
                torch.nn.utils.clip_grad_norm_([W, b], r.clip)
                opt.step()
                opt.zero_grad(set_to_none=False)
                sched.step()
                step += 1
                step_tokens = sum(c.numel() for c in step_chunks)
                tokens += step_tokens
                mean_loss = sum(step_losses) / L
                losses.append(round(mean_loss, 6))
                bar.update(step_tokens)
                bar.set_postfix(loss=f"{mean_loss:.4f}", step=step)
                self._save_checkpoint(W, b, opt, sched, step, tokens, losses)
                if r.stop_at is not None and mean_loss <= r.stop_at:
                    stopped_early = True
                    break
        finally:
            bar.close()
        info = {
            "recipe": r.as_dict(),
            "fit_on": self.fit_on,
            "steps": step,
            "tokens_spent": tokens,
            "warm_fit_tokens": warm_tokens,
            "warm_fit_seconds": round(warm_seconds, 2),
            "stopped_early": stopped_early,
            "budget_exhausted": step >= total_steps,
            "loss_curve": losses,
            "train_seconds": round(time.perf_counter() - start, 2),
        }
        return TunedProjector(W.detach().cpu().clone(), b.detach().cpu().clone()), info

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
        if self.group.distributed:
            grads = [W.grad if W.grad is not None else torch.zeros_like(W), b.grad if b.grad is not None else torch.zeros_like(b)]
            self.group.sum_([*grads, losses])
            W.grad, b.grad = grads
        return losses.tolist()
