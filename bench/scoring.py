"""Scoring speed: projecting and scoring every layer at N positions vs a bare matrix product of the same shape.

The bare product (L*N, d) @ (d, V) is what reading L layers' worth of positions through the unembedding
costs at the least; everything else the harness does per position (the projector's own product, the
final norm, log-softmax, top-k, KL, entropy, cross-entropy) comes on top. Both are timed on the same
states, in the same batches as the engine forms them, in one run; the best of ``--repeats`` is kept.

    python bench/scoring.py --model smollm2-135m --positions 1024
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401  (sets the offline environment first)
import torch

from jtc_lens.harness.corpora import get_corpus
from jtc_lens.harness.encoding import batches, encode
from jtc_lens.harness import engine as engine_module
from jtc_lens.harness.engine import Engine
from jtc_lens.harness.fitting import FitSpec, get_least_squares
from jtc_lens.harness.protocols import ProtocolConfig, build_items


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--distribution", default="wikipedia")
    parser.add_argument("--positions", type=int, default=1024, help="scored positions (dense protocol, 128-token blocks)")
    parser.add_argument("--batch-size", type=int, default=16, help="items per forward pass, as in the engine")
    parser.add_argument("--n-fit", type=int, default=2000, help="paper-protocol items the mat projector is fitted on")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=0, help="logits per slice in the scorer (default: the engine's)")
    args = parser.parse_args()

    lens, folder = common.load_lens(args.model)
    L, d, V = lens.num_layers, lens.d_model, lens.unembed.weight.shape[0]
    mat = get_least_squares(lens, FitSpec(args.distribution, ProtocolConfig("paper"), args.n_fit)).mat
    protocol = ProtocolConfig("dense", chunk_len=128)
    items = build_items(get_corpus(args.distribution), "validation", protocol, limit=-(-args.positions // 128))
    encoded = [encode(it, lens.tokenizer, protocol, lens.masked) for it in items]
    pad = lens.pad_id
    captured = []  # (states, targets) per engine batch; the forward pass is not what is measured here
    for batch in batches(encoded, args.batch_size, pad):
        captured.append((lens.capture(batch.input_ids, batch.attention_mask, batch.rows, batch.cols).float(), batch.targets))
    n = sum(s.shape[1] for s, _ in captured)
    engine = Engine(lens, batch_size=args.batch_size)
    sources = list(range(L))
    W = lens.unembed.weight.detach()

    def ours():
        with torch.no_grad():
            for states, targets in captured:
                final_logits = lens.readout(states[L]).float()
                engine._score(final_logits, mat.project(states, sources, L), targets)

    def bare_in(rows: int):
        def run():
            with torch.no_grad():
                for states, _ in captured:
                    x = states[:L].reshape(-1, d)
                    for start in range(0, x.shape[0], rows):
                        x[start:start + rows] @ W.T
        return run

    def project_only():
        with torch.no_grad():
            for states, _ in captured:
                mat.project(states, sources, L)

    if args.budget:
        engine_module.LOGIT_BUDGET = args.budget
    ours()  # warm-up: stacked matrices, allocator
    # the baseline is the fastest way found to compute the same product: several slicings are tried
    bare_times = {rows: best_of(args.repeats, bare_in(rows)) for rows in (128, 256, 512, 1024)}
    best_rows = min(bare_times, key=bare_times.get)
    t_bare = bare_times[best_rows]
    t_ours = best_of(args.repeats, ours)
    t_proj = best_of(args.repeats, project_only)
    flops = 2 * L * n * d * V
    print(f"## Scoring: {args.model}, {n} positions x {L} layers, vocabulary {V}\n")
    print("| what | seconds | GFLOP/s of the unembedding | ratio to bare product |")
    print("|---|---:|---:|---:|")
    print(f"| bare product ({L * n}, {d}) @ ({d}, {V}), fastest slicing ({best_rows} rows) | {t_bare:.2f} | {flops / t_bare / 1e9:.1f} | 1.00 |")
    print(f"| projection only (mat, all layers) | {t_proj:.2f} | | {t_proj / t_bare:.2f} |")
    print(f"| project + read out + all metrics, all layers | {t_ours:.2f} | {flops / t_ours / 1e9:.1f} | **{t_ours / t_bare:.2f}** |")
    print()
    for line in common.provenance_lines(args.model, folder, args.distribution, {
            "settings": f"positions {n}, batch {args.batch_size} items, best of {args.repeats}, mat fitted on {args.n_fit} paper items, "
                        f"scorer slices of {max(engine_module.MIN_LOGIT_ROWS, engine_module.LOGIT_BUDGET // V)} rows",
            "command": "python bench/scoring.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
