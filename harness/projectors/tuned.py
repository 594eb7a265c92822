"""The tuned lens (Belrose et al., 2023): v = h_l + W_l h_l + b_l, trained against the model's output.

W and b start at zero (the identity map), or for the ``warm`` recipe at the affine least-squares
solution. Weight decay on (W, b) therefore pulls the lens towards the identity. Lenses can be
exchanged with the public tuned-lens package: its ``config.json`` + ``params.pt`` (one Linear
translator per layer, keys ``{l}.weight`` / ``{l}.bias``), read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..store import atomic_write_bytes, atomic_write_json
from .base import Projector
from .least_squares import LeastSquaresProjector


class TunedProjector(Projector):
    name = "tuned"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        if weight.ndim != 3 or weight.shape[1] != weight.shape[2] or bias.shape != weight.shape[:2]:
            raise ValueError(f"expected weight (L, d, d) and bias (L, d), got {tuple(weight.shape)} and {tuple(bias.shape)}")
        self.weight = weight
        self.bias = bias

    @classmethod
    def zeros(cls, num_layers: int, d: int) -> "TunedProjector":
        return cls(torch.zeros(num_layers, d, d), torch.zeros(num_layers, d))

    @classmethod
    def from_affine(cls, affine: LeastSquaresProjector, num_layers: int) -> "TunedProjector":
        """The affine least-squares map h M + b written as h + h W^T + b, i.e. W = M^T - I."""
        Ms, bs = [], []
        for l in range(num_layers):
            M, b = affine.solutions[(l, num_layers)]
            Ms.append(M.double().T - torch.eye(M.shape[0], dtype=torch.float64))
            bs.append(b.double())
        return cls(torch.stack(Ms).float(), torch.stack(bs).float())

    def project(self, states: torch.Tensor, sources: list[int], target: int) -> torch.Tensor:
        if target != self.weight.shape[0]:
            raise KeyError(f"tuned lens maps to the last layer ({self.weight.shape[0]}), not {target}")
        h = states[list(sources)]
        W = self.weight[list(sources)].to(h.device, h.dtype)
        b = self.bias[list(sources)].to(h.device, h.dtype)
        return h + torch.baddbmm(b[:, None, :], h, W.transpose(1, 2))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"W": self.weight.float().contiguous(), "b": self.bias.float().contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "TunedProjector":
        return cls(tensors["W"], tensors["b"])


def unembed_hash(unembed_weight: torch.Tensor) -> str:
    """The tuned-lens package's identity of an unembedding: sha256 of its numpy text form at precision 1."""
    import hashlib

    return hashlib.sha256(np.array_str(unembed_weight.detach().cpu().float().numpy(), precision=1).encode()).hexdigest()


def export_tuned_lens(projector: TunedProjector, folder: Path, base_model: str, unembed_weight: torch.Tensor) -> None:
    """Write ``config.json`` and ``params.pt`` in the tuned-lens package's layout."""
    import io

    folder = Path(folder)
    L, d, _ = projector.weight.shape
    state = {}
    for l in range(L):
        state[f"{l}.weight"] = projector.weight[l].clone().contiguous()
        state[f"{l}.bias"] = projector.bias[l].clone().contiguous()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(folder / "params.pt", buffer.getvalue())
    atomic_write_json(folder / "config.json", {
        "base_model_name_or_path": base_model, "d_model": d, "num_hidden_layers": L, "bias": True,
        "base_model_revision": None, "unembed_hash": unembed_hash(unembed_weight), "lens_type": "linear_tuned_lens",
    })


def import_tuned_lens(folder: Path, num_layers: int, d: int, unembed_weight: torch.Tensor | None = None) -> TunedProjector:
    """Read a tuned-lens package lens; only tensors are unpickled (weights_only=True)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text("utf-8"))
    if config.get("lens_type", "linear_tuned_lens") != "linear_tuned_lens":
        raise ValueError(f"{folder}: lens type {config.get('lens_type')!r} is not a linear tuned lens")
    if config.get("d_model") != d or config.get("num_hidden_layers") != num_layers:
        raise ValueError(f"{folder}: lens for d_model={config.get('d_model')}, {config.get('num_hidden_layers')} layers; "
                         f"the model has d_model={d}, {num_layers} layers")
    if unembed_weight is not None and config.get("unembed_hash") and config["unembed_hash"] != unembed_hash(unembed_weight):
        raise ValueError(f"{folder}: the lens was trained for another unembedding (hash mismatch)")
    state = torch.load(folder / "params.pt", map_location="cpu", weights_only=True)
    weight = torch.zeros(num_layers, d, d)
    bias = torch.zeros(num_layers, d)
    for l in range(num_layers):
        try:
            weight[l] = state[f"{l}.weight"]
            if config.get("bias", True):
                bias[l] = state[f"{l}.bias"]
        except KeyError as exc:
            raise ValueError(f"{folder}/params.pt has no tensor {exc.args[0]}") from None
    return TunedProjector(weight, bias)
