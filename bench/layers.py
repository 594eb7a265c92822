"""The cost of the layer-intervention study against one plain forward pass per intervention.

Per batch the study makes one unmodified pass (the reference of every intervention) and one pass per (kind, start
of the middle span). Its time is set against a plain forward pass of the headless model over the same batches,
timed in the same run, times that number of passes. The passes differ in how many blocks they run (skip runs
fewer, looped_parallel more), which the block count printed beside the ratio accounts for.

    python bench/layers.py --model smollm2-135m --items 100 --every 2
"""

from __future__ import annotations

import argparse

import common  # noqa: F401  (sets the offline environment first)

from jtc_lens.harness.corpora import get_corpus
from jtc_lens.harness.encoding import encode_all
from jtc_lens.harness.layer_study import KINDS, spec_of, starts, study
from jtc_lens.harness.protocols import ProtocolConfig, build_items


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--distribution", default="wikipedia")
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    lens, folder = common.load_lens(args.model)
    protocol = ProtocolConfig("paper", seed=args.seed)
    items = build_items(get_corpus(args.distribution), "validation", protocol, limit=args.items)
    encoded, _ = encode_all(items, lens.tokenizer, protocol, lens.masked)
    seconds, one_pass = common.timed_against_plain(lens, encoded, args.batch_size,
                                                   lambda: study(lens, encoded, args.every, args.seed, args.batch_size))
    L = lens.num_layers
    spans = starts(L, args.every)
    passes = 1 + len(KINDS) * len(spans)
    # blocks run per item: the unmodified pass, then each intervention's (outside the span, plus its program)
    blocks = L + sum(L - len(spec.span) + sum(len(step) for step in spec.program(args.seed))
                     for spec in (spec_of(k, s, L) for k in KINDS for s in spans))
    print(f"# Layer interventions: cost against plain forward passes ({args.model}, {args.distribution}, {len(encoded)} items)\n")
    print("\n".join(common.provenance_lines(args.model, folder, args.distribution,
                                            {"protocol": "paper", "every": args.every, "starts": spans,
                                             "kinds": list(KINDS), "batch size": args.batch_size})))
    print("\n| measure | value |\n|---|---:|")
    print(f"| one plain forward pass over the items (s, best of 4) | {one_pass:.3f} |")
    print(f"| the study: {len(KINDS)} kinds x {len(spans)} spans + 1 reference (s) | {seconds:.2f} |")
    print(f"| study / ({passes} plain passes) | {seconds / (passes * one_pass):.2f} |")
    print(f"| blocks run by the study / blocks of {passes} plain passes | {blocks / (passes * L):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
