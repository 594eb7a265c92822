"""The cost of the sub-module study against plain forward passes of the same items.

The study runs, per batch, one unmodified pass (which also serves the mat baseline) and one pass per (part, start
layer, mode), modes being the linear map and the part removed. Its time is set against a plain forward pass of the
headless model over the same batches, timed in the same run, times the number of passes the study makes, and times
one pass per (part, start layer) (the study's own count without the removal baseline).

    python bench/submodules.py --model smollm2-135m --items 100 --every 3
"""

from __future__ import annotations

import argparse

import common  # noqa: F401  (sets the offline environment first)

from jtc_lens.harness.corpora import get_corpus
from jtc_lens.harness.encoding import encode_all
from jtc_lens.harness.fitting import FitSpec, get_least_squares
from jtc_lens.harness.protocols import ProtocolConfig, build_items
from jtc_lens.harness.submodule_study import get_maps, parts_of, start_layers, study
from jtc_lens.harness.submodules import MODES, PARTS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--distribution", default="wikipedia")
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--n-fit", type=int, default=3200)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    lens, folder = common.load_lens(args.model)
    protocol = ProtocolConfig("paper")
    spec = FitSpec(args.distribution, protocol, args.n_fit)
    mat = get_least_squares(lens, spec).mat
    parts_of(lens)
    maps, _ = get_maps(lens, spec, batch_size=args.batch_size)
    items = build_items(get_corpus(args.distribution), "validation", protocol, limit=args.items)
    encoded, _ = encode_all(items, lens.tokenizer, protocol, lens.masked)
    seconds, one_pass = common.timed_against_plain(lens, encoded, args.batch_size,
                                                   lambda: study(lens, encoded, list(PARTS), maps, mat, args.every, args.batch_size))
    starts = start_layers(lens.num_layers, args.every)
    passes = 1 + len(PARTS) * len(starts) * len(MODES)
    print(f"# Sub-module study: cost against plain forward passes ({args.model}, {args.distribution}, {len(encoded)} items)\n")
    print("\n".join(common.provenance_lines(args.model, folder, args.distribution,
                                            {"protocol": "paper", "n_fit": args.n_fit, "every": args.every,
                                             "start layers": starts, "batch size": args.batch_size})))
    print(f"\n| measure | value |\n|---|---:|")
    print(f"| one plain forward pass over the items (s, best of 4) | {one_pass:.3f} |")
    print(f"| the study: {len(PARTS)} parts x {len(starts)} start layers x {len(MODES)} modes + 1 (s) | {seconds:.2f} |")
    print(f"| study / ({passes} plain passes) | {seconds / (passes * one_pass):.2f} |")
    print(f"| study / (one plain pass per part and start layer, {len(PARTS) * len(starts)}) | "
          f"{seconds / (len(PARTS) * len(starts) * one_pass):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
