"""End to end: items per second of `lm_eval --tasks 'jtc_*'` against a plain forward pass over the same items.

For each model: one lm_eval run fills the projector cache (fitting mat/affine and training the tuned lens
on each distribution: reported as the cold run), a second identical run is the measured one. Its
scoring time (the engine's own clock, every projector and metric at every layer) and its whole
command time are set against the floor: the model's plain forward pass over the same distinct items,
in the same batches, in this process.

    python bench/end_to_end.py --models smollm2-135m,gemma3-270m --n-eval 100
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch

from jtc_lens.harness.corpora import get_corpus, names
from jtc_lens.harness.encoding import batches, encode
from jtc_lens.harness.protocols import ProtocolConfig, build_items


def lm_eval(folder: str, metadata: dict, out: Path, cache: Path) -> tuple[float, dict]:
    exe = str(Path(sys.executable).parent / "lm_eval")
    cmd = [exe, "--model", "hf", "--model_args", f"pretrained={folder}", "--tasks", "jtc_*", "--output_path", str(out),
           "--metadata", json.dumps(metadata)]
    env = {**os.environ, "JTC_CACHE": str(cache), "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"lm_eval failed:\n{proc.stderr[-3000:]}")
    (path,) = glob.glob(str(out / "*" / "results_*.json"))
    return wall, json.loads(Path(path).read_text())


def forward_floor(model_name: str, n_eval: int, batch_size: int) -> tuple[float, int]:
    lens, _ = common.load_lens(model_name)
    protocol = ProtocolConfig("paper")
    encoded = []
    for dist in names():
        items = build_items(get_corpus(dist), "validation", protocol, limit=n_eval)
        encoded += [encode(it, lens.tokenizer, protocol, lens.masked) for it in items]
    pad = lens.pad_id
    prepared = list(batches(encoded, batch_size, pad))
    with torch.no_grad():
        lens.model(input_ids=prepared[0].input_ids, attention_mask=prepared[0].attention_mask)  # warm-up
        start = time.perf_counter()
        for batch in prepared:
            lens.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return time.perf_counter() - start, len(encoded)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--n-eval", type=int, default=100, help="items per task (paper protocol)")
    parser.add_argument("--n-fit", type=int, default=1500)
    parser.add_argument("--token-budget", type=int, default=2176, help="tuned lens (warm recipe) training tokens")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    metadata = {"n_eval": args.n_eval, "n_fit": args.n_fit, "token_budget": args.token_budget, "tokens_per_step": 128,
                "tuned_chunk_len": 128, "warm_fit_tokens": 2048, "jtc_batch_size": args.batch_size}
    rows = []
    work = Path(tempfile.mkdtemp(prefix="jtc-e2e-"))
    for name in [m for m in args.models.split(",") if m]:
        folder = common.model_folder(name)
        cache = work / f"cache-{name}"
        cold_wall, _ = lm_eval(folder, metadata, work / f"cold-{name}", cache)
        warm_wall, results = lm_eval(folder, metadata, work / f"warm-{name}", cache)
        provs = [c["metadata"]["provenance"] for c in results["configs"].values()]
        scoring = max(p["run_seconds"] for p in provs)
        requests = provs[0]["run_requests"]
        peak = max(m["host_rss_mib"] for p in provs for m in p["peak_memory"])
        floor, n_items = forward_floor(name, args.n_eval, args.batch_size)
        rows.append((name, n_items, requests, floor, scoring, warm_wall, cold_wall, peak, provs[0]["model"]["num_layers"]))
    print("## End to end: `lm_eval --tasks 'jtc_*'` (28 tasks: 4 projectors x 7 distributions)\n")
    print("| model | layers | distinct items | requests | forward pass only: items/s | jtc scoring: items/s | "
          "scoring time / forward time | whole lm_eval command, warm cache: items/s (s) | cold run: fits, trains, scores | peak memory |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, n_items, requests, floor, scoring, warm_wall, cold_wall, peak, layers in rows:
        print(f"| {name} | {layers} | {n_items} | {requests} | {n_items / floor:.1f} | {n_items / scoring:.1f} | "
              f"**{scoring / floor:.2f}x** | {n_items / warm_wall:.1f} ({warm_wall:.0f} s) | {cold_wall:.0f} s | {peak:,.0f} MiB |")
    print()
    models = [m for m in args.models.split(",") if m]
    lines = common.provenance_lines(models[0], common.model_folder(models[0]), None)
    print(lines[0])
    for name in models:
        print(common.provenance_lines(name, common.model_folder(name), None)[1])
    print(lines[2])
    print(f"- corpora: " + ", ".join(f"{d} {get_corpus(d).source_hash[:12]}" for d in names()))
    print(f"- settings: {json.dumps(metadata)}, paper protocol, seed 1234")
    print("- command: python bench/end_to_end.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
