"""The logit lens: a hidden state is read as it is."""

from __future__ import annotations

import torch

from .base import Projector


class IdentityProjector(Projector):
    name = "id"

    def project(self, states: torch.Tensor, sources: list[int], target: int) -> torch.Tensor:
        return states[list(sources)]
