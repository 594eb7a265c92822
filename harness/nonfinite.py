"""Items whose hidden states or final logits hold inf or NaN: found per item, then a clear error or, when the
run says so (``on_nonfinite=drop``), left out and listed.

Rows of a padded batch do not mix in the model (attention, norms and MLPs act per row), so a bad value stays
within its own item; what spread one item's NaN to every other one was pooling over items (the target
variance of r^2), which excluding the item before any accumulation prevents.
"""

from __future__ import annotations

import torch

ON_NONFINITE = ("error", "drop")


class NonFiniteError(RuntimeError):
    """The model produced inf or NaN on some items; the message names the model, items, layers and counts."""


def check_mode(mode: str) -> str:
    if mode not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {mode!r}")
    return mode


def bad_positions(states: torch.Tensor, logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of P positions hold a non-finite value, and the first hidden state (0..L) that does.

    ``states`` (L+1, P, d); ``logits`` (P, V), the final prediction, counts as state L+1. Returns a (P,) mask and
    (P,) first indices (meaningful where the mask is set).
    """
    bad = ~torch.isfinite(states).all(dim=-1)  # (L+1, P)
    if logits is not None:
        bad = torch.cat([bad, ~torch.isfinite(logits).all(dim=-1)[None].to(bad.device)])
    any_bad = bad.any(dim=0)
    return any_bad.cpu(), bad.int().argmax(dim=0).cpu()


def per_item(item_ids: list[str], owner: torch.Tensor, mask: torch.Tensor, first: torch.Tensor) -> dict[str, dict]:
    """{item id: {"layer": first bad state, "positions": how many of its scored positions}} for the bad positions."""
    out: dict[str, dict] = {}
    for o, layer in zip(owner[mask].tolist(), first[mask].tolist()):
        rec = out.setdefault(item_ids[o], {"layer": layer, "positions": 0})
        rec["layer"] = min(rec["layer"], layer)
        rec["positions"] += 1
    return out


def layer_name(layer: int, num_layers: int) -> str:
    return "the final logits" if layer == num_layers + 1 else f"hidden state {layer}"


def message(model: str, where: str, bad: dict[str, dict], num_layers: int, shown: int = 5) -> str:
    """The error text: model, count, the first few items with their first bad layer, and the way out."""
    items = sorted(bad.items(), key=lambda kv: kv[0])
    listed = "; ".join(f"{k} (from {layer_name(v['layer'], num_layers)}, {v['positions']} position(s))" for k, v in items[:shown])
    more = f"; and {len(items) - shown} more" if len(items) > shown else ""
    first = min(v["layer"] for v in bad.values())
    return (f"model {model} produces non-finite values (inf/NaN) on {len(items)} item(s) of {where}, first at "
            f"{layer_name(first, num_layers)}: {listed}{more}. The model's own forward pass produces them (overflow in "
            "a low-precision dtype is a common cause: try float32 or bfloat16). Set on_nonfinite=drop to leave such "
            "items out; they are then counted and listed in the provenance.")
