"""docs/results.md's section across model scales, rendered from committed files only (results JSON and the claims
record), between two markers, so that the page is regenerated rather than edited."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from jtc_lens.harness.store import atomic_write_bytes

from . import claims, scales
from .read import Loaded, Run, load
from .tables import PAPER_DISTRIBUTIONS, across, by_size, models

SECTIONS = ("results", "cost")


def markers(section: str) -> tuple[str, str]:
    return f"<!-- jtc results-page {section}: begin", f"<!-- jtc results-page {section}: end -->"


def summary(loaded: Loaded, distributions: tuple[str, ...]) -> str:
    """Per distribution, a row per model (by size, controls last): P@1 and KL averaged over layers, per projector."""
    all_models = models(loaded.tasks)
    out = []
    for dist in distributions:
        view = across(all_models, dist)
        view.rows = [(m, by) for m, by in view.rows if by]  # a model with only a transfer run of it has no row here
        if not view.rows:
            continue
        out.append(f"**{dist}**, mean over layers (P@1 / KL in nats):\n")
        out.append("| model | layers | items | " + " | ".join(view.projectors) + " |")
        out.append("|---|---:|---:|" + "---:|" * len(view.projectors))
        for m, by in view.rows:
            first = next(iter(by.values()))
            cells = [f"{by[p].means['p@1']:.3f} / {by[p].means['kl']:.2f}" if p in by else "–" for p in view.projectors]
            out.append(f"| {m.name} | {m.num_layers} | {first.items} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _fit_seconds(run: Run) -> float:
    """The seconds the run's least-squares fits took when they were made, each fit counted once (one Gram pass gives
    mat and affine): its lens tasks' fits, a tuned lens's affine start, and an exit task's base projector (a run of
    the tuned lens and its exit alone fits its start there, and only the exit's base records that fit's time in
    results made before the warm start did)."""
    configs = [((e.provenance.get("exit") or {}).get("base") or {}).get("config") for e in run.exits]
    for t in run.tasks:
        pconf = t.provenance.get("projector_config") or {}
        configs += [pconf, pconf.get("warm_start")]
    fits = {}
    for config in configs:
        if isinstance(config, dict) and config.get("fit_seconds") is not None:
            key = config.get("fit_data_sha256") or (config.get("fit_on"), config.get("n_fit"))
            fits[key] = float(config["fit_seconds"])
    return sum(fits.values())


def cost(loaded: Loaded, paths: list[str | Path]) -> str:
    """Per results file (model and run folder): lm-eval's wall time, the time the fits and the tuned lenses took when
    they were made (a resumed run takes them from the cache: then not part of its wall time), and the peak host
    memory of its processes."""
    rows = []
    by_key = {m.key: m for m in models(loaded.tasks)}
    for run in loaded.runs:
        data = json.loads(run.results_file.read_text("utf-8"))
        tasks = run.tasks
        # a run of exit tasks alone (a long job split into requests) is named by its model's lens runs
        model = by_key.get(tasks[0].model_key if tasks else run.exits[0].model_key if run.exits else None)
        if model is None:
            continue
        peak = max((float(process.get("host_rss_mib") or 0.0) for x in (*run.exits, *tasks)
                    for process in x.provenance.get("peak_memory") or []), default=0.0)
        tuned, items = {}, {}
        for e in run.exits:
            items.setdefault(e.distribution, e.items)
        for t in tasks:
            pconf = t.provenance.get("projector_config") or {}
            if isinstance(pconf.get("train_seconds"), (int, float)):
                tuned[(t.distribution, pconf.get("fit_on"))] = float(pconf["train_seconds"])
            items[t.distribution] = t.items
        # the run's folder: PHASE, or PHASE/DISTRIBUTION, above MODEL/<lm-eval's model folder>/results_*.json
        where = Path(claims.relative(run.results_file, paths)).parts
        rows.append(((model.n_params or 0), "/".join(where[:-3]) or where[0], model, run, data, _fit_seconds(run), tuned, peak,
                     items))
    out = ["| model | run | tasks | evaluation items | lm_eval wall time | fitting mat/affine | training the tuned lens | peak host memory |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for _, folder, model, run, data, fits, tuned, peak, items in sorted(rows, key=lambda r: (r[0], r[1], r[2].name, r[3].date)):
        name = model.name
        wall = data.get("total_evaluation_time_seconds")
        wall_text = f"{float(wall) / 60:.0f} min" if wall is not None else "–"
        out.append(f"| {name} | {folder} | {len(run.tasks) + len(run.exits)} | {sum(items.values()):,} | {wall_text} | "
                   f"{fits / 60:.0f} min | {sum(tuned.values()) / 60:.0f} min | {peak / 1024:.1f} GiB |")
    return "\n".join(out) + "\n"


def _stop_reason(pconf: dict) -> str:
    if pconf.get("budget_exhausted"):
        return "its token budget spent"
    if pconf.get("stopped_early"):
        return f"training loss at stop_at ({(pconf.get('recipe') or {}).get('stop_at')})"
    return "the train split's stream ran out"  # recorded as stream_exhausted by runs that record it


def tuned_training(loaded: Loaded, distributions: tuple[str, ...]) -> str:
    """Per model and distribution, how far its tuned lens trained (steps and stream tokens against the recipe's budget,
    why it stopped, the held-out loss before and after, the layers whose trained state was kept): what a reader needs
    beside the tuned-vs-mat claim. Empty when no run has a tuned lens."""
    rows = []
    for m in by_size(models(loaded.tasks)):
        for dist in distributions:
            t = next((t for t in m.in_distribution(dist) if t.projector == "tuned"), None)
            pconf = (t.provenance.get("projector_config") or {}) if t is not None else {}
            if "steps" not in pconf:
                continue
            recipe = pconf.get("recipe") or {}
            start, end = pconf.get("heldout_start") or [], pconf.get("heldout_end") or []
            held = f"{sum(start) / len(start):.3f} → {sum(end) / len(end):.3f}" if start and len(start) == len(end) else "–"
            budget = recipe.get("token_budget")
            tokens = f"{int(pconf.get('tokens_spent') or 0):,}" + (f" of {budget:,}" if isinstance(budget, int) else "")
            kept = pconf.get("steps_kept") or []
            rows.append(f"| {m.name} | {dist} | {recipe.get('name', '–')} | {pconf['steps']} | {tokens} | {_stop_reason(pconf)} | "
                        f"{recipe.get('loss', '–')}: {held} | {sum(1 for k in kept if k)} of {len(kept)} | "
                        f"{float(pconf.get('train_seconds') or 0) / 60:.0f} min |")
    if not rows:
        return ""
    head = ["| model | distribution | recipe | steps | stream tokens, warm fit included (of the budget) | stopped when "
            "| held-out loss, layer mean, start → end | layers whose training was kept | training time |",
            "|---|---|---|---:|---:|---|---:|---:|---:|"]
    return "\n".join(head + rows) + "\n"


def per_layer(distributions: tuple[str, ...]) -> tuple[tuple[str, ...], list[str]]:
    """The distributions given a row per layer (the paper's two; the others, with fewer items and no tuned lens, have
    their layer means above and their layers on the leaderboard's model pages), and the note saying so, if needed."""
    layered = tuple(d for d in distributions if d in PAPER_DISTRIBUTIONS) or distributions
    rest = [d for d in distributions if d not in layered]
    note = [f"Per layer on {' and '.join(layered)}; {', '.join(rest)}: their means above, and every layer on the "
            "leaderboard's model pages.\n"] if rest else []
    return layered, note


def tuned_section(loaded: Loaded, distributions: tuple[str, ...]) -> list[str]:
    table = tuned_training(loaded, distributions)
    if not table:
        return []
    return ["### How far each tuned lens trained\n",
            "The warm recipe starts from the affine map and keeps, per layer, its trained state only where the held-out "
            "loss (KL in nats) fell significantly (keep-best); a layer whose training was not kept reads as affine. "
            "From each run's projector config:\n",
            table]


def render(paths: list[str | Path], record: dict, command: str, section: str = "results") -> str:
    begin, end = markers(section)
    note = f"{begin} (generated by `{command}` from the committed files; do not edit by hand) -->"
    loaded = load(paths)  # once, for every table
    if section == "cost":
        return "\n".join([note, cost(loaded, paths), end])
    distributions = tuple(record["distributions"])
    layered, note_lines = per_layer(distributions)
    return "\n".join([
        note,
        "### At a glance\n", summary(loaded, distributions),
        "### The paper's claims, per model\n",
        f"Tests at α = {record['alpha']}, computed by `jtc claims` from the per-item values of the runs (their samples, or the item values "
        f"written from them; seed "
        f"{record['seed']}); the record, with every test's per-layer rows and the runs it read, is the claims file.\n",
        claims.markdown(record),
        *tuned_section(loaded, distributions),
        "### Per model and layer\n", *note_lines, scales.markdown(paths, layered, loaded),
        end])


def update(doc: Path, section: str, name: str = "results") -> None:
    """Replace the generated section ``name`` of ``doc`` with ``section`` (or append it when the markers are absent)."""
    begin, finish = markers(name)
    text = doc.read_text("utf-8") if doc.exists() else ""
    start, end = text.find(begin), text.find(finish)
    if (start < 0) != (end < 0) or end < start:
        raise ValueError(f"{doc}: one results-page marker without the other; fix the file by hand")
    new = text[:start] + section + text[end + len(finish):] if start >= 0 else text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_bytes(doc, new.encode("utf-8"))


def main(results: list[str], claims_file: str | None, doc: str | None, section: str = "results") -> int:
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")
    if section == "results" and not claims_file:
        raise ValueError("the results section needs --claims (the record written by jtc claims)")
    record = json.loads(Path(claims_file).read_text("utf-8")) if claims_file else {}
    command = shlex.join(["jtc", "results-page", *results] + (["--claims", claims_file] if claims_file else [])
                         + (["--section", section] if section != "results" else []) + (["--update", doc] if doc else []))
    text = render(results, record, command, section)
    if doc:
        update(Path(doc), text, section)
        print(f"{doc}: {section} section updated")
    else:
        print(text)
    return 0
