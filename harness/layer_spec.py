"""The ``jtc_layers`` option: which blocks of the model run, and in what order ("Transformer Layers as
Painters", Sun et al. 2024).

``KIND:FIRST:LAST[:K]`` names a span of blocks FIRST..LAST (inclusive, 0-based) and what happens to it:

- ``skip``: the span is not run; its input passes through.
- ``middle_repeat``: the span's middle block ((FIRST+LAST)//2) is run LAST-FIRST+1 times in its place.
- ``reverse``: the span's blocks run in reverse order.
- ``random``: the span's blocks run in a seeded random order.
- ``parallel``: every block of the span reads the span's input; the span's output is the mean of their
  outputs (each output includes the block's own residual stream).
- ``looped_parallel``: the parallel span applied K times in a row (K >= 1; only this kind takes K).

Nothing here imports torch: a spec's syntax is checked before any model is loaded; its range once the
number of layers is known (``check_range``, from the model's config).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

KINDS = ("skip", "middle_repeat", "reverse", "random", "parallel", "looped_parallel")
SYNTAX = "KIND:FIRST:LAST[:K]"


class LayerSpecError(ValueError):
    """A ``jtc_layers`` value that names no valid intervention; the message says what is allowed."""


def _allowed(num_layers: int | None = None) -> str:
    span = f"0..{num_layers - 1}" if num_layers else "0..L-1 (L: the model's number of layers)"
    return (f"jtc_layers takes {SYNTAX} with KIND one of {', '.join(KINDS)}, FIRST <= LAST block indices in {span}, "
            "and K (a count >= 1) only for looped_parallel")


@dataclass(frozen=True)
class LayerSpec:
    kind: str
    first: int
    last: int
    k: int | None = None

    @property
    def text(self) -> str:
        return f"{self.kind}:{self.first}:{self.last}" + (f":{self.k}" if self.k is not None else "")

    @property
    def span(self) -> list[int]:
        return list(range(self.first, self.last + 1))

    def program(self, seed: int) -> list[tuple[int, ...]]:
        """What runs in the span's place, in order: a 1-tuple is one block run on the running state; a longer
        tuple is a parallel group (each block reads the same state, their outputs are averaged)."""
        span = self.span
        if self.kind == "skip":
            return []
        if self.kind == "middle_repeat":
            return [((self.first + self.last) // 2,)] * len(span)
        if self.kind == "reverse":
            return [(j,) for j in reversed(span)]
        if self.kind == "random":
            order = list(span)
            random.Random(seed).shuffle(order)  # Python's shuffle is stable across versions for a given seed
            return [(j,) for j in order]
        return [tuple(span)] * (self.k if self.kind == "looped_parallel" else 1)


def parse_layer_spec(value) -> LayerSpec:
    """The spec a ``jtc_layers`` text names; ``LayerSpecError`` for anything else (range not checked)."""
    if isinstance(value, LayerSpec):
        return value
    text = str(value).strip()
    parts = [p.strip() for p in text.split(":")]
    if len(parts) not in (3, 4):
        raise LayerSpecError(f"jtc_layers={text!r} is not {SYNTAX}; {_allowed()}")
    kind = parts[0]
    if kind not in KINDS:
        raise LayerSpecError(f"jtc_layers={text!r}: unknown kind {kind!r}; {_allowed()}")
    numbers = []
    for name, part in zip(("FIRST", "LAST", "K"), parts[1:]):
        if not part.isdigit():
            raise LayerSpecError(f"jtc_layers={text!r}: {name} {part!r} is not a whole number >= 0; {_allowed()}")
        numbers.append(int(part))
    first, last = numbers[:2]
    k = numbers[2] if len(numbers) == 3 else None
    if first > last:
        raise LayerSpecError(f"jtc_layers={text!r}: FIRST {first} is after LAST {last}; {_allowed()}")
    if kind == "looped_parallel" and k is None:
        raise LayerSpecError(f"jtc_layers={text!r}: looped_parallel needs K, the number of loops; {_allowed()}")
    if kind != "looped_parallel" and k is not None:
        raise LayerSpecError(f"jtc_layers={text!r}: {kind} takes no K; {_allowed()}")
    if k is not None and k < 1:
        raise LayerSpecError(f"jtc_layers={text!r}: K must be >= 1; {_allowed()}")
    return LayerSpec(kind, first, last, k)


def check_range(spec: LayerSpec, num_layers: int) -> LayerSpec:
    if spec.last >= num_layers:
        raise LayerSpecError(f"jtc_layers={spec.text!r}: block {spec.last} does not exist, the model has {num_layers} "
                             f"blocks (0..{num_layers - 1}); {_allowed(num_layers)}")
    return spec


def config_num_layers(config) -> int | None:
    """The number of blocks a Hugging Face config names (of its text model for multimodal configs), or None."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
