"""The extra cost of early-exit metrics over the lens tasks alone (goal: under 10%).

Both arms score the same items on the same model in one process, alternated, best of ``--repeats``:
  lens:        id and mat lens requests (what `--tasks jtc_id_X,jtc_mat_X` sends);
  lens + exit: the same plus the exit requests of id and mat (`jtc_exit_id_X,jtc_exit_mat_X`), which ride on the
               lens pass and add the per-position records, the curves and the paired bootstrap.
The confidence p_top1 - p_top2 is computed in both arms (a top-2 instead of a max over the lens logits); its
own cost is timed separately on logits of the engine's slice shape.

    python bench/early_exit.py --model smollm2-135m --items 300
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401  (sets the offline environment first)
import torch

from jtc_lens.harness.corpora import get_corpus
from jtc_lens.harness.engine import Engine, EvalRequest
from jtc_lens.harness.fitting import FitSpec, get_least_squares
from jtc_lens.harness.protocols import ProtocolConfig, build_items


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--distribution", default="wikipedia")
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--n-fit", type=int, default=3200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    lens, folder = common.load_lens(args.model)
    protocol = ProtocolConfig("paper")
    fit = FitSpec(args.distribution, protocol, args.n_fit)
    get_least_squares(lens, fit)  # fitted (or read from the cache) before timing
    items = build_items(get_corpus(args.distribution), "validation", protocol, limit=args.items)
    lens_requests = [EvalRequest(p, args.distribution, "validation", protocol, it, None if p == "id" else fit)
                     for p in ("id", "mat") for it in items]
    exit_requests = [EvalRequest("id", args.distribution, "validation", protocol, it, analysis="exit") for it in items]
    exit_requests += [EvalRequest("mat", args.distribution, "validation", protocol, it, fit, analysis="exit",
                                  base=("id", None)) for it in items]
    engine = Engine(lens)
    lens_only, with_exit = [], []
    for _ in range(args.repeats):
        lens_only.append(timed(lambda: engine.run(lens_requests)))
        with_exit.append(timed(lambda: engine.run(lens_requests + exit_requests)))
    a, b = min(lens_only), min(with_exit)

    V = lens.unembed.weight.shape[0]
    z = torch.randn(lens.num_layers, max(1, (1 << 22) // V), V)
    top1 = min(timed(lambda: z.max(dim=-1)) for _ in range(5))
    top2 = min(timed(lambda: z.topk(2, dim=-1)) for _ in range(5))

    print(f"# Early exit: extra cost over the lens tasks ({args.model}, {args.distribution}, {len(items)} items)\n")
    print("\n".join(common.provenance_lines(args.model, folder, args.distribution,
                                            {"protocol": "paper", "n_fit": args.n_fit, "repeats": args.repeats})))
    print("\n| run | seconds (best of repeats) |\n|---|---:|")
    print(f"| lens: id, mat | {a:.2f} |")
    print(f"| lens + exit: id, mat | {b:.2f} |")
    print(f"\nExtra cost of the exit tasks: {100 * (b - a) / a:+.1f}% (goal: under 10%).")
    print(f"Top-2 instead of max over one slice of lens logits ({tuple(z.shape)}): {top1 * 1e3:.1f} ms -> "
          f"{top2 * 1e3:.1f} ms ({100 * (top2 - top1) / top1:+.0f}% of that pass, paid by the lens tasks too).")
    return 0 if b <= 1.10 * a else 1


if __name__ == "__main__":
    raise SystemExit(main())
