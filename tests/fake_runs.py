"""lm-eval output folders written by hand, in the layout lm-eval 0.4.13 writes for jtc tasks, for leaderboard
tests that need a particular defect rather than a real run (tests/test_leaderboard.py makes real ones).

Values are made up (seeded); everything the leaderboard reads is present: per-layer results, provenance, and a
samples file per task whose lines carry the item's ``doc`` and its per-layer values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jtc_lens.harness.protocols import Item, ProtocolConfig, item_sha256

METRICS = ("p@1", "p@5", "p@10", "surprisal", "kl", "xent", "entropy", "r2")
STAMP = "2026-01-01T00-00-00.000000"


def items(n: int, distribution: str = "news") -> list[Item]:
    return [Item(f"{distribution}:{k}#s0", f"Sentence number {k} of the {distribution} sample, long enough.", (k + 0.5) / n)
            for k in range(n)]


def doc(item: Item, with_hash: bool = True) -> dict:
    out = {"item_id": item.item_id, "text": item.text, "u": item.u}
    if with_hash:
        out["item_sha256"] = item_sha256(item, ProtocolConfig("paper"))
    return out


def write_run(folder: Path, tasks: list[tuple[str, str, str | None]], *, n_items: int = 12, layers: int = 3,
              model_name: str = "tiny-model", model_id: str = "tinymodel000001", seed: int = 0, date: float = 1767225600.0,
              with_item_hash: bool = True, provenance: dict | None = None) -> Path:
    """One results file with ``tasks`` as (projector, distribution, fit distribution or None), and their samples.
    ``provenance`` entries are added to every task's provenance. Returns the results file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = {"results": {}, "configs": {}, "date": date, "model_name": model_name, "lm_eval_version": "0.4.13",
            "config": {"model_num_parameters": 1000}}
    for projector, distribution, fit_on in tasks:
        # a distribution named at run time (file:, hf:) is a custom task's
        task = f"custom_jtc_{projector}" if ":" in distribution else f"jtc_{projector}_{distribution}"
        its = items(n_items, distribution)
        values = {m: rng.integers(0, 2, size=(n_items, layers)).astype(float) if m.startswith("p@")
                  else rng.random((n_items, layers)) for m in METRICS}
        res = {}
        for m, v in values.items():
            for layer in range(layers):
                res[f"{m}.L{layer},none"] = float(v[:, layer].mean())
                res[f"{m}.L{layer}_stderr,none"] = float(v[:, layer].std() / np.sqrt(n_items))
            res[f"{m},none"] = float(v.mean())
        data["results"][task] = res
        prov = {
            "model": {"name": model_name, "architecture": "LlamaForCausalLM", "model_type": "llama", "num_layers": layers,
                      "d_model": 32, "vocab_size": 400, "masked": False, "config_sha256": "1" * 64, "unembed_sha256": "2" * 64,
                      "weights_sha256": "3" * 64, "id": model_id},
            "model_record": None, "distribution": distribution, "corpus_sha256": "c" * 64,
            "corpus_pin": {"key": distribution, "status": "match", "sources_sha256": "5" * 64, "files": 1},
            "split": "validation", "protocol": {"name": "paper", "seed": 1234}, "seed": 1234, "items": n_items,
            "positions": n_items, "items_data_sha256": "d" * 64, "bos_added": False, "items_at_position_0": 0,
            "adapter_checks": {"logits": 0.0}, "dtype": "float32", "device": "cpu", "versions": {"lm_eval": "0.4.13"},
            "date": "2026-01-01T00:00:00+00:00", "items_per_process": [n_items], "peak_memory": [{"host_rss_mib": 400.0}],
            "processes": 1, "run_seconds": 1.0, "run_requests": n_items,
            "projector_config": {"name": projector, **({"fit_on": fit_on, "fit_items": 60} if fit_on else {})},
            **(provenance or {}),
        }
        data["configs"][task] = {"task": task, "metadata": {"projector": projector, "distribution": distribution,
                                                           "provenance": prov}}
        lines = []
        for k, item in enumerate(its):
            row = {"doc_id": k, "doc": doc(item, with_item_hash)}
            row.update({f"{m}.L{layer}": float(values[m][k, layer]) for m in METRICS for layer in range(layers)})
            lines.append(json.dumps(row))
        (folder / f"samples_{task}_{STAMP}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    results = folder / f"results_{STAMP}.json"
    results.write_text(json.dumps(data), encoding="utf-8")
    return results


def samples_file(results: Path, task: str) -> Path:
    return results.parent / f"samples_{task}_{STAMP}.jsonl"


def edit_samples(results: Path, task: str, edit) -> None:
    """Apply ``edit(row)`` to every sample line of ``task``."""
    path = samples_file(results, task)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows:
        edit(row)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")


def edit_provenance(results: Path, task: str, edit) -> None:
    data = json.loads(results.read_text(encoding="utf-8"))
    edit(data["configs"][task]["metadata"]["provenance"])
    results.write_text(json.dumps(data), encoding="utf-8")
