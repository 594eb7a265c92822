"""Per-layer tables from lm-eval results files, as Markdown."""

from __future__ import annotations

import glob
import json
import re
import statistics
from pathlib import Path

from .early_exit import PAPER_SAVED_AT_95

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


def _tasks_by(data: dict, analysis: str) -> dict[str, tuple[dict, dict]]:
    """Task name -> (results entry, metadata) of the jtc tasks of one analysis (lens, exit, submodule)."""
    out = {}
    for task, res in data["results"].items():
        meta = (data["configs"].get(task, {}) or {}).get("metadata") or {}
        if task.startswith(("jtc_", "custom_jtc_")) and meta.get("analysis", "lens") == analysis:
            out[task] = (res, meta)
    return out


def _model_line(prov: dict, path: Path) -> str:
    model = prov.get("model", {})
    return (f"**{Path(str(model.get('name', '?'))).name}** ({model.get('num_layers', '?')} layers, weights sha256 "
            f"{str(model.get('weights_sha256'))[:12]}…; {path.parent.name}/{path.name})")


def compare_table(results_file: Path, a: str = "tuned", b: str = "affine", metric: str = "kl") -> str:
    """Per layer and distribution, ``a`` minus ``b`` in ``metric`` (their difference of means over the same items),
    and per distribution how many layers have a at or below b (lower is better) or at or above (higher is better)."""
    data = json.loads(results_file.read_text())
    lens = _tasks_by(data, "lens")
    found: dict[str, dict[str, tuple[dict, dict]]] = {}
    for task, (res, meta) in lens.items():
        if meta.get("projector") in (a, b):
            found.setdefault(str(meta.get("distribution")), {})[meta["projector"]] = (res, meta)
    dists = sorted(d for d, p in found.items() if a in p and b in p)
    if not dists:
        raise ValueError(f"{results_file}: no distribution has both {a} and {b}")
    prov = found[dists[0]][a][1].get("provenance", {})
    L = prov.get("model", {}).get("num_layers")
    from .metrics import HIGHER_IS_BETTER

    higher = HIGHER_IS_BETTER.get(metric)
    out = [_model_line(prov, results_file) + f": {a} − {b}, {metric} per layer ({prov.get('items', '?')} items per "
           f"distribution, {prov.get('split', '?')} split)\n", "| layer | " + " | ".join(dists) + " |", "|---:|" + "---:|" * len(dists)]
    diffs = {d: [found[d][a][0][f"{metric}.L{l},none"] - found[d][b][0][f"{metric}.L{l},none"] for l in range(L)] for d in dists}
    # compared at the printed precision: a lens that kept another's map differs from it by float rounding only
    shown = lambda x: "0.0000" if round(x, 4) == 0 else f"{x:+.4f}"  # noqa: E731
    for l in range(L):
        out.append(f"| {l} | " + " | ".join(shown(diffs[d][l]) for d in dists) + " |")
    ok = (lambda x: round(x, 4) >= 0) if higher else (lambda x: round(x, 4) <= 0)
    word = "at or above" if higher else "at or below"
    out.append(f"| layers with {a} {word} {b} | " + " | ".join(f"{sum(ok(x) for x in diffs[d])}/{L}" for d in dists) + " |")
    out.append(f"| mean {b} | " + " | ".join(f"{found[d][b][0][f'{metric},none']:.4f}" for d in dists) + " |")
    out.append(f"| mean {a} | " + " | ".join(f"{found[d][a][0][f'{metric},none']:.4f}" for d in dists) + " |")
    tested = {d: _paired_layers(results_file, f"jtc_{a}_{d}", f"jtc_{b}_{d}", metric, L) for d in dists}
    if any(t is not None for t in tested.values()):
        worse, better = ("below", "above") if higher else ("above", "below")
        for label, sign in ((f"layers significantly {worse} {b}", 1), (f"layers significantly {better} {b}", -1)):
            cells = []
            for d in dists:
                t = tested[d]
                cells.append("–" if t is None else str(sum(1 for row in t if row.significant and sign * row.diff > 0)))
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        test = next(t for t in tested.values() if t is not None)[0].test
        out.append(f"\nSignificance: per layer, a {test} test on {metric}, paired over items (2,000 resamples), Holm-corrected "
                   "over the layers of each distribution at 0.05; from the samples files beside the results (– where they "
                   "are absent).")
    return "\n".join(out) + "\n"


