"""Layer interventions (harness/layer_spec.py) applied to a Hugging Face model's own blocks, for any forward
pass or generation, without per-architecture code.

The model's forward loop calls every block with per-slot arguments (Gemma 3: the sliding or full mask and the
local or global rotary embedding of that slot's layer type). A block moved elsewhere must still get its own
slot's arguments, so the span's slots defer: slots FIRST..LAST-1 record their call and return their input
unchanged; slot LAST, once every span slot's arguments are known, runs the program (which block runs when) by
calling each block's original forward with that block's own recorded arguments. Blocks stay the same module
objects in the same list: hooks on them (``LensModel.capture``, transformers' hidden-state recording) still
fire once per slot. Hidden states read at slots FIRST..LAST-1 are therefore the span's input, and slot LAST
gives the span's output (``record["span_input_slots"]``). Hooks do not fire for the blocks the program runs.

KV cache (attention layers write it at their ``layer_idx``; a DynamicCache exists even in a plain forward):
- reverse, random, parallel, looped_parallel with K=1: every block runs once per token and writes its own
  cache layer, so generation with a cache is exact.
- middle_repeat: repetition i writes cache layer FIRST+i (``layer_idx`` of the block's modules is set for that
  call and restored), so every cache layer is written once per token. Exact when those layers have the
  repeated block's attention type; otherwise only a forward pass without past tokens is allowed.
- skip: the span's cache layers stay empty. The model reads the cached length from layer 0 and the first layer
  of each attention type (positions, mask sizes); when one of those is skipped, only a forward pass without
  past tokens is allowed.
- looped_parallel with K>1: loops after the first run without the cache (there is one cache layer per block);
  only a forward pass without past tokens is allowed.
A disallowed combination raises ``LayerInterventionError``: a forward pass whose cache holds past tokens, or
``generate`` with the cache on (the model's ``generate`` is wrapped while the intervention is active). With
``uncached_generate`` (lm-eval's hf model, which always asks for the cache), ``generate`` runs without the
cache instead: every step recomputes the whole sequence, which is exact.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref

import torch
from torch import nn

from .layer_spec import LayerSpec, check_range, parse_layer_spec
from .models import ACTIVE_INTERVENTIONS as _ACTIVE  # refuses a second intervention; the fingerprint reads it
from .models import AdapterError, block_list, intervention_record

log = logging.getLogger(__name__)
_MISSING = object()


class LayerInterventionError(RuntimeError):
    """The model cannot run this intervention here (mostly: with a KV cache it would make wrong)."""


def _hidden(args, kwargs) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    raise AdapterError("a block was called without its hidden states as first argument or hidden_states=")


def _with_hidden(args, kwargs, hidden):
    if args and isinstance(args[0], torch.Tensor):
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _cache_class():
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers always has it
        return ()
    return Cache


def _find_cache(calls: dict):
    cache_type = _cache_class()
    for args, kwargs in calls.values():
        for value in (*args, *kwargs.values()):
            if cache_type and isinstance(value, cache_type):
                return value
    return None


def _without_cache(args, kwargs):
    cache_type = _cache_class()
    drop = (lambda v: None if cache_type and isinstance(v, cache_type) else v)
    return tuple(drop(a) for a in args), {k: drop(v) for k, v in kwargs.items()}


def _cached_tokens(cache, span: list[int]) -> int:
    """The longest sequence cached in the span's layers: nothing writes them before the span's last slot, so
    they hold only past tokens (layers before the span were already written in this forward pass)."""
    layers = getattr(cache, "layers", None) or []
    lengths = [0]
    for j in span:
        try:
            lengths.append(int(layers[j].get_seq_length()) if j < len(layers) else 0)
        except Exception:  # layers without a length (linear attention) do not tell
            pass
    return max(lengths)


@contextlib.contextmanager
def _layer_index(block: nn.Module, index: int | None):
    """Every int ``layer_idx`` of ``block``'s modules set to ``index`` (the cache layer they write), then restored."""
    if index is None:
        yield
        return
    saved = [(m, m.layer_idx) for m in block.modules()
             if isinstance(getattr(m, "layer_idx", None), int) and not isinstance(m.layer_idx, bool)]
    try:
        for m, _ in saved:
            m.layer_idx = index
        yield
    finally:
        for m, old in saved:
            m.layer_idx = old


