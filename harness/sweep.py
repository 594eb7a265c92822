"""Run the jtc tasks over several models in turn with the stock ``lm_eval`` command, resumably.

A finished model leaves ``jtc_sweep.json`` beside its results, naming every request it finished there (a
later run with other tasks into the same folder adds one, it does not forget the first); a rerun of a
finished request skips it. An interrupted model left no record of that request and is run again (its
fitted projectors come from the cache, so only the scoring is redone). With ``--processes N`` each model runs under
``accelerate launch`` with N data-parallel processes.
"""

from __future__ import annotations

import glob
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import bundled
from .store import atomic_write_json


def resolve_model(name: str) -> str:
    """A bundled name becomes its prepared folder; hub names and folders pass through."""
    return str(bundled.prepare(name)) if bundled.is_bundled(name) else name


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else with a path separator, or a leading ``.``, ``~`` or
    ``/``, can only be a folder."""
    return name.startswith((".", "~", "/")) or name.endswith("/") or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def model_problem(name: str) -> str | None:
    """Why ``name`` cannot be loaded, found before anything runs (lm-eval would say only "Repo id must be ..."),
    or None: a bundled name, a model folder, or a hub name (in the local cache when offline)."""
    if name in bundled.MODELS:
        return None
    try:
        if bundled.random_control(name) is not None:
            return None
    except ValueError as exc:
        return str(exc)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return None if (folder / "config.json").is_file() else f"{name}: the folder has no config.json (not a Hugging Face model folder)"
    if folder.exists():
        return f"{name}: a file, not a model folder"
    known = ", ".join(sorted(bundled.MODELS))
    if _looks_like_path(name):
        return f"{name}: no such model folder (and not a bundled model: {known})"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            return (f"{name}: not a folder, not a bundled model ({known}), and not in the local Hugging Face cache; "
                    "hub access is off (HF_HUB_OFFLINE=1): download it first or unset HF_HUB_OFFLINE")
    return None


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip("/")).strip("_") or "model"


RECORD = "jtc_sweep.json"  # beside a model's results: each request that finished there, oldest first


def results_files(model_dir: Path) -> set[str]:
    return set(glob.glob(str(model_dir / "**" / "results_*.json"), recursive=True))


def read_runs(model_dir: Path) -> list[dict]:
    """The finished runs recorded in ``model_dir``; a record of one run (the older layout) reads as a list of one.
    Raises ValueError for a record that is not one of the two layouts."""
    record = json.loads((model_dir / RECORD).read_text("utf-8"))
    runs = record.get("runs") if isinstance(record, dict) and "runs" in record else [record]
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("request"), dict) for r in runs):
        raise ValueError("neither a list of runs nor one run")
    return runs


def finished_run(model_dir: Path, request: dict) -> tuple[Path | None, str]:
    """The results of an earlier run of exactly ``request``, or None and the reason to run again."""
    if not (model_dir / RECORD).is_file():
        return None, "no finished run"
    try:
        runs = read_runs(model_dir)
    except ValueError as exc:
        return None, f"unreadable {RECORD} ({exc})"
    same = [r for r in runs if r["request"] == request]
    if not same:
        last = runs[-1]["request"] if runs else {}
        changed = sorted(k for k in set(request) | set(last) if request.get(k) != last.get(k))
        return None, "the finished run was asked for something else (" + ", ".join(changed) + ")"
    results = model_dir / same[-1].get("results", "")
    if not results.is_file():
        return None, f"its results file {results} is gone"
    return results, "finished"


def record_run(model_dir: Path, run: dict) -> None:
    """Add a finished run to the folder's record, in place of an earlier run of the same request."""
    try:
        runs = read_runs(model_dir) if (model_dir / RECORD).is_file() else []
    except ValueError as exc:
        print(f"[jtc sweep] {model_dir / RECORD} is unreadable ({exc}); it is replaced by this run's record", file=sys.stderr)
        runs = []
    runs = [r for r in runs if r["request"] != run["request"]] + [run]
    atomic_write_json(model_dir / RECORD, {"runs": runs})