def _paired_layers(results_file: Path, task_a: str, task_b: str, metric: str, L: int) -> list | None:
    """Per layer, the paired comparison of the two tasks' items (``stats.compare``: Holm over the layers at 0.05)
    from their samples files; None when either file is not beside the results file."""
    from .stats import compare

    stamp = results_file.name[len("results_"):-len(".json")]
    sides = []
    for task in (task_a, task_b):
        path = results_file.parent / f"samples_{task}_{stamp}.jsonl"
        if not path.is_file():
            return None
        rows = [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip()) if f"{metric}.L0" in r]
        # paired by item id, and the same item under that id (its text and position draw): else a ValueError
        sides += [[r["doc"]["item_id"] for r in rows], {l: [r[f"{metric}.L{l}"] for r in rows] for l in range(L)},
                  [r["doc"].get("item_sha256") for r in rows]]
    ids_a, a, hashes_a, ids_b, b, hashes_b = sides
    return compare(ids_a, a, ids_b, b, metric, n_resamples=2000, contents_a=hashes_a, contents_b=hashes_b)


def exit_table(results_file: Path) -> str:
    """Blocks saved at 99 / 95 / 90% retention per distribution and projector, with the paired differences at 95%."""
    data = json.loads(results_file.read_text())
    tasks = _tasks_by(data, "exit")
    if not tasks:
        raise ValueError(f"{results_file}: no early-exit task")
    by = {(str(m.get("distribution") or m.get("corpus")), m["projector"]): (r, m) for r, m in tasks.values()}
    dists = sorted({d for d, _ in by})
    projectors = [p for p in ("id", "mat", "tuned") if any(k[1] == p for k in by)]
    prov = next(iter(tasks.values()))[1].get("provenance", {})
    out = [_model_line(prov, results_file) + f": early exit, blocks saved (% of {prov.get('model', {}).get('num_layers')}) "
           f"at 99 / 95 / 90% retention; paired difference at 95% [95% bootstrap interval]; {prov.get('items', '?')} items\n",
           "| distribution | " + " | ".join(projectors) + " | " + " | ".join(
               f"{p} − {b}" for p, b in (("mat", "id"), ("tuned", "mat")) if p in projectors) + " |",
           "|---|" + "---:|" * (len(projectors) + sum(p in projectors for p in ("mat", "tuned")))]
    for d in dists:
        cells = []
        for p in projectors:
            r = by.get((d, p), ({}, {}))[0]
            cells.append(" / ".join(f"{100 * r[f'saved@{k},none']:.1f}" if f"saved@{k},none" in r else "–" for k in (99, 95, 90)))
        for p in ("mat", "tuned"):
            if p in projectors:
                r = by.get((d, p), ({}, {}))[0]
                cells.append(f"{100 * r['saved_diff@95,none']:+.1f} [{100 * r['saved_diff@95_lo,none']:+.1f}, "
                             f"{100 * r['saved_diff@95_hi,none']:+.1f}]" if "saved_diff@95,none" in r else "–")
        out.append(f"| {d} | " + " | ".join(cells) + " |")
    # the paper's figures under their own projectors' columns only (a run of tuned alone has neither)
    paper = [f"{100 * PAPER_SAVED_AT_95[p]:.1f}" if p in PAPER_SAVED_AT_95 else "" for p in projectors]
    if any(paper):
        blanks = [""] * sum(p in projectors for p in ("mat", "tuned"))
        out.append("| paper, GPT-2 (24 layers), 95% only | " + " | ".join(paper + blanks) + " |")
    out.append("")
    return "\n".join(out)


def _p1(value: float) -> str:
    return "diverged" if value != value else f"{value:.3f}"  # NaN: the intervened model's prediction is non-finite


