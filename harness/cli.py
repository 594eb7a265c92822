"""The ``jtc`` command: bundled models and corpora (evaluation itself runs through ``lm_eval``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import options

# the options of a tuned lens that `jtc tuned export` trains
TUNED_EXPORT_OPTIONS = ("recipe", "warm_start", "n_fit", "token_budget", "tokens_per_step", "tuned_chunk_len",
                        "warm_fit_tokens", "tuned_loss", "stop_at", "seed")


def _models(args) -> int:
    from . import bundled

    if args.action == "list":
        for name, model in sorted(bundled.MODELS.items()):
            state = "prepared" if bundled.is_prepared(name) else "not prepared"
            print(f"{name:22s} {model.hf_name:38s} {model.quantisation:7s} {state}")
        print("Random-weights control of any of them (its architecture and tokenizer, seeded random weights): "
              "<name>:random or <name>:random:SEED, e.g. jtc models prepare smollm2-135m:random")
        return 0
    if not args.name:
        print(f"jtc models {args.action}: a model name is required", file=sys.stderr)
        return 2
    if args.action == "prepare":
        print(bundled.prepare(args.name, force=args.force))
        return 0
    # path: prepare on first use so that $(jtc models path NAME) always names a usable folder
    print(bundled.prepare(args.name))
    return 0


def _corpora(args) -> int:
    from .corpora import catalog, names

    selected = args.names or names()
    if args.action == "verify":
        results = [catalog.verify(n) for n in selected]
        for ok, message in results:
            print(("ok   " if ok else "FAIL ") + message)
        return 0 if all(ok for ok, _ in results) else 1
    if args.action == "pin":
        catalog.pin(selected)
        print(f"pinned {', '.join(selected)} in {catalog.MANIFEST}")
        return 0
    tokenizer = None
    if args.action == "list" and args.tokens:
        from transformers import AutoTokenizer

        from . import bundled

        tokenizer = AutoTokenizer.from_pretrained(bundled.prepare("smollm2-135m"))
    from .corpora import MissingSourceError

    rows, missing = [], []
    for name in selected:
        try:
            row = catalog.describe(name, tokenizer)
        except MissingSourceError as exc:  # one missing package must not hide the others
            missing.append(name)
            rows.append({"name": name, "missing": str(exc)})
            if not args.markdown:
                print(f"{name:10s} MISSING  {exc}")
            continue
        rows.append(row)
        if not args.markdown:
            tokens = f" {row['tokens']:>10,} tokens" if "tokens" in row else ""
            print(f"{name:10s} {row['documents']:6,} docs {row['words']:>10,} words{tokens}  "
                  f"sentences {row['sentences_train']:,}/{row['sentences_validation']:,}/{row['sentences_test']:,}  "
                  f"sha256 {row['sources_sha256'][:16]}  {row['description']}")
    if args.markdown:
        print(catalog.markdown_table(rows))
    if missing:
        print(f"jtc corpora list: {len(missing)} of {len(selected)} distribution(s) not installed: {', '.join(missing)}",
              file=sys.stderr)
    return 1 if missing else 0


def _table(args) -> int:
    from .report import compare_table, exit_table, intervention_table, layer_table, results_files, submodule_table

    a, _, b = args.compare.partition(",")
    make = {"compare": lambda p: compare_table(p, a, b, args.metric), "exit": exit_table,
            "submodule": lambda p: submodule_table(p, args.distribution), "layers": lambda p: layer_table(p, args.metric),
            "interventions": intervention_table}
    shown = 0
    for path in results_files(args.results):
        try:
            table = make[args.kind](path)
        except ValueError as exc:  # a results file of other tasks
            print(f"jtc table: {exc}; skipped", file=sys.stderr)
            continue
        print(f"<!-- {path} -->")
        print(table)
        shown += 1
    return 0 if shown else 1


def _sweep(args) -> int:
    from .sweep import run_sweep

    from .options import NAMES, OptionError, check_known

    try:
        metadata = json.loads(args.metadata) if args.metadata else {}
    except ValueError as exc:
        print(f"jtc sweep: --metadata is not JSON ({exc})", file=sys.stderr)
        return 2
    for key in NAMES:
        value = getattr(args, key)
        if value is not None:
            metadata[key] = value
    try:
        check_known(metadata, where="jtc sweep --metadata")
    except OptionError as exc:
        print(f"jtc sweep: {exc}", file=sys.stderr)
        return 2
    model_args = args.model_args or ""
    if metadata.get("jtc_layers") is not None:
        # an argument of the model (it changes how the model runs), which then reaches every task's options too
        model_args = ",".join(a for a in (model_args, f"jtc_layers={metadata.pop('jtc_layers')}") if a)
    return run_sweep(
        models=[m for m in args.models.split(",") if m],
        tasks=args.tasks,
        output_path=Path(args.output_path),
        metadata=metadata,
        extra=args.lm_eval_args,
        site=None if args.no_leaderboard else Path(args.site or Path(args.output_path) / "leaderboard"),
        model_args=model_args,
        processes=args.processes,
    )


def _tuned(args) -> int:
    """Train (or take from the cache) a tuned lens and write it in the tuned-lens package's format."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import bundled
    from .fitting import FitSpec, TunedSpec, get_tuned
    from .protocols import ProtocolConfig
    from .models import build_lens_model
    from .projectors.tuned import export_tuned_lens
    from .tuned_training import TunedRecipe

    folder = str(bundled.prepare(args.model)) if bundled.is_bundled(args.model) else args.model
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    lens = build_lens_model(model, AutoTokenizer.from_pretrained(folder))
    recipe = TunedRecipe(args.recipe, token_budget=args.token_budget, chunk_len=args.tuned_chunk_len,
                         tokens_per_step=args.tokens_per_step, warm_fit_tokens=args.warm_fit_tokens, seed=args.seed,
                         loss=args.tuned_loss, stop_at=args.stop_at, warm_start=args.warm_start)
    # warm_start=affine: the affine projector a run with these options fits (paper protocol, n_fit items)
    start = FitSpec(args.fit_on, ProtocolConfig(seed=args.seed), args.n_fit) if recipe.warm_start == "affine" else None
    projector, info = get_tuned(lens, TunedSpec(args.fit_on, recipe, start=start))
    export_tuned_lens(projector, Path(args.out), args.model, lens.unembed.weight)
    print(f"{args.out}: tuned lens ({recipe.name}, {info.get('tokens_spent')} tokens, cache {info.get('cache')})")
    return 0


