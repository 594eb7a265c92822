"""Fitting speed: one-pass Gram fitting of every layer pair vs an independent least-squares fit per pair.

Both fit mat (no intercept) for every ordered pair l < l' of hidden states h_0..h_L on the same float64
features, captured once from the model (the forward pass is not timed). The baseline is scikit-learn's
LinearRegression(fit_intercept=False), one fit per pair; the harness accumulates the stacked Gram matrix
in one pass and solves the normal equations per source layer. The matrices are compared entry by entry.

    python bench/fitting.py --model smollm2-135m --items 3000
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401  (sets the offline environment first)
import numpy as np
import torch
from sklearn.linear_model import LinearRegression
from tqdm.auto import tqdm

from jtc_lens.harness.corpora import get_corpus
from jtc_lens.harness.encoding import batches, encode
from jtc_lens.harness.projectors import GramAccumulator, fit_least_squares
from jtc_lens.harness.protocols import ProtocolConfig, build_items


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--distribution", default="wikipedia")
    parser.add_argument("--items", type=int, default=3000, help="paper-protocol train items (one position each)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    lens, folder = common.load_lens(args.model)
    S, d = lens.num_layers + 1, lens.d_model
    protocol = ProtocolConfig("paper")
    items = build_items(get_corpus(args.distribution), "train", protocol, limit=args.items)
    encoded = [encode(it, lens.tokenizer, protocol, lens.masked) for it in items]
    pad = lens.pad_id
    chunks = []
    with torch.no_grad():
        for batch in tqdm(list(batches(encoded, args.batch_size, pad)), desc="capture states", unit="batch"):
            chunks.append(lens.capture(batch.input_ids, batch.attention_mask, batch.rows, batch.cols).double())
    states = torch.cat(chunks, dim=1)  # (S, N, d) float64: the features both methods fit on
    n = states.shape[1]
    pairs = [(l, m) for l in range(S) for m in range(l + 1, S)]

    start = time.perf_counter()
    acc = GramAccumulator(S, d, "all")
    for chunk in chunks:  # the engine's own batches
        acc.update(chunk)
    ours = fit_least_squares(acc, intercept=False)
    t_ours = time.perf_counter() - start

    feats = [np.ascontiguousarray(states[l].numpy()) for l in range(S)]
    start = time.perf_counter()
    theirs = {}
    for l, m in tqdm(pairs, desc="scikit-learn, one fit per pair", unit="pair"):
        theirs[(l, m)] = LinearRegression(fit_intercept=False).fit(feats[l], feats[m]).coef_.T
    t_sk = time.perf_counter() - start

    rel = []
    for pair in pairs:
        M = ours[pair][0].numpy()
        rel.append(np.abs(M - theirs[pair]).max() / np.abs(theirs[pair]).max())
    rel = np.array(rel)
    worst = pairs[int(rel.argmax())]
    print(f"## Fitting every pair: {args.model}, {len(pairs)} pairs of {S} states, d = {d}, {n} positions\n")
    print("| method | seconds | ratio |")
    print("|---|---:|---:|")
    print(f"| scikit-learn LinearRegression(fit_intercept=False), one fit per pair | {t_sk:.1f} | 1.0 |")
    print(f"| one-pass float64 Gram of the stacked states, then one solve per source layer | {t_ours:.1f} | **{t_sk / t_ours:.1f}x faster** |")
    print()
    print(f"Agreement of the matrices (max |difference| / max |entry| per pair): median {np.median(rel):.1e}, "
          f"worst {rel.max():.1e} at pair {worst}.\n")
    for line in common.provenance_lines(args.model, folder, args.distribution, {
            "settings": f"{len(items)} train items, paper protocol (one position each), seed {protocol.seed}, float64 features",
            "command": "python bench/fitting.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