def submodule_table(results_file: Path, distribution: str | None = None) -> str:
    """P@1 per start layer of each part replaced by its linear map, removed, and of mat from the start layer; on one
    distribution (the first, or ``distribution``), then the mean over start layers on every distribution."""
    data = json.loads(results_file.read_text())
    tasks = _tasks_by(data, "submodule")
    if not tasks:
        raise ValueError(f"{results_file}: no sub-module task")
    by = {(str(m.get("distribution") or m.get("corpus")), m["part"]): r for r, m in tasks.values()}
    dists = sorted({d for d, _ in by})
    parts = [p for p in ("attn", "ffn", "norm") if any(k[1] == p for k in by)]
    prov = next(iter(tasks.values()))[1].get("provenance", {})
    starts = prov.get("submodule", {}).get("start_layers", [])
    L = prov.get("model", {}).get("num_layers")
    shown = distribution or ("wikipedia" if "wikipedia" in dists else dists[0])
    out = [_model_line(prov, results_file) + f": sub-module shortcuts on {shown}, P@1 against the unmodified model "
           f"({prov.get('items', '?')} items)\n",
           "| start layer l (l/L) | " + " | ".join(f"{p} linear | {p} removed" for p in parts) + " | mat from l |",
           "|---:|" + "---:|---:|" * len(parts) + "---:|"]
    for l in starts:
        cells = []
        for p in parts:
            r = by[(shown, p)]
            cells += [_p1(r[f"p@1.L{l},none"]), _p1(r[f"removed_p@1.L{l},none"])]
        cells.append(f"{by[(shown, parts[0])][f'mat_p@1.L{l},none']:.3f}")
        out.append(f"| {l} ({l / L:.2f}) | " + " | ".join(cells) + " |")
    out += ["", "Mean P@1 over the start layers, every distribution:\n",
            "| distribution | " + " | ".join(f"{p} linear" for p in parts) + " | " + " | ".join(f"{p} removed" for p in parts)
            + " | mat from l |", "|---|" + "---:|" * (2 * len(parts) + 1)]
    for d in dists:
        mean = lambda p, prefix: statistics.mean(by[(d, p)][f"{prefix}p@1.L{l},none"] for l in starts) if (d, p) in by else float("nan")
        out.append(f"| {d} | " + " | ".join(_p1(mean(p, '')) for p in parts) + " | "
                   + " | ".join(_p1(mean(p, 'removed_')) for p in parts) + f" | {mean(parts[0], 'mat_'):.3f} |")
    return "\n".join(out) + "\n"


def _claim_cell(test: dict) -> str:
    if test.get("diff") is None:
        return "–"
    mark = " ✓" if test["hi"] < 0 else " ✗" if test["lo"] > 0 else ""
    return f"{test['diff']:+.3f} [{test['lo']:+.3f}, {test['hi']:+.3f}]{mark}"


def intervention_table(results_file: Path) -> str:
    """Per distribution of the layer-intervention tasks: the normalised score per intervention and span, and the
    paired tests of the paper's claims (cross-entropy, better − worse, 95% interval; ✓ holds, ✗ fails)."""
    data = json.loads(results_file.read_text())
    tasks = _tasks_by(data, "layers")
    if not tasks:
        raise ValueError(f"{results_file}: no layer-intervention task")
    out = []
    for task, (res, meta) in sorted(tasks.items(), key=lambda kv: str(kv[1][1].get("distribution") or kv[1][1].get("corpus"))):
        prov = meta.get("provenance", {})
        info, summary = prov.get("layers", {}), prov.get("layers", {}).get("summary") or {}
        L = prov.get("model", {}).get("num_layers")
        starts = info.get("starts", [])
        spans = [f"{s}–{L - 1 - s} ({L - 2 * s})" for s in starts]
        out += [_model_line(prov, results_file) + f": layer interventions on {prov.get('distribution')}, normalised score "
                f"(0: uniform prediction, 1: the unmodified model, cross-entropy {summary.get('xent_unmodified', float('nan')):.3f} "
                f"nats); {prov.get('items', '?')} items; columns: span (blocks altered)\n",
                "| intervention | " + " | ".join(spans) + " |", "|---|" + "---:|" * len(spans)]
        for kind in info.get("kinds", []):
            cells = [summary["by_kind"][kind][str(s)]["score"] for s in starts]
            out.append(f"| {kind} | " + " | ".join("diverged" if c is None else f"{c:.3f}" for c in cells) + " |")
        out += ["", "Claims (cross-entropy, better − worse, nats, 95% bootstrap interval; ✓: holds, ✗: fails):\n",
                "| claim | " + " | ".join(spans) + " |", "|---|" + "---:|" * len(spans)]
        for c in summary.get("claims", []):
            out.append(f"| {c['claim']} ({c['a']} − {c['b']}) | "
                       + " | ".join(_claim_cell(c["by_start"][str(s)]) for s in starts) + " |")
        out.append("")
    return "\n".join(out)
