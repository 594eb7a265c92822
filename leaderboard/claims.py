"""The paper's qualitative claims, tested on every model of a set of runs (docs/results.md's claims table).

``evaluate`` reads results and their samples files and returns a JSON-ready record: per model and claim, whether
it holds, the paired test that says so, and the runs (with their provenance) it was computed from. ``markdown``
renders that record. The two steps are apart so that the record, small enough to keep in git, can be rendered
again without the per-item samples it was computed from.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jtc_lens.harness.stats import paired_bootstrap_ci, pair_by_id, sign_flip_pvalue
from jtc_lens.harness.store import atomic_write_json

from .comparison_cache import ComparisonStore, add_store_flags, store_from
from .read import SampleCache, TaskRun, load
from .tables import Family, by_size, family, item_contents, models, ordered_distributions

FORMAT = "jtc-claims-1"
EARLY_DEPTH = 0.9  # mat over id is required in the first 90% of depth: the paper's "every layer up to 44" of 48


@dataclass(frozen=True)
class Claim:
    key: str
    title: str
    paper: str  # what the paper reports, in kind
    tested: str  # the test run here, and when the claim counts as holding


CLAIMS = (
    Claim("mat_over_id", "mat reads intermediate layers better than id",
          "GPT-2: mat above id in P@1 by more than 20 points at every layer up to 44 of 48; early layers reach 28-45% under mat",
          "mat − id in P@1 per layer, paired over items (McNemar's exact test), Holm over the model's layers at α = 0.05; "
          "holds if mat is significantly above id at every layer in the first 90% of depth"),
    Claim("transfer", "a Wikipedia-fitted mat loses on news",
          "applying the Wikipedia-fitted map to news costs about 5.5 (GPT-2) and 8 (BERT) points of average P@1",
          "on the same news items, mat fitted on Wikipedia − mat fitted on news, per-item P@1 averaged over layers: mean, "
          "BCa 95% interval and sign-flip p-value; holds if the Wikipedia fit is significantly below"),
    Claim("affine_vs_mat", "an intercept does not hurt (affine vs mat)",
          "none (the paper's mat has no intercept)",
          "affine − mat in KL per layer, paired sign-flip test, Holm over the layers at α = 0.05; holds if no layer has "
          "affine significantly worse (higher KL)"),
    Claim("tuned_vs_mat", "a lens trained on the model's output is at least as good as mat (tuned vs mat)",
          "Belrose et al.: the tuned lens, trained against the model's own output distribution, reads better than the logit lens",
          "tuned − mat in KL per layer, paired sign-flip test, Holm over the layers at α = 0.05; holds if no layer has "
          "tuned significantly worse (higher KL)"),
    Claim("exit", "mat saves more blocks than id in early exit",
          "at 95% P@1 retention mat saves 13.8% of blocks against id's 5.9% (GPT-2), 20% vs 14.6% (BERT)",
          "blocks saved at 95% retention, mat − id on the same items, paired bootstrap 95% interval (from the exit "
          "task); holds if the interval lies above 0"),
)
LAYERED = {"mat_over_id": ("mat", "id", "p@1"), "affine_vs_mat": ("affine", "mat", "kl"), "tuned_vs_mat": ("tuned", "mat", "kl")}


def relative(path: Path, roots: list[str | Path]) -> str:
    """``path`` relative to the parent of the folder given on the command line that holds it: names the run's folder."""
    for root in roots:
        base = Path(root).resolve()
        try:
            return str(path.resolve().relative_to(base.parent))
        except ValueError:
            continue
    return str(path)


def _source(t: TaskRun, roots: list) -> dict:
    """Where a tested value comes from: the results file and what makes its number what it is."""
    prov = t.provenance
    versions = prov.get("versions") or {}
    return {"task": t.task, "results_file": relative(t.results_file, roots),
            "items": t.items, "fit_items": t.fit_items, "fit_on": t.fit_on or (t.distribution if t.projector != "id" else None),
            "corpus_sha256": prov.get("corpus_sha256"), "items_data_sha256": prov.get("items_data_sha256"),
            "seed": prov.get("seed"), "protocol": prov.get("protocol"),
            "jtc_lens_source_sha256": versions.get("jtc-lens source sha256")}


def _layered(fam: Family, key: str, L: int, roots: list) -> dict:
    """A per-layer family's rows and verdict."""
    if fam.error:
        return {"error": fam.error}
    rows = [{"layer": int(r.layer), "a": r.mean_a, "b": r.mean_b, "diff": r.diff, "ci": [r.ci_low, r.ci_high],
             "p_holm": r.p_holm, "significant": r.significant} for r in fam.rows]
    above = [r["layer"] for r in rows if r["significant"] and r["diff"] > 0]
    below = [r["layer"] for r in rows if r["significant"] and r["diff"] < 0]
    if key == "mat_over_id":
        required = [l for l in range(L) if l < EARLY_DEPTH * L]
        holds = all(l in above for l in required)
        figure = {"required_layers": len(required), "missing": [l for l in required if l not in above]}
    else:  # KL: lower is better, so a significant positive difference is the worse side
        holds = not above
        figure = {}
    return {"holds": holds, "test": fam.test, "alpha": fam.alpha, "correction": "holm", "resamples": fam.n_resamples,
            "significantly_above": above, "significantly_below": below, "layers": rows, **figure,
            "sources": [_source(fam.a, roots), _source(fam.b, roots)]}


