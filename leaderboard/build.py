"""Render the leaderboard: read runs, compute tables and paired tests, write static HTML pages.

The site is a folder of self-contained pages (styles, charts and the sorting script inline), so it
opens from file:// with no server and no network.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from ..harness import early_exit
from ..harness.store import atomic_write_bytes

from . import read, svg, tables
from .comparison_cache import ComparisonStore, add_store_flags, store_from
from .read import Problem

TEMPLATES = Path(__file__).parent / "templates"
# The defaults of a build, for the jtc leaderboard command and the sweep alike
ALPHA = 0.05  # family-wise error level of the Holm-corrected tests
N_RESAMPLES = 2000  # keeps a build to seconds; deep families get more (tables.resamples_for)
SEED = 0  # seed of the resampling
CHARTS = (
    ("p@1", "P@1", False, (0.0, 1.0),
     "Share of items where the projector's top token is the model's own top-1 prediction (higher is better)."),
    ("surprisal", "surprisal (bits)", False, (0.0, None),
     "Surprisal under the model's final distribution of the projector's top token, −log₂ p(argmax q) (lower is better)."),
    ("kl", "KL (bits, log scale)", True, (None, None),
     "KL(p ‖ q) from the model's final distribution p to the projector's q, in bits, on a logarithmic axis (lower is better)."),
)


@dataclass
class BuildResult:
    out_dir: Path
    pages: list[Path]
    warnings: list[Problem]
    seconds: float


# ---------------------------------------------------------------------------------------------
# Formatting filters


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v != 0 and abs(v) < 10 ** -digits:
        return f"{v:.1e}"
    return f"{v:,.{digits}f}".replace("-", "−")


def fmt_p(p: float | None) -> str:
    if p is None:
        return "–"
    if p < 1e-4:
        return "< 0.0001"
    return f"{p:.4f}" if p < 0.01 else f"{p:.3f}"


def signed(v: float | None, digits: int = 3) -> str:
    return fmt(v, digits) if v is None else ("+" if v > 0 else "") + fmt(v, digits)


def short_hash(h, n: int = 12) -> str:
    return h[:n] + "…" if isinstance(h, str) and len(h) > n else str(h if h is not None else "–")


def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=fmt, fmt_p=fmt_p, signed=signed, short_hash=short_hash,
                       as_json=lambda v: json.dumps(v, indent=1, sort_keys=True, default=str))
    env.globals.update(TITLES=tables.TITLES, unit=tables.unit, scale=tables.scale, model_label=tables.display_name)
    return env


# ---------------------------------------------------------------------------------------------
# Charts


def _series(tasks: list[read.TaskRun], metric: str, fit_labels: bool) -> list[svg.Series]:
    out = []
    factor = tables.scale(metric)
    for k, t in enumerate(tasks):
        L = t.num_layers
        label = t.fit_label if fit_labels else t.label
        ys = [v * factor for v in t.layers[metric]]
        u = tables.unit(metric)
        tips = [f"{label}, layer {l} (depth {l / L:.2f}): {y:.4g}{' ' + u if u else ''}" for l, y in enumerate(ys)]
        out.append(svg.Series(label=label, xs=[l / L for l in range(L)], ys=ys, tips=tips, projector=t.projector,
                              variant=t.transfer, index=k))
    return out


def _marks(families: list[tables.Family], metric: str) -> list[svg.MarkRow]:
    rows = []
    for f in families:
        if f.metric != metric:
            continue
        label = f.short
        if f.error:
            rows.append(svg.MarkRow(label=label, xs=[], note="not tested: items differ or samples missing (see below)"))
            continue
        L = f.a.num_layers
        sig = [r for r in f.rows if r.significant]
        rows.append(svg.MarkRow(
            label=label, xs=[int(r.layer) / L for r in sig],
            tips=[f"layer {r.layer}: {f.a_label} − {f.b_label} {signed(r.diff * f.factor)} (p_holm {fmt_p(r.p_holm)}, {r.test})" for r in sig]))
    return rows


def metric_charts(tasks: list[read.TaskRun], families: list[tables.Family], context: str,
                  fit_labels: bool = False) -> list[dict]:
    charts = []
    for metric, y_label, log, y_range, caption in CHARTS:
        chart = svg.line_chart(_series(tasks, metric, fit_labels), title=f"{tables.TITLES[metric]} against relative depth, {context}",
                               y_label=y_label, y_log=log, y_range=y_range, marks=_marks(families, metric))
        charts.append({"metric": metric, "title": y_label, "svg": chart, "caption": caption})
    return charts


EXIT_RETENTIONS = tuple(str(r) for r in early_exit.RETENTIONS)  # the keys of the provenance's savings


def _by_distribution(runs: list, name, order: tuple) -> list[tuple[str, list]]:
    """(distribution, its runs in ``order`` of ``name(run)``), distributions in name order."""
    rank = {n: k for k, n in enumerate(order)}
    return [(dist, sorted((r for r in runs if r.distribution == dist), key=lambda r: rank.get(name(r), len(order))))
            for dist in sorted({r.distribution for r in runs})]


def exit_view(exits: list[read.ExitRun], model_name: str) -> list[dict]:
    """Per distribution: a table of blocks saved per projector with the paired differences, and the
    accuracy / blocks-used curve of each projector (one point per lambda)."""
    views = []
    for dist, runs in _by_distribution(exits, lambda e: e.projector, ("id", "mat", "tuned")):
        series = []
        for k, e in enumerate(runs):
            lam, used, acc = e.curve["lambdas"], e.curve["fraction_used"], e.curve["accuracy"]
            tips = [f"{e.projector}, lambda {l:.2f}: {u:.3f} of the blocks, accuracy {a:.3f}" for l, u, a in zip(lam, used, acc)]
            # closed by the full model, as blocks saved are interpolated: the last segment is drawn too
            series.append(svg.Series(label=e.projector, xs=list(used) + [1.0], ys=list(acc) + [1.0],
                                     tips=tips + ["the full model: every block, accuracy 1"], projector=e.projector, index=k))
        chart = svg.line_chart(series, title=f"Early exit, {model_name} on {dist}", y_label="accuracy (P@1 vs the model)",
                               x_label="fraction of blocks used", y_range=(None, 1.0))
        views.append({"distribution": dist, "runs": runs, "chart": chart})
    return views


def submodule_view(studies: list[read.SubmoduleRun], model_name: str) -> list[dict]:
    """Per distribution: P@1 against the relative depth of the start layer, one line per part replaced by its
    linear map, per part removed, and for mat jumping from the start layer; and the table behind it."""
    views = []
    for dist, runs in _by_distribution(studies, lambda s: s.part, ("attn", "ffn", "norm")):
        series = []
        for k, s in enumerate(runs):
            L = s.num_layers
            xs = [l / L for l in s.starts]
            for mode, label, variant in (("linear", f"{s.part} linear", False), ("removed", f"{s.part} removed", True)):
                ys = s.values[mode]["p@1"]
                tips = [f"{label} from layer {l} (depth {l / L:.2f}): P@1 {y:.3f}" for l, y in zip(s.starts, ys)]
                series.append(svg.Series(label=label, xs=xs, ys=ys, tips=tips, projector=s.part, variant=variant, index=k))
        first = runs[0]
        L = first.num_layers
        series.append(svg.Series(label="mat from l", xs=[l / L for l in first.starts], ys=first.values["mat"]["p@1"],
                                 tips=[f"mat from layer {l}: P@1 {y:.3f}" for l, y in zip(first.starts, first.values["mat"]["p@1"])],
                                 projector="mat"))
        chart = svg.line_chart(series, title=f"Sub-module shortcuts, {model_name} on {dist}", y_label="P@1 vs the model",
                               x_label="relative depth of the first block replaced (l / L)", y_range=(0.0, 1.0))
        views.append({"distribution": dist, "runs": runs, "chart": chart})
    return views


def layers_view(runs: list[read.LayersRun], model_name: str) -> list[dict]:
    """Per distribution: a heatmap of the normalised score over intervention kind x start layer, a chart of the
    score against the number of layers altered (one line per kind), and the table with the paired tests."""
    views = []
    for run in sorted(runs, key=lambda r: r.distribution):
        rows = [[run.score(kind, s) for s in run.starts] for kind in run.kinds]
        heat = svg.heatmap(rows, run.kinds, [str(s) for s in run.starts],
                           title=f"Layer interventions, {model_name} on {run.distribution}: normalised score",
                           x_label=f"start s of the span [s, {run.num_layers - 1}-s] (0-based blocks)")
        series = []
        for k, kind in enumerate(run.kinds):
            xs, ys, tips = [], [], []
            for s, n, y in zip(run.starts, run.layers_altered, rows[k]):
                xs.append(n / run.num_layers)
                ys.append(y)
                tips.append(f"{kind}, blocks {s}-{run.num_layers - 1 - s} ({n} altered): score "
                            + (f"{y:.3f}" if y is not None else "none (diverged)"))
            series.append(svg.Series(label=kind, xs=xs, ys=ys, tips=tips, projector=kind, index=k))
        chart = svg.line_chart(series, title=f"Layer interventions, {model_name} on {run.distribution}",
                               y_label="normalised score", x_label="fraction of the blocks altered",
                               y_range=(None, 1.0))
        views.append({"distribution": run.distribution, "run": run, "heatmap": heat, "chart": chart})
    return views


def cross_model_charts(views: list[tables.CrossModel]) -> list[dict]:
    """P@1 against relative depth, one line per model, one chart per projector, on one distribution (Wikipedia when
    every model has it, else the distribution with most models)."""
    if not views:
        return []
    view = next((v for v in views if v.distribution == "wikipedia"), max(views, key=lambda v: len(v.rows)))
    charts = []
    for projector in view.projectors:
        series = []
        for k, (m, by) in enumerate(view.rows):
            t = by.get(projector)
            if t is None:
                continue
            L = t.num_layers
            ys = t.layers["p@1"]
            tips = [f"{m.name}, layer {l} of {L} (depth {l / L:.2f}): P@1 {y:.3f}" for l, y in enumerate(ys)]
            series.append(svg.Series(label=m.name, xs=[l / L for l in range(L)], ys=ys, tips=tips, projector=f"model {k}",
                                     variant=tables.is_random_control(m), index=k))
        charts.append({"projector": projector, "distribution": view.distribution,
                       "svg": svg.line_chart(series, title=f"{projector}: P@1 against relative depth on {view.distribution}",
                                             y_label="P@1", y_range=(0.0, 1.0))})
    return charts


def r2_heatmaps(tasks: list[read.TaskRun]) -> list[dict]:
    L = tasks[0].num_layers
    out = []
    for metric in ("r2", "r2w"):
        if not all(metric in t.layers for t in tasks):
            continue  # r2w: runs of older versions did not record it
        labels, rows = tables.r2_by_projector(tasks, metric)
        name = tables.TITLES[metric]
        out.append({
            "title": f"{name} of the projected state against the last layer's state, by source layer",
            "svg": svg.heatmap(rows, labels, [str(l) for l in range(L)], title=f"{name} by layer and projector",
                               x_label=f"source layer l (target: layer {L}, the last block's output)"),
            "pairwise": False, "metric": metric,
        })
    for t in tasks:
        matrix = tables.r2_pairwise(t)
        if matrix is None:
            continue
        src, dst, values = matrix
        out.append({
            "title": f"r² of {t.label} from every layer l to every later layer l′",
            "svg": svg.heatmap(values, [f"l = {s}" for s in src], [str(d) for d in dst], title=f"r² layer to layer, {t.label}",
                               x_label="target layer l′", y_label="source layer l", cell=14, label_width=60),
            "pairwise": True, "metric": "r2",
        })
    return out


# ---------------------------------------------------------------------------------------------
# Site


def _family_data(f: tables.Family) -> dict:
    return {"model": f.model, "distribution": f.distribution, "metric": f.metric, "a": f.a_label, "b": f.b_label,
            "a_run": str(f.a.results_file), "b_run": str(f.b.results_file), "alpha": f.alpha, "correction": "holm",
            "n_resamples": f.n_resamples, "items": "not at position 0" if f.without_position_0 else "all",
            "error": f.error, "notes": f.notes, "layers": [r.to_dict() for r in f.rows]}


def _family_problems(f: tables.Family, model: str) -> list[Problem]:
    """A comparison's error or notes as warnings of the build, naming the samples file."""
    where = str(f.a.samples_file or f.a.results_file)
    what = f"comparison {f.a_label} vs {f.b_label}, {f.metric}, {model} on {f.distribution}"
    if f.error:
        return [Problem(where, f"{what}: {f.error}")]
    return [Problem(where, f"{what}: note: {n}") for n in f.notes]


