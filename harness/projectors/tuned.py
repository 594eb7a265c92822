"""The tuned lens (Belrose et al., 2023): v = h_l + W_l h_l + b_l, trained against the model's output.

W and b start at zero (the identity map), or for the ``warm`` recipe at the affine least-squares
solution. Weight decay on (W, b) therefore pulls the lens towards the identity. Lenses can be
exchanged with the public tuned-lens package: its ``config.json`` + ``params.pt`` (one Linear
translator per layer, keys ``{l}.weight`` / ``{l}.bias``), read with ``torch.load(weights_only=True)``.
Lenses written here also carry the full sha256 of the unembedding; a lens is only used for a model whose
unembedding it was trained for (see ``import_tuned_lens``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..store import atomic_write_bytes, atomic_write_json, sha256_bytes
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
    """The tuned-lens package's identity of an unembedding: sha256 of its numpy text form at precision 1.

    Weak: numpy abbreviates large arrays to their corner values, so two matrices with the same corners
    (and shape) get the same hash. Read for lenses made elsewhere; ``unembed_sha256`` is what is checked."""
    import hashlib

    return hashlib.sha256(np.array_str(unembed_weight.detach().cpu().float().numpy(), precision=1).encode()).hexdigest()


def unembed_sha256(unembed_weight: torch.Tensor) -> str:
    """sha256 of the exact bytes of the unembedding as a contiguous float32 CPU tensor (the model fingerprint's hash)."""
    return sha256_bytes(unembed_weight.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def export_tuned_lens(projector: TunedProjector, folder: Path, base_model: str, unembed_weight: torch.Tensor) -> None:
    """Write ``config.json`` and ``params.pt`` in the tuned-lens package's layout, plus the full ``unembed_sha256``."""
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
        "unembed_sha256": unembed_sha256(unembed_weight),  # an extra key: the tuned-lens package ignores it
    })


def _identity_check(folder: Path, config: dict, unembed_weight: torch.Tensor | None, allow_unverified: bool) -> str:
    """Check that the lens was trained for this unembedding, as strongly as its config allows; the check made.

    Full sha256 when the config has one; else the package's weak hash (recorded as weak); with neither (or no
    unembedding to compare), refused unless ``allow_unverified``."""
    if unembed_weight is not None and config.get("unembed_sha256"):
        if config["unembed_sha256"] != unembed_sha256(unembed_weight):
            raise ValueError(f"{folder}: the lens was trained for another unembedding (unembed_sha256 mismatch)")
        return "unembed_sha256: full sha256 of the unembedding, matched"
    if unembed_weight is not None and config.get("unembed_hash"):
        if config["unembed_hash"] != unembed_hash(unembed_weight):
            raise ValueError(f"{folder}: the lens was trained for another unembedding (unembed_hash mismatch)")
        return ("weak: only the tuned-lens package's unembed_hash (numpy's abbreviated text of the matrix, corner "
                "values only) matched; a model whose unembedding has the same corners would pass too")
    if not allow_unverified:
        raise ValueError(f"{folder}/config.json names no hash of the unembedding (unembed_sha256 or unembed_hash): "
                         "nothing shows the lens was trained for this model; pass allow_unverified_lens=true to use it anyway")
    return "none: config.json has no unembedding hash; used unverified because allow_unverified_lens was set"


def _translator(state: dict, key: str, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{path} has no tensor {key!r} (expected shape {shape})")
    value = state[key]
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{path}: tensor {key!r} has shape {got}, expected {shape}")
    return value.float()


def import_tuned_lens(folder: Path, num_layers: int, d: int, unembed_weight: torch.Tensor | None = None,
                      allow_unverified: bool = False) -> tuple[TunedProjector, dict]:
    """Read a tuned-lens package lens (only tensors are unpickled: weights_only=True); the projector and
    a record of the check that it belongs to this model."""
    folder = Path(folder)
    for name in ("config.json", "params.pt"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"tuned lens {folder}: no {name} (a lens saved by the tuned-lens package is a folder "
                                    "holding config.json and params.pt)")
    config = json.loads((folder / "config.json").read_text("utf-8"))
    if config.get("lens_type", "linear_tuned_lens") != "linear_tuned_lens":
        raise ValueError(f"{folder}: lens type {config.get('lens_type')!r} is not a linear tuned lens")
    if config.get("d_model") != d or config.get("num_hidden_layers") != num_layers:
        raise ValueError(f"{folder}: lens for d_model={config.get('d_model')}, {config.get('num_hidden_layers')} layers; "
                         f"the model has d_model={d}, {num_layers} layers")
    check = _identity_check(folder, config, unembed_weight, allow_unverified)
    path = folder / "params.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a dict of tensors")
    weight = torch.stack([_translator(state, f"{l}.weight", (d, d), path) for l in range(num_layers)])
    if config.get("bias", True):
        bias = torch.stack([_translator(state, f"{l}.bias", (d,), path) for l in range(num_layers)])
    else:
        bias = torch.zeros(num_layers, d)
    return TunedProjector(weight, bias), {"identity_check": check, "allow_unverified_lens": allow_unverified}
