"""From protocol items to token inputs with their scored positions and targets, and batches of them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .protocols import NO_TARGET, Item, ProtocolConfig, scored_positions


class ItemError(ValueError):
    """An item cannot be scored (too short, or a protocol the model kind does not support)."""


class TooShort(ItemError):
    """An item with no position to score (fewer than two tokens, or no text token to mask): it is skipped,
    counted and listed in the provenance, while the rest of its set is scored."""


@dataclass
class Encoded:
    item_id: str
    input_ids: list[int]
    positions: list[int]  # scored positions in input_ids
    targets: list[int]  # the true token at each scored position's prediction (next token, or the masked one); NO_TARGET: none
    bos_added: bool
    length: int = 0  # tokens of the whole item, before the cut after its last scored position

    @property
    def at_position_zero(self) -> bool:
        return 0 in self.positions


def encode(item: Item, tokenizer, protocol: ProtocolConfig, masked: bool, max_length: int | None = None) -> Encoded:
    ids = list(tokenizer(item.text)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    bos_added = bool(ids) and bos is not None and ids[0] == bos and not masked
    if masked:
        if protocol.name != "paper":
            raise ItemError("masked language models are scored with the paper protocol only (one masked position per sentence)")
        special = set(tokenizer.all_special_ids)
        candidates = [i for i, t in enumerate(ids) if t not in special]
        if not candidates:
            raise TooShort(f"item {item.item_id} has no text token to mask")
        pos = candidates[min(int(item.u * len(candidates)), len(candidates) - 1)]
        target = ids[pos]
        ids[pos] = tokenizer.mask_token_id
        return Encoded(item.item_id, ids, [pos], [target], False, len(ids))
    if max_length is not None:
        ids = ids[:max_length]
    positions = scored_positions(len(ids), protocol, item.u)
    if not positions:
        needs = "" if protocol.position_draw == "all" else " that has a next token"
        raise TooShort(f"item {item.item_id} has {len(ids)} token(s): no position{needs} to score")
    targets = [ids[p + 1] if p + 1 < len(ids) else NO_TARGET for p in positions]
    # Causal models see nothing after the scored positions: the input is cut after the last one.
    return Encoded(item.item_id, ids[: positions[-1] + 1], positions, targets, bos_added, len(ids))


@dataclass
class Batch:
    encoded: list[Encoded]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor  # batch row of each scored position
    cols: torch.Tensor  # token index of each scored position
    owner: torch.Tensor  # index within ``encoded`` of each scored position
    targets: torch.Tensor


def encode_all(items: list[Item], tokenizer, protocol: ProtocolConfig, masked: bool,
               max_length: int | None = None) -> tuple[list[Encoded], dict[str, str]]:
    """Every item that can be scored, and the reason each of the others cannot (by item id)."""
    encoded, skipped = [], {}
    for it in items:
        try:
            encoded.append(encode(it, tokenizer, protocol, masked, max_length))
        except TooShort as exc:
            skipped[it.item_id] = str(exc)
    return encoded, skipped


def batches(encoded: list[Encoded], batch_size: int, pad_id: int, max_tokens: int = 8192):
    """Right-padded batches of items of similar length, at most ``batch_size`` items or ``max_tokens`` padded tokens."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and end - start < batch_size and (end - start + 1) * len(encoded[order[end]].input_ids) <= max_tokens:
            end += 1
        group = [encoded[i] for i in order[start:end]]
        width = max(len(e.input_ids) for e in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        rows, cols, owner, targets = [], [], [], []
        for r, e in enumerate(group):
            ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[r, : len(e.input_ids)] = 1
            rows += [r] * len(e.positions)
            cols += e.positions
            owner += [r] * len(e.positions)
            targets += e.targets
        yield Batch(group, ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(owner), torch.tensor(targets))
        start = end