def _transfer(moved: TaskRun, native: TaskRun, cache: SampleCache, n_resamples: int, seed: int, roots: list) -> dict:
    """Wikipedia-fitted minus news-fitted mat on the same news items, per-item P@1 averaged over layers."""
    try:
        sa, sb = cache.get(moved, ("p@1",)), cache.get(native, ("p@1",))
        ca, cb = item_contents(sa, sb)
        mean_a = np.mean([sa.values["p@1"][l] for l in range(moved.num_layers)], axis=0)
        mean_b = np.mean([sb.values["p@1"][l] for l in range(native.num_layers)], axis=0)
        ids, a, b = pair_by_id(sa.ids, mean_a, sb.ids, mean_b, ca, cb)
        streams = np.random.SeedSequence(seed).spawn(2)
        low, high = paired_bootstrap_ci(a, b, n_resamples=n_resamples, seed=np.random.default_rng(streams[0]))
        p = sign_flip_pvalue(a, b, n_resamples=n_resamples, seed=np.random.default_rng(streams[1]))
    except ValueError as exc:
        return {"error": f"{moved.task} ({moved.samples_file or moved.results_file}) vs {native.task}: {exc}"}
    diff = float(np.mean(a - b))
    return {"holds": high < 0 and p < 0.05, "test": "sign-flip", "alpha": 0.05, "items": len(ids), "resamples": n_resamples,
            "a": float(a.mean()), "b": float(b.mean()), "diff": diff, "ci": [low, high], "p": p,
            "sources": [_source(moved, roots), _source(native, roots)]}


def _exit(m_key: str, loaded, distribution: str, roots: list) -> dict | None:
    run = next((e for e in loaded.exits if e.model_key == m_key and e.projector == "mat" and e.distribution == distribution
                and e.base == "id"), None)
    if run is None or "0.95" not in run.paired:
        return None
    paired = run.paired["0.95"]
    low, high = paired.get("low"), paired.get("high")
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (low, high)):
        return {"error": f"{run.task} ({run.results_file}): no finite interval at 95% retention"}
    base = next((e for e in loaded.exits if e.model_key == m_key and e.projector == "id" and e.distribution == distribution), None)
    prov = run.provenance
    return {"holds": low > 0, "test": "paired bootstrap", "diff": paired.get("difference"), "ci": [low, high],
            "resamples": paired.get("resamples"), "a": run.saved.get("0.95"), "b": base.saved.get("0.95") if base else None,
            "items": run.items,
            "sources": [{"task": run.task, "results_file": relative(run.results_file, roots),
                         "items": run.items, "corpus_sha256": prov.get("corpus_sha256"), "seed": prov.get("seed"),
                         "jtc_lens_source_sha256": (prov.get("versions") or {}).get("jtc-lens source sha256")}]}


def evaluate(paths: list[str | Path], distributions: tuple[str, ...] | None = None, alpha: float = 0.05,
             n_resamples: int = 2000, seed: int = 0, store: ComparisonStore | None = None) -> dict:
    """Every claim on every model with runs under ``paths`` (on ``distributions``, default: every distribution
    evaluated, the paper's two first). Samples or item values must sit beside the results files. ``store``: where
    the per-layer families' test results are kept between runs (None: nowhere)."""
    loaded = load(paths)
    if not loaded.tasks:
        raise ValueError(f"no jtc lens results under {', '.join(map(str, paths))}")
    if distributions is None:
        distributions = tuple(ordered_distributions(t.distribution for t in loaded.tasks))
    cache = SampleCache()
    out_models = []
    for m in by_size(models(loaded.tasks)):
        record = m.record or {}
        entry = {"name": m.name, "key": m.key, "num_layers": m.num_layers, "d_model": m.d_model, "params": m.params_text,
                 "random_init": record.get("random_init"), "weights": record.get("weights"),
                 "weights_sha256": m.tasks[0].provenance.get("model", {}).get("weights_sha256"), "claims": {}}
        for key, (a, b, metric) in LAYERED.items():
            for dist in distributions:
                present = {t.projector: t for t in m.in_distribution(dist)}
                if a in present and b in present:
                    # family() raises the resamples to what Holm needs over the model's layers (resamples_for)
                    fam = family(m.name, present[a], present[b], metric, cache, alpha=alpha, n_resamples=n_resamples,
                                 seed=seed, store=store)
                    entry["claims"].setdefault(key, {})[dist] = {"metric": metric, **_layered(fam, key, m.num_layers, paths)}
        moved = next((t for t in m.tasks if t.projector == "mat" and t.distribution == "news" and t.fit_on == "wikipedia"), None)
        native = next((t for t in m.in_distribution("news") if t.projector == "mat"), None)
        if moved is not None and native is not None:
            entry["claims"]["transfer"] = {"news": {"metric": "p@1", **_transfer(moved, native, cache, n_resamples, seed, paths)}}
        for dist in distributions:
            found = _exit(m.key, loaded, dist, paths)
            if found is not None:
                entry["claims"].setdefault("exit", {})[dist] = {"metric": "saved@95", **found}
        out_models.append(entry)
    return {"format": FORMAT, "alpha": alpha, "seed": seed, "distributions": list(distributions),
            "claims": [c.__dict__ for c in CLAIMS], "models": out_models}