def cache_layer_types(model: nn.Module, num_layers: int) -> list[str]:
    """The attention type of every cache layer, as transformers builds the cache from the config."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = None
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types = list(get_layer_types_and_kwargs(config)[0])
    except Exception:  # older transformers, or configs it cannot read: the config's own list
        types = getattr(config, "layer_types", None)
    if not types or len(types) != num_layers:
        types = ["full_attention"] * num_layers
    return [str(t) for t in types]


def _cache_refusal(spec: LayerSpec, program: list, types: list[str]) -> str | None:
    """Why a cache holding past tokens would give wrong results under this program, or None when it is exact."""
    span = set(spec.span)
    if spec.kind == "skip":
        read = {0} | {types.index(t) for t in set(types)}  # where the model reads the cached length
        hit = sorted(span & read)
        if hit:
            return (f"skipping block(s) {hit} leaves cache layer(s) empty that the model reads the cached length from "
                    "(layer 0 and the first layer of each attention type), so positions and masks of later tokens would be wrong")
    if spec.kind == "middle_repeat":
        middle = program[0][0]
        other = sorted({types[j] for j in span} - {types[middle]})
        if other:
            return (f"the repeated block {middle} ({types[middle]}) would write its cache into layers of another "
                    f"attention type ({', '.join(other)})")
    if spec.kind == "looped_parallel" and spec.k > 1:
        return f"each block of the span runs {spec.k} times per token, but the cache has one layer per block"
    return None


class Intervention:
    """One intervention installed on a model's blocks until ``remove()``; ``record`` says what runs."""

    def __init__(self, model: nn.Module, spec, seed: int | None = None, blocks=None, uncached_generate: bool = False):
        from .options import default

        self.model = model
        self.uncached_generate = uncached_generate
        self._warned = False
        self.blocks = list(block_list(model) if blocks is None else blocks)
        self.spec = check_range(parse_layer_spec(spec), len(self.blocks))
        if len({id(b) for b in self.blocks}) != len(self.blocks):
            # one module in several slots (shared weights): a slot's forward cannot be told from another's
            raise LayerInterventionError(f"{type(model).__name__}: its block list holds the same module in several slots; "
                                         "layer interventions need one module per block")
        seed = default("seed") if seed is None else int(seed)
        self.program = self.spec.program(seed)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if getattr(config, "kv_sharing_modes", None) is not None:
            raise LayerInterventionError(f"{type(model).__name__}: its layers share KV caches with other layers, so moving or "
                                         "skipping blocks changes what the others read; layer interventions are not supported")
        types = cache_layer_types(model, len(self.blocks))
        self.refusal = _cache_refusal(self.spec, self.program, types)
        first = self.spec.first
        # (blocks, cache layer each writes (None: its own), whether it runs without the cache)
        self.steps = [(step, [None] * len(step), False) for step in self.program]
        if self.spec.kind == "middle_repeat":
            self.steps = [(step, [first + i], False) for i, step in enumerate(self.program)]
        if self.spec.kind == "looped_parallel":
            self.steps = [(step, [None] * len(step), i > 0) for i, step in enumerate(self.program)]
        self.record = {
            "spec": self.spec.text, "kind": self.spec.kind, "first": self.spec.first, "last": self.spec.last,
            "k": self.spec.k, "seed": seed if self.spec.kind == "random" else None,
            "order": [j for step in self.program for j in step], "program": [list(step) for step in self.program],
            "num_layers": len(self.blocks), "span_input_slots": list(range(self.spec.first, self.spec.last)),
            "cache_with_past": "exact" if self.refusal is None else f"refused: {self.refusal}",
        }
        if self.refusal is not None and uncached_generate:
            self.record["generate"] = "without the KV cache"
        self._calls: dict | None = None
        self._seen = weakref.WeakSet()  # caches a forward pass already wrote: they hold past tokens
        self._saved: dict[int, object] = {}
        self._forwards: dict[int, object] = {}
        self._saved_generate = _MISSING
        self._wrapped_generate = False

    # -- install / remove ----------------------------------------------------------------------------

    def install(self) -> "Intervention":
        busy = [i for i, b in enumerate(self.blocks) if b in _ACTIVE]
        if busy:
            raise LayerInterventionError(f"blocks {busy} already run under layer intervention "
                                         f"{_ACTIVE[self.blocks[busy[0]]].spec.text}; remove it first")
        try:
            for j in self.spec.span:
                block = self.blocks[j]
                self._saved[j] = block.__dict__.get("forward", _MISSING)
                self._forwards[j] = block.forward  # the forward the module would run (bound method, or a wrapper)
            for j in self.spec.span:
                self.blocks[j].forward = self._slot(j)
            for block in self.blocks:
                _ACTIVE[block] = self
            if self.refusal is not None and callable(getattr(self.model, "generate", None)):
                self._saved_generate = self.model.__dict__.get("generate", _MISSING)
                self.model.generate = self._guarded_generate(self.model.generate)
                self._wrapped_generate = True
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Put back every forward (and ``generate``) as it was; safe to call twice."""
        for j, saved in self._saved.items():
            block = self.blocks[j]
            if saved is _MISSING:
                block.__dict__.pop("forward", None)
            else:
                block.forward = saved
        self._saved.clear()
        if self._wrapped_generate:
            if self._saved_generate is _MISSING:
                self.model.__dict__.pop("generate", None)
            else:
                self.model.generate = self._saved_generate
        self._saved_generate, self._wrapped_generate = _MISSING, False
        for block in self.blocks:
            if _ACTIVE.get(block) is self:
                del _ACTIVE[block]
        self._calls = None

    def _guarded_generate(self, generate):
        @functools.wraps(generate)
        def guarded(*args, **kwargs):
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
                use_cache = getattr(config, "use_cache", True)
            if use_cache is not False and self.uncached_generate:
                if not self._warned:
                    log.warning("jtc_layers=%s: generating without the KV cache (%s)", self.spec.text, self.refusal)
                    self._warned = True
                kwargs["use_cache"] = False
            elif use_cache is not False:
                raise LayerInterventionError(f"jtc_layers={self.spec.text} cannot generate with a KV cache: {self.refusal}; "
                                             "pass use_cache=False to generate")
            return generate(*args, **kwargs)

        return guarded

    # -- running -------------------------------------------------------------------------------------

    def _slot(self, slot: int):
        first, last = self.spec.first, self.spec.last

        def forward(*args, **kwargs):
            if slot == first:
                self._calls = {}
            elif self._calls is None or slot - 1 not in self._calls:
                raise LayerInterventionError(f"block {slot} ran without blocks {first}..{slot - 1} before it in the same "
                                             f"forward pass; jtc_layers={self.spec.text} needs the blocks run in order")
            self._calls[slot] = (args, kwargs)
            if slot < last:
                return _hidden(args, kwargs)  # deferred: the span runs at its last slot
            calls, self._calls = self._calls, None
            return self._run(calls)

        return forward

    def _run(self, calls: dict) -> torch.Tensor:
        hidden = _hidden(*calls[self.spec.first])
        cache = _find_cache(calls)
        if cache is not None and self.refusal is not None and (cache in self._seen or _cached_tokens(cache, self.spec.span) > 0):
            raise LayerInterventionError(f"jtc_layers={self.spec.text} cannot run on a KV cache that holds past tokens: "
                                         f"{self.refusal}; run without the cache (use_cache=False)")
        for blocks, cache_layers, cacheless in self.steps:
            outputs = [self._call(j, calls[j], hidden, layer, cacheless) for j, layer in zip(blocks, cache_layers)]
            # a parallel group: every block read the same state; the mean of their outputs (residual included)
            hidden = outputs[0] if len(outputs) == 1 else torch.stack(outputs).mean(dim=0)
        if cache is not None:
            self._seen.add(cache)
        return hidden

    def _call(self, j: int, call, hidden, layer, cacheless) -> torch.Tensor:
        args, kwargs = _with_hidden(*call, hidden)
        if cacheless:
            args, kwargs = _without_cache(args, kwargs)
        with _layer_index(self.blocks[j], layer):
            out = self._forwards[j](*args, **kwargs)  # the block's own forward: no hooks fire for it
        if not isinstance(out, torch.Tensor):
            raise AdapterError(f"block {j} ({type(self.blocks[j]).__name__}) returned {type(out).__name__}, not its hidden "
                               "state tensor; layer interventions need blocks that return a tensor (transformers >= 5)")
        return out


def apply_layers(model: nn.Module, spec, seed: int | None = None, blocks=None, uncached_generate: bool = False) -> Intervention:
    """Install ``spec`` on ``model`` until the returned intervention's ``remove()``. ``blocks``: the block list
    (found by inspection when omitted); ``seed``: the random order's (the jtc option's default when omitted);
    ``uncached_generate``: where a KV cache would be wrong, ``generate`` runs without it instead of refusing."""
    return Intervention(model, spec, seed, blocks, uncached_generate).install()


@contextlib.contextmanager
def intervened(model: nn.Module, spec, seed: int | None = None, blocks=None):
    """``with intervened(model, "reverse:2:5") as record:`` runs the model under the intervention; afterwards (even
    after an error) the model is as it was."""
    handle = apply_layers(model, spec, seed, blocks)
    try:
        yield handle.record
    finally:
        handle.remove()


def active_record(blocks) -> dict | None:
    """The record of the intervention active on these blocks (a block list, or a model), or None."""
    if isinstance(blocks, nn.Module) and not isinstance(blocks, nn.ModuleList):
        try:
            blocks = block_list(blocks)
        except AdapterError:
            return None
    return intervention_record(blocks)