def launcher(processes: int) -> tuple[list[str], dict]:
    """How lm_eval is started: in this process's interpreter, or by accelerate with N data-parallel processes."""
    # the interpreter of this process, never a script found on PATH: the run scores with the jtc-lens that started it
    if processes <= 1:
        return [sys.executable, "-m", "lm_eval"], {}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lm_eval"]
    import torch

    # without GPUs, accelerate starts CPU processes (gloo) only when told to use the CPU
    return cmd, ({} if torch.cuda.is_available() else {"ACCELERATE_USE_CPU": "1"})


def lm_eval_command(pretrained: str, tasks: str, output: Path, metadata: dict, extra: list[str],
                    model_args: str = "", processes: int = 1) -> tuple[list[str], dict]:
    cmd, env = launcher(processes)
    args = f"pretrained={pretrained}" + (f",{model_args}" if model_args else "")
    cmd = cmd + ["--model", "hf", "--model_args", args, "--tasks", tasks, "--output_path", str(output), "--log_samples"]
    if metadata:
        cmd += ["--metadata", json.dumps(metadata)]
    return cmd + [a for a in extra if a != "--"], env


def layer_median(res: dict, metric: str) -> float:
    """The median over layers of a per-layer metric (``metric.L0,none`` ...); NaN when the results hold none."""
    values = [v for k, v in res.items() if re.fullmatch(re.escape(metric) + r"\.L\d+,none", k) and isinstance(v, (int, float))]
    return statistics.median(values) if values else float("nan")