def _claims(args) -> int:
    # the analysis side defines its own options (shared with jtc leaderboard); it is imported only for this command
    from ..leaderboard.claims import main as claims_main

    return claims_main(args.argv)


def _item_values(args) -> int:
    """Beside every samples file of lens tasks, the per-item values the paired tests read (for keeping in git)."""
    from ..leaderboard import read

    written = read.write_item_values(args.results)
    print(f"jtc item-values: {len(written)} file(s) written")
    return 0 if written else 1


def _results_page(args) -> int:
    from ..leaderboard import results_page

    return results_page.main(args.results, args.claims, args.update, args.section)


def _leaderboard(args) -> int:
    # the analysis side defines its own options; it is imported only for this command
    from ..leaderboard.build import main as leaderboard_main

    return leaderboard_main(args.argv)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="jtc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="bundled models: list, prepare NAME, path NAME")
    models.add_argument("action", choices=["list", "prepare", "path"])
    models.add_argument("name", nargs="?")
    models.add_argument("--force", action="store_true", help="convert again even if a prepared folder exists")
    models.set_defaults(func=_models)
    corpora = sub.add_parser("corpora", help="text distributions: list, prepare (clean and cache), verify hashes")
    corpora.add_argument("action", choices=["list", "prepare", "verify", "pin"])
    corpora.add_argument("names", nargs="*", help="distributions (default: all registered)")
    corpora.add_argument("--tokens", action="store_true", help="list: also count SmolLM2 tokens")
    corpora.add_argument("--markdown", action="store_true", help="list: a Markdown table (docs/data.md)")
    corpora.set_defaults(func=_corpora)
    table = sub.add_parser("table", help="per-layer Markdown table of a metric from lm-eval results")
    table.add_argument("results", nargs="+", help="results_*.json files or folders holding them")
    table.add_argument("--metric", default="p@1")
    table.add_argument("--kind", default="layers", choices=("layers", "compare", "exit", "submodule", "interventions"),
                       help="layers: a metric per layer and projector; compare: one projector minus another per layer "
                            "and distribution (--compare A,B); exit: blocks saved by early exit; submodule: P@1 of "
                            "the sub-module shortcuts per start layer; interventions: the layer interventions' scores "
                            "and the paired tests of the paper's claims")
    table.add_argument("--compare", default="tuned,affine", help="compare: the two projectors, A,B (A − B)")
    table.add_argument("--distribution", default=None, help="submodule: the distribution of the per-layer table")
    table.set_defaults(func=_table)
    sweep = sub.add_parser("sweep", help="run lm_eval over several models in turn (resumable) and summarise")
    sweep.add_argument("--models", required=True, help="comma-separated bundled names, hub names or local folders")
    sweep.add_argument("--tasks", default="jtc_*")
    sweep.add_argument("--output_path", required=True)
    sweep.add_argument("--metadata", help="JSON task options passed to lm_eval --metadata")
    # every jtc option as a flag (--n-eval, --n-fit, ...): one schema, harness/options.py
    options.add_flags(sweep, options.NAMES)
    sweep.add_argument("--model-args", dest="model_args", help="more lm_eval --model_args for every model, e.g. dtype=bfloat16")
    sweep.add_argument("--processes", type=int, default=1,
                       help="data-parallel processes per model (accelerate launch; GPUs if present, else CPU processes)")
    sweep.add_argument("--site", help="leaderboard folder (default OUTPUT_PATH/leaderboard)")
    sweep.add_argument("--no-leaderboard", action="store_true", help="do not build the leaderboard at the end")
    sweep.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="after --: further lm_eval arguments")
    sweep.set_defaults(func=_sweep)
    tuned = sub.add_parser("tuned", help="export a tuned lens (trained, or from the cache) in the tuned-lens package's format")
    tuned.add_argument("action", choices=["export"])
    tuned.add_argument("--model", required=True, help="bundled name, hub name or local folder")
    tuned.add_argument("--fit-on", dest="fit_on", default="wikipedia")
    tuned.add_argument("--out", required=True, help="folder for config.json and params.pt")
    options.add_flags(tuned, TUNED_EXPORT_OPTIONS, typed=True)
    tuned.set_defaults(func=_tuned)
    claims = sub.add_parser("claims", help="test the paper's claims per model from the runs' samples; write the record "
                            "(JSON); jtc claims --help for its options", add_help=False, prefix_chars="\0")
    claims.add_argument("argv", nargs=argparse.REMAINDER)  # every argument goes to leaderboard.claims
    claims.set_defaults(func=_claims)
    values = sub.add_parser("item-values", help="beside each samples_*.jsonl of lens tasks, the per-item P@1, surprisal "
                            "and KL the paired tests read, losslessly (safetensors, small enough for git); the "
                            "leaderboard and jtc claims read them where the samples are absent")
    values.add_argument("results", nargs="+", help="folders of results_*.json with their samples_*.jsonl")
    values.set_defaults(func=_item_values)
    page = sub.add_parser("results-page", help="the results section across models (summary, claims, per-layer tables) "
                          "from results files and a claims record")
    page.add_argument("results", nargs="+", help="folders of results_*.json (samples not needed)")
    page.add_argument("--claims", help="the record written by jtc claims (the results section)")
    page.add_argument("--section", default="results", choices=("results", "cost"),
                      help="results: summary, claims and per-layer tables; cost: run time and peak memory per run")
    page.add_argument("--update", help="replace the generated section of this Markdown file instead of printing it")
    page.set_defaults(func=_results_page)
    leaderboard = sub.add_parser("leaderboard", help="static HTML leaderboard (rankings, charts, paired tests) from lm-eval results; "
                                 "jtc leaderboard --help for its options", add_help=False, prefix_chars="\0")
    leaderboard.add_argument("argv", nargs=argparse.REMAINDER)  # every argument goes to leaderboard.build
    leaderboard.set_defaults(func=_leaderboard)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"jtc: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
