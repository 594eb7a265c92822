"""Per-layer tables from lm-eval results files, as Markdown."""

from __future__ import annotations

import glob
import json
import re
import statistics
from pathlib import Path

_TASK = re.compile(r"^jtc_(?P<projector>[a-z0-9]+)_(?P<distribution>.+)$")


def results_files(paths: list[str]) -> list[Path]:
    files = []
    for p in paths:
        path = Path(p)
        files += [path] if path.is_file() else [Path(f) for f in sorted(glob.glob(str(path / "**" / "results_*.json"), recursive=True))]
    if not files:
        raise ValueError(f"no results_*.json under {', '.join(paths)}")
    return files


def layer_table(results_file: Path, metric: str = "p@1") -> str:
    data = json.loads(results_file.read_text())
    by_dist: dict[str, dict[str, dict]] = {}
    for task, res in data["results"].items():
        m = _TASK.match(task)
        if m and (data["configs"].get(task, {}).get("metadata") or {}).get("analysis", "lens") == "lens":
            by_dist.setdefault(m["distribution"], {})[m["projector"]] = {"res": res, "config": data["configs"].get(task, {})}
    out = []
    for dist, projectors in sorted(by_dist.items()):
        names = sorted(projectors, key=lambda p: ("id", "mat", "affine").index(p) if p in ("id", "mat", "affine") else 9)
        any_prov = projectors[names[0]]["config"].get("metadata", {}).get("provenance", {})
        layers = any_prov.get("model", {}).get("num_layers") or 1 + max(
            int(k.split(".L")[1].split(",")[0]) for k in projectors[names[0]]["res"] if k.startswith(f"{metric}.L"))
        out.append(f"**{dist}** ({any_prov.get('split', '?')} split, {any_prov.get('items', '?')} items, "
                   f"protocol {any_prov.get('protocol', {})}), {metric} per layer (mean ± standard error):\n")
        out.append("| layer | " + " | ".join(names) + " |")
        out.append("|---:|" + "---:|" * len(names))
        for layer in range(layers):
            cells = []
            for p in names:
                res = projectors[p]["res"]
                cells.append(f"{res[f'{metric}.L{layer},none']:.3f} ± {res[f'{metric}.L{layer}_stderr,none']:.3f}")
            out.append(f"| {layer} | " + " | ".join(cells) + " |")
        if metric.split(".")[0] in ("r2", "r2w"):
            # no layer mean of r^2: one layer can dominate it; the median over layers is bounded by the typical layer
            cells = [f"{statistics.median(projectors[p]['res'][f'{metric}.L{l},none'] for l in range(layers)):.3f}" for p in names]
            out.append("| median over layers | " + " | ".join(cells) + " |\n")
        else:
            cells = [f"{projectors[p]['res'][f'{metric},none']:.3f}" for p in names]
            out.append("| mean over layers | " + " | ".join(cells) + " |\n")
    return "\n".join(out)
