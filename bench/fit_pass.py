"""The fit pass at several batch sizes: items per second of capturing h_0..h_L at the fit positions.

Fitting mat/affine runs every fit item through the model once (`LensModel.capture`, the headless model with a hook
per block) and adds the states to float64 Gram matrices. On a CPU the large models spend their fit in that pass,
and a batch of short items streams every weight from memory for few tokens. This script times the same items
(a seeded prefix of the fit items, so their lengths are drawn like the whole fit's) at each batch size in one
process, with the Gram update timed apart, and checks that the captured states agree across batch sizes.

    python bench/fit_pass.py --model qwen2.5-coder-1.5b --items 320 --batch-sizes 16,32,64
"""

from __future__ import annotations

import argparse
import time

import common
import torch

from jtc_lens.harness.corpora import get_corpus
from jtc_lens.harness.encoding import batches, encode_all
from jtc_lens.harness.projectors.least_squares import GramAccumulator
from jtc_lens.harness.protocols import ProtocolConfig, build_items


def timed_pass(lens, encoded: list, batch_size: int) -> tuple[float, float, dict[str, torch.Tensor]]:
    """Seconds of one fit pass over ``encoded`` (capture and Gram update), of its Gram updates alone, and the
    states captured per item (for the agreement check)."""
    acc = GramAccumulator(lens.num_layers + 1, lens.d_model, pairs="last")
    states: dict[str, torch.Tensor] = {}
    gram = 0.0
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches(encoded, batch_size, lens.pad_id):
            captured = lens.capture(batch.input_ids, batch.attention_mask, batch.rows, batch.cols)
            tick = time.perf_counter()
            acc.update(captured)
            gram += time.perf_counter() - tick
            for k, owner in enumerate(batch.owner.tolist()):
                states[batch.encoded[owner].item_id] = captured[:, k].float()
    tick = time.perf_counter()
    acc.flush()
    gram += time.perf_counter() - tick
    return time.perf_counter() - start, gram, states


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", default="wikipedia")
    parser.add_argument("--items", type=int, default=320, help="fit items: a seeded prefix of the train split's order")
    parser.add_argument("--batch-sizes", default="16,32,64")
    parser.add_argument("--fit-items", type=int, default=9000, help="the fit size the times are scaled to")
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    lens, folder = common.load_lens(args.model)
    protocol = ProtocolConfig("paper")
    items = build_items(get_corpus(args.corpus), "train", protocol, limit=args.items)
    encoded, skipped = encode_all(items, lens.tokenizer, protocol, lens.masked)
    tokens = sum(len(e.input_ids) for e in encoded)
    timed_pass(lens, encoded[:4], 4)  # first call: allocator and kernel warm-up
    rows, reference = [], None
    for size in sizes:
        with_gram, gram, states = timed_pass(lens, encoded, size)
        plain = with_gram - gram
        if reference is None:
            reference, deviation = states, 0.0
        else:
            deviation = max(float((states[k] - reference[k]).abs().max() / reference[k].abs().max().clamp_min(1e-6))
                            for k in reference)
        rows.append((size, plain, with_gram, deviation))
    base = rows[0][2]
    print(f"## Fit pass of {args.model} on {args.corpus}/train: {len(encoded)} items, {tokens} tokens "
          f"(mean {tokens / len(encoded):.1f} per item, inputs cut after the drawn position)\n")
    print(f"| batch size | capture only: items/s | capture + Gram: items/s | time vs batch {sizes[0]} | "
          f"{args.fit_items:,} items at this rate | states vs batch {sizes[0]}: max relative deviation |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size, plain, with_gram, deviation in rows:
        n = len(encoded)
        print(f"| {size} | {n / plain:.2f} | {n / with_gram:.2f} | {with_gram / base:.2f}x | "
              f"{args.fit_items * with_gram / n / 60:.0f} min | {deviation:.1e} |")
    print()
    extra = {"items": f"{len(encoded)} of {len(items)} ({len(skipped)} too short)",
             "protocol": f"paper, seed {protocol.seed}",
             "command": "python bench/fit_pass.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}
    print("\n".join(common.provenance_lines(args.model, folder, args.corpus, extra)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