def _cell(claim_key: str, result: dict | None, L: int) -> str:
    if result is None:
        return "not run"
    if "error" in result:
        return "error: " + result["error"][:120]
    verdict = "**holds**" if result["holds"] else "**fails**"
    if claim_key in LAYERED:
        above, below = len(result["significantly_above"]), len(result["significantly_below"])
        if claim_key == "mat_over_id":
            diffs = [r["diff"] for r in result["layers"] if r["layer"] < EARLY_DEPTH * L]
            missing = result.get("missing") or []
            where = f"; not at {_layer_list(missing)}" if missing else ""
            return (f"{verdict}: above at {above}/{L} layers{where}; {100 * min(diffs):+.1f} to {100 * max(diffs):+.1f} "
                    f"points in the first 90%")
        return f"{verdict}: KL lower at {below}/{L} layers, higher at {above}/{L}"
    if claim_key == "transfer":
        low, high = result["ci"]
        return f"{verdict}: {100 * result['diff']:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}], p = {result['p']:.2g}"
    low, high = result["ci"]
    return (f"{verdict}: {100 * result['diff']:+.1f} points of blocks [{100 * low:+.1f}, {100 * high:+.1f}] "
            f"(mat {100 * result['a']:.1f}%, id {100 * result['b']:.1f}%)" if result.get("b") is not None else
            f"{verdict}: {100 * result['diff']:+.1f} points of blocks [{100 * low:+.1f}, {100 * high:+.1f}]")


def _layer_list(layers: list[int]) -> str:
    text = ", ".join(str(l) for l in layers[:6])
    return f"layer{'s' if len(layers) > 1 else ''} {text}{', …' if len(layers) > 6 else ''}"


def markdown(record: dict) -> str:
    """The claims table: a row per claim and distribution, a column per model (by size, random controls last)."""
    if record.get("format") != FORMAT:
        raise ValueError(f"not a claims record ({FORMAT}): format {record.get('format')!r}")
    ms = record["models"]
    header = "| claim | distribution | " + " | ".join(
        f"{m['name']}{' (random weights, seed ' + str(m['random_init'].get('seed')) + ')' if m.get('random_init') else ''}"
        for m in ms) + " |"
    out = [header, "|---|---|" + "---|" * len(ms)]
    for c in record["claims"]:
        dists = sorted({d for m in ms for d in m["claims"].get(c["key"], {})},
                       key=lambda d: record["distributions"].index(d) if d in record["distributions"] else 99)
        for dist in dists:
            cells = [_cell(c["key"], m["claims"].get(c["key"], {}).get(dist), m["num_layers"]) for m in ms]
            out.append(f"| {c['title']} | {dist} | " + " | ".join(cells) + " |")
    out.append("")
    for c in record["claims"]:
        out.append(f"- **{c['title']}.** Paper: {c['paper']}. Tested: {c['tested']}.")
    return "\n".join(out) + "\n"


def parser(prog: str = "jtc claims") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Test the paper's claims per model from the runs' samples; "
                                "write the record (JSON) and print its table.")
    p.add_argument("results", nargs="+", help="folders of results_*.json with their samples_*.jsonl "
                   "(or the item values jtc item-values keeps of them)")
    p.add_argument("--output", required=True, help="the claims record to write (JSON)")
    p.add_argument("--distributions", help="comma-separated (default: every distribution in the results, "
                   "Wikipedia and news first)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling tests")
    p.add_argument("--resamples", type=int, default=2000)
    add_store_flags(p)
    return p


def main(argv: list[str] | None = None, prog: str = "jtc claims") -> int:
    """``jtc claims ...`` (harness.cli hands its arguments here) or ``python -m jtc_lens.leaderboard.claims ...``.
    Exit status 1 if any claim could not be tested (its reason is printed and kept in the record)."""
    args = parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    try:
        store = store_from(args)
        record = evaluate(args.results, distributions=tuple(args.distributions.split(",")) if args.distributions else None,
                          seed=args.seed, n_resamples=args.resamples, store=store)
        print(f"{prog}: {store.summary()}", file=sys.stderr)
        atomic_write_json(Path(args.output), record)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    print(markdown(record))
    errors = [f"{m['name']} {key} {dist}: {res['error']}" for m in record["models"] for key, by in m["claims"].items()
              for dist, res in by.items() if "error" in res]
    for e in errors:
        print(f"{prog}: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m jtc_lens.leaderboard.claims"))
