"""The data-parallel group a run belongs to: the processes lm-eval splits items over, or just this one.

Under ``accelerate launch -m lm_eval`` every process scores its own share of the items. Fitting has to
see all of the fit data, so each process accumulates statistics over its share and the sums are
all-reduced; the solves that follow are then the same on every process. Collectives must be called by
every process in the same order, so what a run will fit and score is first agreed on by all of them.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Large tensors (an all-pairs Gram of several GiB) are reduced in slices of this many elements,
# so the device copy that NCCL needs stays small.
REDUCE_SLICE = 1 << 25


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, seq):
        """This process's share of ``seq``: every world_size-th element, as lm-eval splits documents."""
        return seq[self.rank::self.world_size]

    def sum_(self, tensors) -> None:
        """All-reduce (sum) each tensor in place across the group."""
        if not self.distributed:
            return
        device = _collective_device()
        for t in tensors:
            flat = t.view(-1)
            for start in range(0, flat.numel(), REDUCE_SLICE):
                part = flat[start:start + REDUCE_SLICE]
                moved = part.to(device)
                dist.all_reduce(moved, op=dist.ReduceOp.SUM)
                if moved is not part:
                    part.copy_(moved)

    def gather(self, obj) -> list:
        """Every process's ``obj``, in rank order, on every process."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all(self, flag: bool) -> bool:
        return all(self.gather(bool(flag)))

    def check_same(self, obj, what: str) -> None:
        """Raise if processes disagree on ``obj`` (a run whose processes diverged would deadlock or mix results)."""
        values = self.gather(pickle.dumps(obj))
        if any(v != values[0] for v in values):
            raise RuntimeError(f"data-parallel processes disagree on {what}")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


SINGLE = Group()


def _collective_device() -> torch.device:
    # NCCL reduces device tensors only; gloo (CPU) reduces host tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_of(lm) -> Group:
    """The group of an lm-eval model: lm-eval's own rank and world size, backed by torch.distributed.

    Tensor-parallel launches report world size 1 on every process: those run every item everywhere
    and need no reduction.
    """
    world_size = int(getattr(lm, "world_size", 1) or 1)
    if world_size <= 1:
        return SINGLE
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"lm-eval reports {world_size} processes but torch.distributed is not initialised")
    if dist.get_world_size() != world_size:
        raise RuntimeError(f"lm-eval reports {world_size} processes, torch.distributed {dist.get_world_size()}")
    return Group(dist.get_rank(), world_size)
