"""The one interface every projector family implements."""

from __future__ import annotations

import abc

import torch


class Projector(abc.ABC):
    """Maps hidden states of source layers to stand-ins for a target layer's state."""

    name: str

    @abc.abstractmethod
    def project(self, states: torch.Tensor, sources: list[int], target: int) -> torch.Tensor:
        """``states`` is (L+1, P, d), h_0..h_L at P positions; returns (len(sources), P, d)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """Fitted parameters to save (none for a projector that is not fitted)."""
        return {}
