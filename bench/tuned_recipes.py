"""Tuned-lens recipes side by side on a real model: the published recipe vs the least-squares warm start.

Both train on the same token stream (the train split of one distribution, documents joined with EOS).
The published recipe spends the whole budget; the warm recipe stops once its training loss reaches
the published recipe's final training loss. Then id, mat, affine and both lenses are scored on the same
validation items (paper protocol) and a Markdown table of per-layer KL (bits), tokens and wall time is printed.

    python bench/tuned_recipes.py --model smollm2-135m --distribution wikipedia --budget 16384 > bench.md
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from jtc_lens.harness import bundled  # noqa: E402
from jtc_lens.harness.corpora import get_corpus  # noqa: E402
from jtc_lens.harness.engine import Engine  # noqa: E402
from jtc_lens.harness.fitting import FitSpec, get_least_squares  # noqa: E402
from jtc_lens.harness.models import build_lens_model  # noqa: E402
from jtc_lens.harness.projectors import IdentityProjector  # noqa: E402
from jtc_lens.harness.protocols import ProtocolConfig, build_items  # noqa: E402
from jtc_lens.harness.provenance import versions  # noqa: E402
from jtc_lens.harness.tuned_training import TunedRecipe, TunedTrainer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--distribution", default="wikipedia")
    parser.add_argument("--budget", type=int, default=16384, help="tokens for each tuned-lens recipe")
    parser.add_argument("--tokens-per-step", type=int, default=512)
    parser.add_argument("--chunk-len", type=int, default=256)
    parser.add_argument("--warm-fit-tokens", type=int, default=4096)
    parser.add_argument("--n-fit", type=int, default=4000, help="paper-protocol fit items for mat/affine")
    parser.add_argument("--n-eval", type=int, default=500, help="validation items (paper protocol)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    folder = bundled.prepare(args.model) if args.model in bundled.MODELS else args.model
    os.environ["JTC_CACHE"] = tempfile.mkdtemp(prefix="jtc-bench-")  # no fitted projector cached: every time is a real fit
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    lens = build_lens_model(model, AutoTokenizer.from_pretrained(folder))
    protocol = ProtocolConfig("paper", seed=args.seed)
    rows = {}

    start = time.perf_counter()
    ls = get_least_squares(lens, FitSpec(args.distribution, protocol, args.n_fit))
    ls_seconds = time.perf_counter() - start
    rows["mat"] = (ls.mat, f"{ls.info['fit_positions']:,} positions", ls_seconds)
    rows["affine"] = (ls.affine, f"{ls.info['fit_positions']:,} positions", ls_seconds)
    rows["id"] = (IdentityProjector(), "—", 0.0)

    common = dict(token_budget=args.budget, chunk_len=args.chunk_len, tokens_per_step=args.tokens_per_step,
                  warm_fit_tokens=args.warm_fit_tokens, seed=args.seed)
    start = time.perf_counter()
    published, info_pub = TunedTrainer(lens, TunedRecipe("tuned-lens", **common), args.distribution).train()
    pub_seconds = time.perf_counter() - start
    target = sum(info_pub["loss_curve"][-3:]) / len(info_pub["loss_curve"][-3:])
    start = time.perf_counter()
    # the stream start: both recipes see only the token stream (warm_start=affine would also use the fit items)
    warm, info_warm = TunedTrainer(lens, TunedRecipe("warm", stop_at=target, warm_start="stream", **common),
                                   args.distribution).train()
    warm_seconds = time.perf_counter() - start
    rows["tuned (tuned-lens recipe)"] = (published, f"{info_pub['tokens_spent']:,} tokens", pub_seconds)
    rows["tuned (warm)"] = (warm, f"{info_warm['tokens_spent']:,} tokens" + (" (stopped early)" if info_warm["stopped_early"] else ""), warm_seconds)

    items = build_items(get_corpus(args.distribution), "validation", protocol, limit=args.n_eval)
    engine = Engine(lens, batch_size=16)
    keys = {name: (name, None) for name in rows}
    result = engine.evaluate_set((args.distribution, "validation", protocol), items, {keys[n]: rows[n][0] for n in rows})
    L = lens.num_layers
    kl_bits = {}
    for name in rows:
        per_item, _ = result[keys[name]]
        kl_bits[name] = [sum(v[f"kl.L{l}"] for v in per_item.values()) / len(per_item) / math.log(2) for l in range(L)]

    names = list(rows)
    print(f"Model `{args.model}`, fit and training text: `{args.distribution}` train split; validation: {len(items)} "
          f"`{args.distribution}` validation sentences (paper protocol, seed {args.seed}). Versions: {versions()}.\n")
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    print("| fit data | " + " | ".join(rows[n][1] for n in names) + " |")
    print("| wall time (s) | " + " | ".join(f"{rows[n][2]:.1f}" for n in names) + " |")
    print("| mean KL (bits) | " + " | ".join(f"{sum(kl_bits[n]) / L:.3f}" for n in names) + " |")
    for l in range(L):
        print(f"| KL layer {l} | " + " | ".join(f"{kl_bits[n][l]:.3f}" for n in names) + " |")
    print("\nHeld-out slice (the first chunks of the stream, never trained on), KL in nats per layer:\n")
    print("| recipe | start (mean) | returned lens (mean) | layers no worse than start | largest rise | steps kept |")
    print("|---|---:|---:|---:|---:|---|")
    for name, info in (("tuned-lens (last state)", info_pub), ("warm (best state per layer)", info_warm)):
        start_kl, end_kl = info["heldout_start"], info["heldout_end"]
        rises = [e - s for s, e in zip(start_kl, end_kl)]
        print(f"| {name} | {sum(start_kl) / L:.4f} | {sum(end_kl) / L:.4f} | {sum(r <= 0 for r in rises)}/{L} | "
              f"{max(rises):+.4f} | {_kept(info['steps_kept'])} |")
    ratio = warm_seconds / pub_seconds
    reached = sum(kl_bits["tuned (warm)"]) <= sum(kl_bits["tuned (tuned-lens recipe)"])
    print(f"\nPublished recipe: {info_pub['steps']} steps, final training loss {target:.4f} nats (mean of the last 3 steps), "
          f"{pub_seconds:.1f} s. Warm recipe: warm-start fit {info_warm['warm_fit_seconds']:.1f} s on "
          f"{info_warm['warm_fit_tokens']:,} tokens, then {info_warm['steps']} SGD steps, {warm_seconds:.1f} s in all.")
    print(f"Warm / published wall time: {ratio:.3f} (goal <= 0.25); warm validation KL at or below the published one: {reached}.")
    return 0 if ratio <= 0.25 and reached else 1


def _kept(steps: list[int]) -> str:
    """How many layers' returned state comes from each step, e.g. "0: 25, 1: 5"."""
    counts = {s: steps.count(s) for s in sorted(set(steps))}
    return ", ".join(f"{s}: {n}" for s, n in counts.items())


if __name__ == "__main__":
    sys.exit(main())