# Every page the build writes ends its title so; a model page of an earlier build carries it too.
PAGE_MARK = "jtc-lens leaderboard</title>"


def stale_pages(out: Path, written: list[Path]) -> list[Path]:
    """Model pages an earlier build wrote into ``out`` for models this build does not have. Only files named
    like the build's own model pages and carrying its title are the build's; anything else is left alone."""
    keep = {p.name for p in written}
    stale = []
    for path in sorted(out.glob("model-*.html")):
        if path.name in keep or not path.is_file():
            continue
        with path.open("r", encoding="utf-8", errors="replace") as fh:
            if PAGE_MARK in fh.read(4096):
                stale.append(path)
    return stale


def build_site(results: list[str | Path], output: str | Path, alpha: float = ALPHA, resamples: int = N_RESAMPLES,
               seed: int = SEED, stream=None, without_position_0: bool = False,
               store: ComparisonStore | None = None) -> BuildResult:
    """Build the site in ``output`` from lm-eval output folders (or results files) ``results``; problems
    become warnings (stderr and index), not failures. ``without_position_0``: the paired tests leave out the
    items scored at position 0. ``store``: where the paired tests' results are kept between builds (None: nowhere)."""
    start = time.perf_counter()
    stream = sys.stderr if stream is None else stream
    out = Path(output)
    loaded = read.load(results)
    warnings = list(loaded.warnings)
    all_models = tables.models(loaded.tasks)
    cache = read.SampleCache()
    store = store if store is not None else ComparisonStore(None)
    env = environment()
    common = {"alpha": alpha, "n_resamples": resamples, "models": all_models, "without_position_0": without_position_0,
              "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    families_out = []
    model_pages = []
    for m in all_models:
        sections = []
        for dist in m.distributions:
            tasks = m.in_distribution(dist)
            if not tasks:
                continue  # only transfer runs here; they are on the transfer page
            fams = tables.comparisons(m, dist, cache, alpha=alpha, n_resamples=resamples, seed=seed,
                                      without_position_0=without_position_0, store=store)
            for f in fams:
                families_out.append(_family_data(f))
                warnings += _family_problems(f, m.name)
            sections.append({
                "distribution": dist, "tasks": tasks, "families": fams,
                "charts": metric_charts(tasks, fams, f"{m.name} on {dist}"), "heatmaps": r2_heatmaps(tasks),
                "metrics": [k for k in read.ALL_METRICS if all(k in t.layers for t in tasks)],
                "no0_metrics": [k for k in read.ALL_METRICS
                                if all(t.without_position_0 and k in t.without_position_0["layers"] for t in tasks)],
            })
        model_pages.append((m, sections, exit_view([e for e in loaded.exits if e.model_key == m.key], m.name),
                            submodule_view([s for s in loaded.submodules if s.model_key == m.key], m.name),
                            layers_view([s for s in loaded.layers if s.model_key == m.key], m.name)))

    transfers = tables.transfers(all_models, cache, alpha=alpha, n_resamples=resamples, seed=seed,
                                 without_position_0=without_position_0, store=store)
    transfer_views = []
    for tr in transfers:
        shown = [x for x in (tr.baseline, tr.in_dist, tr.task) if x is not None]
        for f in tr.families:
            families_out.append(_family_data(f))
            warnings += _family_problems(f, tr.model.name)
        transfer_views.append({"t": tr, "charts": metric_charts(shown, tr.families, f"{tr.model.name} on {tr.task.distribution}",
                                                                fit_labels=True)})

    shown = {m.key for m in all_models}
    for e in loaded.exits + loaded.submodules + loaded.layers:
        if e.model_key not in shown:
            warnings.append(Problem(str(e.results_file), f"task {e.task}: a model with no lens task in the "
                                                         "results; it has no model page to be shown on"))
    for w in warnings:
        print(f"jtc leaderboard: warning: {w}", file=stream)
    print(f"jtc leaderboard: {store.summary()}", file=stream)

    out.mkdir(parents=True, exist_ok=True)
    pages = []

    def write(name: str, template: str, **ctx) -> None:
        # atomically: a build stopped at any point leaves every page whole, the old one or the new one
        path = out / name
        atomic_write_bytes(path, env.get_template(template).render(page=name, **common, **ctx).encode("utf-8"))
        pages.append(path)

    across = tables.cross_model(all_models)
    write("index.html", "index.html.j2", ranking=tables.rankings(all_models), warnings=warnings,
          superseded=loaded.superseded, n_runs=len(loaded.runs), n_transfers=len(transfers),
          across=across, across_charts=cross_model_charts(across))
    for m, sections, exits, studies, layer_views in model_pages:
        write(m.page, "model.html.j2", model=m, sections=sections, exits=exits, exit_retentions=EXIT_RETENTIONS,
              paper_exit=early_exit.PAPER_SAVED_AT_95, studies=studies, layer_views=layer_views)
    write("transfer.html", "transfer.html.j2", transfers=transfer_views)
    runs = sorted(loaded.runs, key=lambda r: (-r.date, str(r.results_file)))
    write("runs.html", "runs.html.j2", runs=runs)
    data = {"alpha": alpha, "n_resamples": resamples, "seed": seed, "without_position_0": without_position_0,
            "families": families_out,
            "warnings": [{"file": w.file, "message": w.message} for w in warnings]}
    atomic_write_bytes(out / "comparisons.json", json.dumps(data, indent=1).encode("utf-8"))
    for stale in stale_pages(out, pages):
        stale.unlink()
        print(f"jtc leaderboard: removed {stale}, the page of a model no longer in the results", file=stream)
    return BuildResult(out_dir=out, pages=pages, warnings=warnings, seconds=time.perf_counter() - start)


def exit_status(result: BuildResult) -> int:
    """Say where the site is; 1 when no run could be shown (the index then lists the problems)."""
    if not any(p.name.startswith("model-") for p in result.pages):
        print("jtc leaderboard: no usable results; the index lists the problems", file=sys.stderr)
        return 1
    print(f"{result.out_dir / 'index.html'} ({len(result.pages)} pages, {len(result.warnings)} warning(s), "
          f"{result.seconds:.1f} s)")
    return 0


def parser(prog: str = "jtc leaderboard") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Static HTML leaderboard (rankings, charts, paired tests) from lm-eval results.")
    p.add_argument("results", nargs="+", help="folders holding results_*.json (searched recursively) or the files")
    p.add_argument("-o", "--output", required=True, help="folder to write the site to (created if missing)")
    p.add_argument("--alpha", type=float, default=ALPHA, help="family-wise error level of the Holm-corrected tests (default %(default)s)")
    p.add_argument("--resamples", type=int, default=N_RESAMPLES, help="bootstrap and permutation resamples per layer (default %(default)s)")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the resampling (default %(default)s)")
    p.add_argument("--without-position-0", action="store_true",
                   help="run the paired tests on the items not scored at position 0 (a one-token input without BOS)")
    add_store_flags(p)
    return p


def main(argv: list[str] | None = None, prog: str = "jtc leaderboard") -> int:
    """``jtc leaderboard ...`` (harness.cli hands its arguments here) or ``python -m jtc_lens.leaderboard.build ...``."""
    args = parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = build_site(args.results, args.output, alpha=args.alpha, resamples=args.resamples, seed=args.seed,
                            without_position_0=args.without_position_0, store=store_from(args))
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"jtc leaderboard: {exc}", file=sys.stderr)
        return 1
    return exit_status(result)


if __name__ == "__main__":
    sys.exit(main(prog="python -m jtc_lens.leaderboard.build"))
