"""A uniform view of a Hugging Face causal or masked language model for reading its hidden states.

h_0 is the input of the first block (the embedding output), h_l the output of block l, and h_L the
last block's output before the final norm. ``readout(v) = unembed(final_norm(v))``. The pieces are
found by inspecting the module tree, then checked against the model's own forward pass at load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .layer_spec import config_num_layers
from .store import sha256_bytes

log = logging.getLogger(__name__)


# block -> the layer intervention its block list runs under (harness/layer_interventions.py installs them here,
# so that the fingerprint sees them without importing that module)
ACTIVE_INTERVENTIONS: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()


def intervention_record(blocks) -> dict | None:
    """The record of the layer intervention active on these blocks, or None."""
    for block in blocks:
        found = ACTIVE_INTERVENTIONS.get(block)
        if found is not None:
            return dict(found.record)
    return None


class AdapterError(RuntimeError):
    """The model cannot be mapped onto blocks / final norm / unembedding; the message names what is missing."""


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def _first_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class LensModel:
    model: nn.Module
    tokenizer: object
    blocks: list
    final_norm: nn.Module
    unembed: nn.Module
    masked: bool
    softcap: float | None = None
    checks: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The model's recorded name (hub id or folder), for messages."""
        return getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.unembed.weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.unembed.weight.device

    @property
    def pad_id(self) -> int:
        """The id that pads a batch (the tokenizer's pad token, else 0: padded positions are masked and never scored)."""
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @property
    def dtype(self) -> torch.dtype:
        return self.unembed.weight.dtype

    def readout(self, v: torch.Tensor) -> torch.Tensor:
        """Logits of hidden vectors ``v`` (..., d) read as if they were the last block's output."""
        return self.readout_features(self.final_norm(v.to(self.dtype)))

    def readout_features(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of vectors already through the final norm."""
        logits = self.unembed(features)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Hidden states h_0..h_L at the positions (rows[i], cols[i]) of a padded batch: (L+1, P, d)."""
        states: list[torch.Tensor | None] = [None] * (self.num_layers + 1)

        def pre_hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            states[0] = hidden[rows, cols]

        def make_hook(index):
            def hook(_module, _args, output):
                states[index] = _first_tensor(output)[rows, cols]

            return hook

        handles = [self.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
        handles += [b.register_forward_hook(make_hook(i + 1)) for i, b in enumerate(self.blocks)]
        try:
            # The headless base model: the LM head over every position is not needed here.
            self.model.base_model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        finally:
            for h in handles:
                h.remove()
        missing = [i for i, s in enumerate(states) if s is None]
        if missing:
            raise AdapterError(f"hooks did not fire for hidden states {missing}; the block list is not on the forward path")
        return torch.stack(states)

    def fingerprint(self) -> dict:
        """Identity of the weights a projector is fitted for: the config, every parameter and buffer, and
        (for the tuned-lens import check) the unembedding on its own; and the layer intervention the blocks
        run under, if any (harness/layer_interventions.py).

        The weights are hashed afresh on every call, never remembered: a model changed in memory between
        two runs must not keep the first one's identity. Callers hash once per run (``Engine``).
        """
        config = self.model.config.to_dict()
        for volatile in ("_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype", "quantization_config"):
            config.pop(volatile, None)
        weight = self.unembed.weight.detach().to("cpu", torch.float32).contiguous()
        config_hash = sha256_bytes(json.dumps(config, sort_keys=True, default=str).encode())
        unembed_hash = hashlib.sha256(weight.numpy()).hexdigest()  # the buffer itself: no copy
        start = time.perf_counter()
        try:
            weights_hash, unhashed = weights_sha256(self.model), None
        except WeightsNotHashable as exc:
            weights_hash, unhashed = None, str(exc)
            log.warning("%s; fitted projectors of this model are neither taken from nor written to the cache", exc)
        log.info("model weights hashed in %.2f s", time.perf_counter() - start)
        out = {
            "name": getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__,
            "architecture": type(self.model).__name__,
            "model_type": getattr(self.model.config, "model_type", ""),
            "num_layers": self.num_layers,
            "d_model": self.d_model,
            "vocab_size": int(self.unembed.weight.shape[0]),
            "masked": self.masked,
            "config_sha256": config_hash,
            "unembed_sha256": unembed_hash,
            "weights_sha256": weights_hash,
            "id": sha256_bytes(f"{config_hash}:{weights_hash or unembed_hash}".encode())[:16],
        }
        layers = intervention_record(self.blocks)
        if layers:
            # the same weights run another way are another model: its own cache entries and identity
            out["layers"] = layers
            out["id"] = sha256_bytes(f"{out['id']}:{json.dumps(layers, sort_keys=True)}".encode())[:16]
        if unhashed:
            out["weights_not_hashed"] = unhashed
        return out


class WeightsNotHashable(RuntimeError):
    """Some weight has no bytes in memory (a meta or offloaded tensor, an opaque tensor subclass)."""


def weight_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name; a tensor shared under several names (tied embeddings) once."""
    tensors = dict(model.named_parameters())
    for name, buffer in model.named_buffers():
        tensors.setdefault(name, buffer)
    return tensors


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the name, dtype, shape and in-memory bytes of every parameter and buffer, in name order.

    The bytes are the loaded ones (a model in bfloat16 is another model than in float32: its hidden
    states differ), read one tensor at a time so that a GPU model needs host memory for one tensor only.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(weight_tensors(model).items()):
        tensor = tensor.detach()
        if tensor.is_meta:
            raise WeightsNotHashable(f"weight {name} is not in memory (meta device: offloaded or not loaded)")
        header = json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        try:
            data = tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        except (RuntimeError, TypeError) as exc:
            raise WeightsNotHashable(f"weight {name} ({type(tensor).__name__}, {tensor.dtype}) cannot be read as bytes: {exc}") from None
        digest.update(data)
    return digest.hexdigest()


def _find_blocks(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    candidates = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers and len(mod) > 0
    ]
    if not candidates:
        lists = [f"{n} ({len(m)})" for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        raise AdapterError(
            f"{type(model).__name__}: no nn.ModuleList of {n_layers} transformer blocks found "
            f"(config says {n_layers} layers; module lists present: {lists or 'none'})"
        )
    return max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))


def _num_layers(model: nn.Module) -> int:
    n_layers = config_num_layers(model.config)
    if not n_layers:
        raise AdapterError(f"{type(model).__name__}: the config names no number of layers (num_hidden_layers / n_layer)")
    return n_layers


def block_list(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks, found as ``build_lens_model`` finds it (no forward-pass check)."""
    return _find_blocks(model, _num_layers(model))[1]


def _parent_of(model: nn.Module, child: nn.Module) -> tuple[str, nn.Module]:
    for name, mod in model.named_modules():
        if any(c is child for c in mod.children()):
            return name, mod
    raise AdapterError(f"{type(model).__name__}: could not locate the parent of {type(child).__name__}")


def _find_final_norm(model: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    """A norm registered after the blocks, beside them in the same parent (ln_f, norm, final_layer_norm)."""
    _, parent = _parent_of(model, blocks)
    after, seen = [], False
    for _name, child in parent.named_children():
        if child is blocks:
            seen = True
        elif seen and _is_norm(child):
            after.append(child)
    if len(after) > 1:
        raise AdapterError(f"{type(model).__name__}: several norms after the blocks ({[type(a).__name__ for a in after]}); cannot tell the final one")
    return after[0] if after else None


class _HeadTransform(nn.Module):
    """The modules of a masked-LM head that act before its decoder (BERT: dense, activation, LayerNorm)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x):
        for part in self.parts:
            x = part(x)
        return x


def build_lens_model(model: nn.Module, tokenizer, verify: bool = True) -> LensModel:
    """Map ``model`` onto blocks, final norm and unembedding, then check the map against its forward pass."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(model.config, "is_encoder_decoder", False) or getattr(config, "is_encoder_decoder", False):
        # not a masked LM (it has no mask token to read a position through) nor a causal one: its decoder's
        # states depend on the encoder's output and on the decoder's own inputs
        raise AdapterError(
            f"{type(model).__name__} is an encoder-decoder model, which is not supported: the lens reads one stack of "
            "blocks whose last state the unembedding turns into the prediction, and here the prediction comes from a "
            "decoder attending to a separate encoder; use a decoder-only (causal) LM or an encoder-only masked LM")
    n_layers = _num_layers(model)
    unembed = model.get_output_embeddings()
    if unembed is None or not hasattr(unembed, "weight"):
        raise AdapterError(f"{type(model).__name__}: no output embedding (unembedding) found; a language-model head is required")
    _, blocks = _find_blocks(model, n_layers)
    masked = "MaskedLM" in type(model).__name__ or not getattr(config, "is_decoder", True) and "CausalLM" not in type(model).__name__
    final_norm = _find_final_norm(model, blocks)
    if masked:
        _, head = _parent_of(model, unembed)
        parts = [c for c in head.children() if c is not unembed]
        if final_norm is not None:
            parts = [final_norm] + parts
        final_norm = _HeadTransform(parts)
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise AdapterError(f"{type(model).__name__} is a masked LM but its tokenizer has no mask token")
    elif final_norm is None:
        raise AdapterError(f"{type(model).__name__}: no final norm found after the block list (looked for a *Norm module beside the blocks)")
    lens = LensModel(
        model=model.eval(),
        tokenizer=tokenizer,
        blocks=list(blocks),
        final_norm=final_norm,
        unembed=unembed,
        masked=masked,
        softcap=getattr(config, "final_logit_softcapping", None),
    )
    if verify:
        lens.checks = verify_lens_model(lens)
    return lens


@torch.no_grad()
def verify_lens_model(lens: LensModel, text: str = "The quick brown fox jumps over the lazy dog because it was late.") -> dict:
    """Check that hooks and readout reproduce the model's own hidden states and logits."""
    enc = lens.tokenizer(text, return_tensors="pt")
    ids = enc["input_ids"][:, :32]
    mask = torch.ones_like(ids)
    if lens.masked and ids.shape[1] > 2:
        ids = ids.clone()
        ids[0, ids.shape[1] // 2] = lens.tokenizer.mask_token_id
    n = ids.shape[1]
    rows = torch.zeros(n, dtype=torch.long)
    cols = torch.arange(n)
    states = lens.capture(ids, mask, rows, cols).float()
    out = lens.model(input_ids=ids.to(lens.device), attention_mask=mask.to(lens.device), output_hidden_states=True)
    hidden = [h[0].float() for h in (out.hidden_states or ())]
    logits = out.logits[0].float()
    own = [(f"hidden state {i}", h) for i, h in enumerate(hidden)] + [("logits", logits)]
    broken = [name for name, t in own if not torch.isfinite(t).all()]
    if broken:
        # nothing to do with the module mapping: comparing against inf/NaN would blame it wrongly
        raise AdapterError(
            f"{type(lens.model).__name__} ({lens.name}): the model's own forward pass produces non-finite values "
            f"(inf/NaN) on the check sentence, in {', '.join(broken[:4])}{' and more' if len(broken) > 4 else ''}; "
            "its weights or dtype cannot run this text (overflow in a low-precision dtype is a common cause)"
        )

    def close(a, b):
        scale = b.abs().max().clamp_min(1e-6)
        return float((a - b).abs().max() / scale)

    checks = {}
    # Models whose blocks were replaced (or custom ones) may not report per-block hidden states;
    # the logits check below still covers the whole map.
    if len(hidden) == lens.num_layers + 1:
        checks["embedding"] = close(states[0], hidden[0])
        for layer in range(1, lens.num_layers):
            checks[f"block{layer}"] = close(states[layer], hidden[layer])
        normed = lens.final_norm(states[-1].to(lens.dtype)).float()
        checks["final_norm"] = close(states[-1] if lens.masked else normed, hidden[-1])
    checks["logits"] = close(lens.readout(states[-1]).float(), logits)
    tol = 1e-3 if lens.dtype == torch.float32 else 3e-2
    bad = {k: v for k, v in checks.items() if not v <= tol}
    if bad:
        raise AdapterError(
            f"{type(lens.model).__name__}: the mapped modules do not reproduce the model's forward pass "
            f"(max relative deviation above {tol}: {bad})"
        )
    return checks
