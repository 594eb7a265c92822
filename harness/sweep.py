"""Run the jtc tasks over several models in turn with the stock ``lm_eval`` command, resumably."""

from __future__ import annotations

import glob
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import bundled


def resolve_model(name: str) -> str:
    """A bundled name becomes its prepared folder; hub names and folders pass through."""
    return str(bundled.prepare(name)) if name in bundled.MODELS else name


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip("/")).strip("_") or "model"


def finished(model_dir: Path) -> Path | None:
    files = sorted(glob.glob(str(model_dir / "**" / "results_*.json"), recursive=True))
    return Path(files[-1]) if files else None


def lm_eval_command(pretrained: str, tasks: str, output: Path, metadata: dict, extra: list[str]) -> list[str]:
    exe = shutil.which("lm_eval") or str(Path(sys.executable).parent / "lm_eval")
    cmd = [exe, "--model", "hf", "--model_args", f"pretrained={pretrained}", "--tasks", tasks,
           "--output_path", str(output), "--log_samples"]
    if metadata:
        cmd += ["--metadata", json.dumps(metadata)]
    return cmd + [a for a in extra if a != "--"]


def summarise(results_file: Path) -> list[str]:
    data = json.loads(results_file.read_text())
    rows = []
    for task, res in sorted(data["results"].items()):
        if not task.startswith("jtc_"):
            continue
        rows.append(f"  {task:28s} P@1 {res.get('p@1,none', float('nan')):.4f}  KL {res.get('kl,none', float('nan')):.4f} nats"
                    f"  r2 {res.get('r2,none', float('nan')):.4f}")
    return rows


def build_leaderboard(output_path: Path, site: Path) -> int:
    import argparse

    from leaderboard.build import run

    print(f"[jtc sweep] building the leaderboard in {site}", flush=True)
    return run(argparse.Namespace(results=[str(output_path)], output=str(site), alpha=0.05, resamples=2000, seed=0))


def run_sweep(models: list[str], tasks: str, output_path: Path, metadata: dict, extra: list[str],
              site: Path | None = None) -> int:
    if not models:
        print("jtc sweep: no models given", file=sys.stderr)
        return 2
    output_path.mkdir(parents=True, exist_ok=True)
    done = []
    for name in models:
        model_dir = output_path / slug(name)
        previous = finished(model_dir)
        if previous is not None:
            print(f"[jtc sweep] {name}: results exist ({previous}); skipped (delete the folder to rerun)")
            done.append((name, previous))
            continue
        pretrained = resolve_model(name)
        cmd = lm_eval_command(pretrained, tasks, model_dir, metadata, extra)
        print(f"[jtc sweep] {name}: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(cmd)
        if code != 0:
            print(f"[jtc sweep] {name}: lm_eval failed with exit code {code}; finished models are kept", file=sys.stderr)
            return code
        results = finished(model_dir)
        if results is None:
            print(f"[jtc sweep] {name}: lm_eval wrote no results under {model_dir}", file=sys.stderr)
            return 1
        print(f"[jtc sweep] {name}: done in {time.perf_counter() - start:.0f} s")
        done.append((name, results))
    print("[jtc sweep] layer-averaged results (per-layer values and provenance in the results files):")
    for name, results in done:
        print(f"{name}  ({results})")
        for row in summarise(results):
            print(row)
    return build_leaderboard(output_path, site) if site is not None else 0
