"""Sub-modules of every block (attention, feed-forward, the norms on the residual path), found by inspection and
checked against the model's own forward pass, and interventions that replace them.

A block is mapped when its direct children hold exactly one attention module (class name with "Attention") and
one feed-forward module (class name with "MLP", or a child named mlp / feed_forward / ffn), and its norms are
its direct norm children. The wiring is then read off one forward pass, not assumed per family: which norm feeds
attention, whether a norm follows attention or the feed-forward (Gemma 3's extra norms), and whether the
feed-forward reads the residual after attention (sequential) or before it (parallel, GPT-NeoX). The block's
output must equal its input plus the two branches' outputs; anything else is refused with what did not match.

Interventions are forward hooks on the mapped modules, removed when the ``with`` block ends, even on error.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .models import AdapterError, LensModel, _first_tensor, _is_norm

PARTS = ("attn", "ffn", "norm")
MODES = ("linear", "removed")  # the sub-module replaced by its fitted linear map, or taken out
FFN_NAMES = ("mlp", "feed_forward", "ffn")
CHECK_TEXT = "The quick brown fox jumps over the lazy dog because it was late."


@dataclass
class BlockParts:
    attn: nn.Module
    ffn: nn.Module
    norms: list[nn.Module]  # every norm directly in the block, in registration order
    layout: str = ""  # "sequential" or "parallel", read off the forward pass
    wiring: dict | None = None  # which norm sits where (names), for the provenance

    def modules(self, part: str) -> list[nn.Module]:
        return {"attn": [self.attn], "ffn": [self.ffn], "norm": list(self.norms)}[part]


def _children(block: nn.Module, kind) -> list[tuple[str, nn.Module]]:
    return [(n, c) for n, c in block.named_children() if kind(n, c)]


def find_parts(lens: LensModel) -> list[BlockParts]:
    """The sub-modules of every block, by inspection; an error names what a block lacks."""
    out = []
    for i, block in enumerate(lens.blocks):
        attn = _children(block, lambda n, c: "attention" in type(c).__name__.lower())
        ffn = _children(block, lambda n, c: "mlp" in type(c).__name__.lower() or n in FFN_NAMES)
        norms = _children(block, lambda n, c: _is_norm(c))
        listing = ", ".join(f"{n} ({type(c).__name__})" for n, c in block.named_children())
        problems = []
        if len(attn) != 1:
            problems.append(f"{len(attn)} attention children (needs exactly one whose class name holds 'Attention')")
        if len(ffn) != 1:
            problems.append(f"{len(ffn)} feed-forward children (needs exactly one whose class name holds 'MLP' or named "
                            f"{' / '.join(FFN_NAMES)})")
        if not norms:
            problems.append("no norm child")
        if problems:
            raise AdapterError(f"{type(lens.model).__name__}: block {i} ({type(block).__name__}) cannot be split into "
                               f"sub-modules: {'; '.join(problems)}. Its children: {listing}")
        out.append(BlockParts(attn=attn[0][1], ffn=ffn[0][1], norms=[c for _, c in norms]))
    return out


def _hidden_arg(args, kwargs) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    raise AdapterError("a sub-module was called without its hidden states as first argument or hidden_states=")


@contextlib.contextmanager
def _recording(modules: dict[str, nn.Module]):
    """Inputs and outputs (first tensor) of ``modules`` during one forward pass, by name."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, module in modules.items():
        def hook(_m, args, kwargs, output, name=name):
            seen[name] = (_hidden_arg(args, kwargs).detach(), _first_tensor(output).detach())
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _dev(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


@torch.no_grad()
def map_and_verify(lens: LensModel, text: str = CHECK_TEXT) -> tuple[list[BlockParts], dict]:
    """Find every block's sub-modules and read their wiring off one forward pass; the recomposition
    input + attention branch + feed-forward branch must reproduce each block's output. Returns the parts and
    the largest relative deviation of each check."""
    parts = find_parts(lens)
    named: dict[str, nn.Module] = {}
    for i, (block, p) in enumerate(zip(lens.blocks, parts)):
        named[f"{i}.block"] = block
        named[f"{i}.attn"] = p.attn
        named[f"{i}.ffn"] = p.ffn
        for k, norm in enumerate(p.norms):
            named[f"{i}.norm{k}"] = norm
    ids = lens.tokenizer(text, return_tensors="pt")["input_ids"][:, :32].to(lens.device)
    with _recording(named) as seen:
        lens.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids))
    missing = [n for n in named if n not in seen]
    if missing:
        raise AdapterError(f"{type(lens.model).__name__}: sub-modules not on the forward path: {', '.join(missing[:6])}")
    tol = 1e-3 if lens.dtype == torch.float32 else 3e-2
    worst: dict[str, float] = {}

    def note(check: str, value: float) -> None:
        worst[check] = max(worst.get(check, 0.0), value)

    for i, p in enumerate(parts):
        x, out = seen[f"{i}.block"]
        attn_in, attn_out = seen[f"{i}.attn"]
        ffn_in, ffn_out = seen[f"{i}.ffn"]
        norms = [seen[f"{i}.norm{k}"] for k in range(len(p.norms))]

        def norm_between(source: torch.Tensor, target: torch.Tensor | None = None) -> int | None:
            """The norm whose input is ``source`` (and, if given, whose output is ``target``). Of several that match
            in value (norms with equal weights), the one whose output is the very tensor the target received."""
            found = [k for k, (n_in, n_out) in enumerate(norms)
                     if n_in.shape == source.shape and _dev(n_in, source) <= tol and (target is None or _dev(n_out, target) <= tol)]
            same = [k for k in found if target is not None and norms[k][1].data_ptr() == target.data_ptr()]
            return (same or found or [None])[0]

        where = f"{type(lens.model).__name__}, block {i}"
        pre_attn = norm_between(x, attn_in)
        if pre_attn is None:
            raise AdapterError(f"{where}: attention does not read a norm of the block's input (a post-norm block?); "
                               "only pre-norm blocks can be split into sub-modules")
        post_attn = norm_between(attn_out)
        a = norms[post_attn][1] if post_attn is not None else attn_out
        pre_ffn_seq = norm_between(x + a, ffn_in)
        pre_ffn_par = norm_between(x, ffn_in)
        if pre_ffn_seq is not None:
            p.layout, pre_ffn = "sequential", pre_ffn_seq
        elif pre_ffn_par is not None:
            p.layout, pre_ffn = "parallel", pre_ffn_par
        else:
            raise AdapterError(f"{where}: the feed-forward does not read a norm of the residual stream, before or after "
                               "attention; the block's wiring is not one the sub-module study knows")
        post_ffn = norm_between(ffn_out)
        m = norms[post_ffn][1] if post_ffn is not None else ffn_out
        deviation = _dev(x + a + m, out)
        note("recomposition", deviation)
        if deviation > tol:
            raise AdapterError(f"{where}: input + attention branch + feed-forward branch does not reproduce the block's "
                               f"output (relative deviation {deviation:.3g} > {tol}); the block has a path the map misses")
        p.wiring = {"pre_attention_norm": pre_attn, "post_attention_norm": post_attn, "pre_ffn_norm": pre_ffn,
                    "post_ffn_norm": post_ffn, "layout": p.layout}
    return parts, worst