def summarise(results_file: Path) -> list[str]:
    """One line per jtc task: P@1 and KL averaged over layers; r^2 as its median over layers, since one layer's
    coordinate-averaged r^2 can be in the thousands below zero while the others lie in [0, 1]."""
    data = json.loads(results_file.read_text())
    rows = []
    for task, res in sorted(data["results"].items()):
        if not task.startswith(("jtc_", "custom_jtc_")):
            continue
        if "mat_p@1.L0,none" in res:  # a sub-module task: P@1 at the first and middle start layers
            starts = sorted(int(m[1]) for m in (re.fullmatch(r"p@1\.L(\d+),none", k) for k in res) if m)
            cells = [f"from L{l}: linear {res[f'p@1.L{l},none']:.3f} removed {res[f'removed_p@1.L{l},none']:.3f} "
                     f"mat {res[f'mat_p@1.L{l},none']:.3f}" for l in (starts[0], starts[len(starts) // 2])]
            rows.append(f"  {task:28s} P@1 " + "; ".join(cells))
            continue
        if "xent.none,none" in res:  # a layer-intervention task: P@1 vs the model, widest and narrowest span
            found = [m for m in (re.fullmatch(r"p@1\.(\w+)\.S(\d+),none", k) for k in res) if m]
            spans, kinds = sorted({int(m[2]) for m in found}), sorted({m[1] for m in found})
            cells = [f"S{s}: " + " ".join(f"{k} {res[f'p@1.{k}.S{s},none']:.3f}" for k in kinds) for s in (spans[0], spans[-1])]
            rows.append(f"  {task:28s} P@1 vs the model; " + "; ".join(cells))
            continue
        if "saved@95,none" in res:  # an early-exit task
            diff = (f"  vs its base {res['saved_diff@95,none']:+.4f} [{res['saved_diff@95_lo,none']:+.4f}, "
                    f"{res['saved_diff@95_hi,none']:+.4f}]" if "saved_diff@95,none" in res else "")
            rows.append(f"  {task:28s} blocks saved at 99/95/90% retention {res['saved@99,none']:.4f} / "
                        f"{res['saved@95,none']:.4f} / {res['saved@90,none']:.4f}{diff}")
            continue
        rows.append(f"  {task:28s} P@1 {res.get('p@1,none', float('nan')):.4f}  KL {res.get('kl,none', float('nan')):.4f} nats"
                    f"  r2 median {layer_median(res, 'r2'):.4f}  r2w median {layer_median(res, 'r2w'):.4f}")
    provs = [c.get("metadata", {}).get("provenance") or {} for c in data.get("configs", {}).values()]
    peaks = [m.get("host_rss_mib", 0) for p in provs for m in p.get("peak_memory", [])]
    seconds = max((p.get("run_seconds", 0) for p in provs), default=0)
    if peaks:
        processes = max(p.get("processes", 1) for p in provs)
        rows.append(f"  scoring and fitting {seconds:.1f} s on {processes} process(es); peak memory {max(peaks):,.0f} MiB per process")
    return rows


def build_leaderboard(output_path: Path, site: Path) -> int:
    # the analysis side, imported only here at the end of a sweep; it never imports the sweep
    from ..leaderboard.build import ComparisonStore, build_site, exit_status

    print(f"[jtc sweep] building the leaderboard in {site}", flush=True)
    return exit_status(build_site([output_path], site, store=ComparisonStore.default()))


def run_sweep(models: list[str], tasks: str, output_path: Path, metadata: dict, extra: list[str],
              site: Path | None = None, model_args: str = "", processes: int = 1) -> int:
    """Each model in turn; a model whose finished run asked for the same thing is not run again."""
    if not models:
        print("jtc sweep: no models given", file=sys.stderr)
        return 2
    if processes < 1:
        print("jtc sweep: --processes must be at least 1", file=sys.stderr)
        return 2
    problems = [p for p in map(model_problem, models) if p]
    if problems:
        for problem in problems:
            print(f"jtc sweep: {problem}", file=sys.stderr)
        return 2
    output_path.mkdir(parents=True, exist_ok=True)
    done = []
    for i, name in enumerate(models, 1):
        model_dir = output_path / slug(name)
        # what makes two runs the same: not the launcher, since results do not depend on the process count
        request = {"model": name, "tasks": tasks, "metadata": metadata, "model_args": model_args,
                   "lm_eval_args": [a for a in extra if a != "--"]}
        previous, why = finished_run(model_dir, request)
        if previous is not None:
            print(f"[jtc sweep] {i}/{len(models)} {name}: finished earlier ({previous}); skipped (delete {model_dir} to rerun)")
            done.append((name, previous))
            continue
        pretrained = resolve_model(name)
        before = results_files(model_dir)
        cmd, env = lm_eval_command(pretrained, tasks, model_dir, metadata, extra, model_args, processes)
        print(f"[jtc sweep] {i}/{len(models)} {name} ({why}): {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(cmd, env={**os.environ, **env})
        if code != 0:
            print(f"[jtc sweep] {name}: lm_eval failed with exit code {code}; finished models are kept, "
                  "and a rerun of the same command resumes from this model", file=sys.stderr)
            return code
        new = sorted(results_files(model_dir) - before)
        if not new:
            print(f"[jtc sweep] {name}: lm_eval wrote no results under {model_dir}", file=sys.stderr)
            return 1
        results = Path(new[-1])
        record_run(model_dir, {"request": request, "results": str(results.relative_to(model_dir)),
                               "seconds": round(time.perf_counter() - start, 1), "processes": processes})
        print(f"[jtc sweep] {name}: done in {time.perf_counter() - start:.0f} s")
        done.append((name, results))
    print("[jtc sweep] P@1 and KL averaged over layers; r2 (coordinate-averaged) and r2w (variance-weighted) as medians over "
          "layers; per-layer values and provenance in the results files:")
    for name, results in done:
        print(f"{name}  ({results})")
        for row in summarise(results):
            print(row)
    return build_leaderboard(output_path, site) if site is not None else 0
