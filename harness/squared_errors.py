"""Per-item squared errors of a projector, kept on disk while an evaluation set streams through.

Per-item r^2 divides each coordinate's squared error by that coordinate's variance over the whole evaluation
set, which is known only after the last item. Holding items x layers x d errors in memory until then grows
with the set (2 GB per projector for 3,000 items of a 28-layer, d = 1536 model); here each batch's errors, summed
per item, go to an anonymous temporary file, and the reductions read them back a batch at a time. Memory is
one batch's errors, whatever the set's size; the values are the same float32 sums as in memory.
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch


class SquaredErrors:
    """Squared errors (item, layer, coordinate) of ``n_items`` items, added a batch at a time, reduced at the end."""

    def __init__(self, n_items: int, n_layers: int, d: int):
        self.shape = (n_items, n_layers, d)
        self._file = tempfile.TemporaryFile(prefix="jtc-sq-err-")  # removed when closed, or when the process ends
        self._blocks: list[torch.Tensor] = []  # the item indices of each written block, in file order

    def add(self, owner: torch.Tensor, sq: torch.Tensor) -> None:
        """``sq``: (layers, positions, d) squared errors of positions owned by items ``owner`` (positions,)."""
        items, inverse = torch.unique(owner.cpu(), return_inverse=True)
        block = torch.zeros(len(items), self.shape[1], self.shape[2], dtype=torch.float32)
        block.index_add_(0, inverse, sq.permute(1, 0, 2).float().cpu())
        self._file.write(block.numpy().tobytes())
        self._blocks.append(items)

    def weighted_sums(self, weights: torch.Tensor) -> torch.Tensor:
        """(items, layers, K): for each item and layer, its squared errors summed over positions and weighted over
        coordinates by each column of ``weights`` (d, K), in float64. Items without errors get 0."""
        _, L, d = self.shape
        weights = weights.double()
        out = torch.zeros(self.shape[0], L, weights.shape[1], dtype=torch.float64)
        self._file.flush()
        self._file.seek(0)
        for items in self._blocks:
            count = len(items) * L * d
            raw = self._file.read(count * 4)
            if len(raw) != count * 4:
                raise OSError(f"squared-error scratch file ended early ({len(raw)} of {count * 4} bytes)")
            block = torch.from_numpy(np.frombuffer(raw, dtype=np.float32).reshape(len(items), L, d).copy())
            out.index_add_(0, items, block.double() @ weights)
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SquaredErrors:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