def _replace(module: nn.Module, fn):
    """A forward hook giving ``module`` the output fn(input) (its first output, when it returns a tuple)."""
    def hook(_m, args, kwargs, output):
        new = fn(_hidden_arg(args, kwargs))
        if isinstance(output, tuple):
            return (new.to(output[0].dtype),) + tuple(output[1:])
        return new.to(output.dtype)
    return module.register_forward_hook(hook, with_kwargs=True)


@contextlib.contextmanager
def intervene(parts: list[BlockParts], part: str, start: int, mode: str, maps: dict[str, torch.Tensor] | None = None):
    """Within the block: in every block from ``start`` to the last, ``part`` replaced by its linear map
    (``maps`` keyed as ``map_names``) or removed (attention and feed-forward output zero; a norm passes its input)."""
    if part not in PARTS or mode not in MODES:
        raise ValueError(f"unknown sub-module intervention {part!r}/{mode!r}; parts {PARTS}, modes {MODES}")
    handles = []
    try:
        for i in range(start, len(parts)):
            for k, module in enumerate(parts[i].modules(part)):
                if mode == "removed":
                    fn = (lambda h: h) if part == "norm" else torch.zeros_like
                else:
                    M = maps[map_name(part, i, k)]
                    fn = (lambda h, M=M: (h.to(M.dtype) @ M))
                handles.append(_replace(module, fn))
        yield
    finally:
        for h in handles:
            h.remove()


def map_name(part: str, block: int, index: int = 0) -> str:
    return f"{part}.{block}" if part != "norm" else f"norm.{block}.{index}"


def mapped_modules(parts: list[BlockParts]) -> dict[str, nn.Module]:
    """Every module that gets a linear map, by map name."""
    out = {}
    for i, p in enumerate(parts):
        for part in PARTS:
            for k, module in enumerate(p.modules(part)):
                out[map_name(part, i, k)] = module
    return out
