"""Finding, validating and loading lm-eval output folders (``results_*.json`` and their ``samples_*.jsonl``).

Every problem is reported as a warning that names the file (and task) it comes from; a bad file or
task is left out and the rest still loads, so one broken run never hides the others.
"""

from __future__ import annotations

import datetime as _dt
import glob
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..harness.options import FITTED
from . import item_values

# Metrics the site reads per layer; the first four are required (ranked, charted or tested).
REQUIRED_METRICS = ("p@1", "surprisal", "kl", "r2")
OPTIONAL_METRICS = ("p@5", "p@10", "xent", "entropy", "r2w")
ALL_METRICS = ("p@1", "p@5", "p@10", "surprisal", "kl", "xent", "entropy", "r2", "r2w")  # display order
# Per layer only: a layer mean of r^2 is dominated by its worst layer (runs of older versions recorded one; it is not read).
NO_LAYER_MEAN = ("r2", "r2w")
NATS = ("surprisal", "kl", "xent", "entropy")  # natural-log metrics, shown in bits

_TASK = re.compile(r"^(?:custom_)?jtc_(?P<projector>[A-Za-z0-9]+)(?:_(?P<distribution>.+))?$")
_PAIRWISE = re.compile(r"^r2\.L(?P<src>\d+)\.L(?P<dst>\d+),none$")
_STAMP = re.compile(r"^results_(?P<stamp>.+)\.json$")


@dataclass
class Problem:
    """A problem with one file: shown on the index and printed to stderr."""

    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


@dataclass
class TaskRun:
    """One task of one results file: a projector scored at every layer of one model on one distribution."""

    task: str
    projector: str
    distribution: str
    fit_on: str | None  # the fit distribution of a fitted projector, None for an unfitted one (id)
    model_key: str
    model_name: str  # the name as recorded
    num_layers: int
    d_model: int | None
    vocab_size: int | None
    n_params: int | None
    params_estimated: bool
    items: int
    means: dict[str, float]
    mean_stderr: dict[str, float | None]
    layers: dict[str, list[float]]
    stderr: dict[str, list[float | None]]
    pairwise_r2: dict[tuple[int, int], float]
    without_position_0: dict | None  # {"items": n, "layers": {metric: per-layer means}} over items not scored at position 0
    provenance: dict
    results_file: Path
    samples_file: Path | None
    date: float  # sort key for "newest"
    date_text: str
    run_id: str
    lm_eval_version: str | None
    superseded_by: TaskRun | None = None
    values_file: Path | None = None  # the per-item values of the paired tests, kept without the samples (item_values)

    @property
    def transfer(self) -> bool:
        return self.fit_on is not None and self.fit_on != self.distribution

    @property
    def anchor(self) -> str:
        return f"{self.run_id}-{_slug(self.task)}"

    @property
    def fit_items(self) -> int | None:
        pconf = self.provenance.get("projector_config")
        return (pconf.get("fit_items") or pconf.get("n_fit")) if isinstance(pconf, dict) else None

    @property
    def position_0_ids(self) -> set[str] | None:
        """Items scored at position 0, when the run recorded them (None: unknown)."""
        ids = self.provenance.get("items_at_position_0_ids")
        if isinstance(ids, list):
            return {str(i) for i in ids}
        return set() if self.provenance.get("items_at_position_0") == 0 else None

    @property
    def skipped_ids(self) -> set[str]:
        """Items the run listed as not scored (too short, ...): their samples carry no metric values."""
        recorded = self.provenance.get("items_skipped")
        if not isinstance(recorded, dict):
            return set()
        return {str(i) for ids in recorded.values() if isinstance(ids, list) for i in ids}

    @property
    def fit_label(self) -> str:
        """Projector name with its fit distribution whenever it has one (for views that mix fits)."""
        return f"{self.projector} (fit on {self.fit_on})" if self.fit_on else self.projector

    @property
    def label(self) -> str:
        """Projector name, with its fit distribution when that is not the evaluated one."""
        return f"{self.projector} (fit on {self.fit_on})" if self.transfer else self.projector


@dataclass
class ExitRun:
    """One early-exit task of one results file: a projector's exit curve on one distribution, and its paired
    difference with its base projector (both from the task's provenance and headline metrics)."""

    task: str
    projector: str
    distribution: str
    model_key: str
    num_layers: int
    items: int
    saved: dict[str, float]  # retention ("0.95") -> fraction of blocks saved
    curve: dict  # lambdas, fraction_used, accuracy
    base: str | None
    base_curve: dict | None
    paired: dict  # retention -> {difference, low, high, resamples, seed}
    mean_input_length: float | None
    provenance: dict
    results_file: Path
    date: float

    @property
    def anchor(self) -> str:
        return _slug(f"{self.results_file.parent.name}-{self.task}")


@dataclass
class SubmoduleRun:
    """One sub-module task of one results file: per start layer, P@1 / surprisal / KL of the model with the part
    replaced by its linear map, with the part removed, and of mat jumping from the start layer."""

    task: str
    part: str
    distribution: str
    model_key: str
    num_layers: int
    items: int
    starts: list[int]
    values: dict[str, dict[str, list[float]]]  # mode ("linear", "removed", "mat") -> metric -> per start layer
    provenance: dict
    results_file: Path
    date: float


@dataclass
class LayersRun:
    """One layer-intervention task of one results file: per intervention kind and start s of the middle span
    [s, L-1-s], P@1 / KL against the unmodified model and cross-entropy, the normalised score and the paired tests
    (from the task's headline metrics and its provenance)."""

    task: str
    distribution: str
    model_key: str
    num_layers: int
    items: int
    kinds: list[str]
    starts: list[int]
    values: dict[str, dict[str, list[float]]]  # kind -> metric (p@1, kl, xent) -> per start
    xent_unmodified: float
    summary: dict  # provenance.layers.summary: scores, tests against the unmodified model, the claims' tests
    provenance: dict
    results_file: Path
    date: float

    @property
    def layers_altered(self) -> list[int]:
        return [self.num_layers - 2 * s for s in self.starts]

    def score(self, kind: str, start: int) -> float | None:
        """0: a uniform prediction's cross-entropy (log V), 1: the unmodified model's; None where it diverged."""
        return self.summary["by_kind"][kind][str(start)].get("score")


@dataclass
class Run:
    """One results file."""

    results_file: Path
    run_id: str
    date: float
    date_text: str
    model_name: str | None
    lm_eval_version: str | None
    tasks: list[TaskRun] = field(default_factory=list)
    exits: list[ExitRun] = field(default_factory=list)
    submodules: list[SubmoduleRun] = field(default_factory=list)
    layers: list[LayersRun] = field(default_factory=list)


@dataclass
class Loaded:
    runs: list[Run]
    tasks: list[TaskRun]  # the newest run of every (model, projector, distribution, fit distribution)
    superseded: list[TaskRun]
    warnings: list[Problem]
    exits: list[ExitRun] = field(default_factory=list)  # the newest of every (model, projector, distribution)
    submodules: list[SubmoduleRun] = field(default_factory=list)  # the newest of every (model, part, distribution)
    layers: list[LayersRun] = field(default_factory=list)  # the newest of every (model, distribution)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def results_files(paths: list[str | Path]) -> tuple[list[Path], list[Problem]]:
    """Every ``results_*.json`` under the given folders (or the files themselves), each once."""
    found: dict[Path, None] = {}
    warnings = []
    for p in paths:
        path = Path(p)
        if path.is_file():
            found[path.resolve()] = None
        elif path.is_dir():
            hits = sorted(glob.glob(str(path / "**" / "results_*.json"), recursive=True))
            if not hits:
                warnings.append(Problem(str(path), "no results_*.json below this folder"))
            for h in hits:
                found[Path(h).resolve()] = None  # a folder given twice (or nested) counts once
        else:
            warnings.append(Problem(str(path), "no such file or folder"))
    return list(found), warnings


def _finite(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} is {value!r}, not a finite number")
    return float(value)


def _maybe_number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _parse_date(text) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        moment = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.timestamp()


def _model_key(model: dict) -> str:
    if isinstance(model.get("id"), str) and model["id"]:
        return _slug(model["id"])
    # no recorded id: name and shape are the best identity available
    raw = json.dumps([model.get("name"), model.get("num_layers"), model.get("d_model")], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _estimate_params(num_layers: int, d_model: int | None, vocab: int | None) -> int | None:
    # about 12 d^2 per block (attention 4 d^2, MLP 8 d^2) plus one embedding matrix
    if not d_model:
        return None
    return 12 * num_layers * d_model * d_model + (vocab or 0) * d_model


def _task(task: str, res: dict, config: dict, data: dict, path: Path, run: Run) -> TaskRun:
    if not isinstance(res, dict):
        raise ValueError("its results entry is not an object")
    meta = config.get("metadata") if isinstance(config, dict) else None
    prov = meta.get("provenance") if isinstance(meta, dict) else None
    if not isinstance(prov, dict):
        raise ValueError("configs.<task>.metadata.provenance is missing (not a jtc-lens run, or an incomplete one)")
    model = prov.get("model")
    if not isinstance(model, dict):
        raise ValueError("provenance.model is missing")
    L = model.get("num_layers")
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ValueError(f"provenance.model.num_layers is {L!r}, not a positive integer")
    m = _TASK.match(task)
    projector = meta.get("projector") or (m["projector"] if m else None)
    distribution = prov.get("distribution") or meta.get("distribution") or (m["distribution"] if m else None)
    if not projector or not distribution:
        raise ValueError("cannot tell the projector and distribution (neither metadata nor the task name give them)")
    pconf = prov.get("projector_config") if isinstance(prov.get("projector_config"), dict) else {}
    fit_on = pconf.get("fit_on") or (meta.get("fit_on") if projector in FITTED else None)

    missing: list[str] = []
    layers: dict[str, list[float]] = {}
    stderr: dict[str, list[float | None]] = {}
    means: dict[str, float] = {}
    mean_stderr: dict[str, float | None] = {}
    for metric in REQUIRED_METRICS + OPTIONAL_METRICS:
        keys = [f"{metric}.L{l},none" for l in range(L)] + ([] if metric in NO_LAYER_MEAN else [f"{metric},none"])
        absent = [k for k in keys if k not in res]
        if absent:
            if metric in REQUIRED_METRICS:
                missing += absent
            continue
        values = [_finite(res[k], f"{k!r}") for k in keys]
        layers[metric] = values[:L]
        stderr[metric] = [_maybe_number(res.get(f"{metric}.L{l}_stderr,none")) for l in range(L)]
        if metric not in NO_LAYER_MEAN:
            means[metric] = values[L]
            mean_stderr[metric] = _maybe_number(res.get(f"{metric}_stderr,none"))
    if missing:
        raise ValueError(f"partial results: {len(missing)} metric value(s) missing for {L} layers, e.g. {', '.join(missing[:3])}")
    pairwise = {}
    for key, value in res.items():
        pm = _PAIRWISE.match(key)
        if pm:
            pairwise[(int(pm["src"]), int(pm["dst"]))] = _finite(value, f"{key!r}")

    items = prov.get("items")
    without = _without_position_0(prov, L, items)
    if not isinstance(items, int) or isinstance(items, bool):
        items = (data.get("n-samples", {}).get(task, {}) or {}).get("effective")
    if not isinstance(items, int):
        raise ValueError("the number of items is recorded neither in provenance.items nor in n-samples")

    n_params = (data.get("config") or {}).get("model_num_parameters")
    estimated = not (isinstance(n_params, int) and n_params > 0)
    if estimated:
        n_params = _estimate_params(L, model.get("d_model"), model.get("vocab_size"))

    stamp = _STAMP.match(path.name)
    samples = path.parent / f"samples_{task}_{stamp['stamp']}.jsonl" if stamp else None
    values = item_values.path_for(samples) if samples else None
    date = _parse_date(prov.get("date"))
    return TaskRun(
        task=task, projector=str(projector), distribution=str(distribution), fit_on=str(fit_on) if fit_on else None,
        model_key=_model_key(model), model_name=str(model.get("name") or data.get("model_name") or "unnamed model"),
        num_layers=L, d_model=model.get("d_model"), vocab_size=model.get("vocab_size"),
        n_params=n_params, params_estimated=estimated and n_params is not None, items=items,
        means=means, mean_stderr=mean_stderr, layers=layers, stderr=stderr, pairwise_r2=pairwise,
        without_position_0=without, provenance=prov,
        results_file=path, samples_file=samples if samples and samples.is_file() else None,
        # the run's own start time orders runs; the task's provenance date stands in when it is absent
        date=run.date if run.date else (date or 0.0), date_text=str(prov.get("date") or run.date_text),
        run_id=run.run_id, lm_eval_version=run.lm_eval_version,
        values_file=values if values and values.is_file() else None,
    )


def _without_position_0(prov: dict, L: int, items) -> dict | None:
    """Per-layer means over the items not scored at position 0, as recorded; older runs recorded r^2 only."""
    def layer_list(values):
        ok = isinstance(values, list) and len(values) == L and all(_maybe_number(v) is not None for v in values)
        return [float(v) for v in values] if ok else None

    recorded = prov.get("without_position_0")
    if isinstance(recorded, dict) and isinstance(recorded.get("means"), dict):
        layers = {m: v for m, v in ((m, layer_list(v)) for m, v in recorded["means"].items()) if m in ALL_METRICS and v}
        n = recorded.get("items")
        return {"items": n if isinstance(n, int) else None, "layers": layers} if layers else None
    old = layer_list(prov.get("r2_by_layer_without_position_0"))
    if old:
        n0 = prov.get("items_at_position_0")
        n = items - n0 if isinstance(items, int) and isinstance(n0, int) else None
        return {"items": n, "layers": {"r2": old}}
    return None


def _analysis(config) -> str:
    meta = config.get("metadata") if isinstance(config, dict) else None
    return str(meta.get("analysis") or "lens") if isinstance(meta, dict) else "lens"


def _analysis_record(config: dict, name: str, what: str) -> dict:
    """A task's provenance holding its ``name`` analysis record and a model record, or a ValueError naming what is missing."""
    prov = config["metadata"].get("provenance")
    if not isinstance(prov, dict) or not isinstance(prov.get(name), dict) or not isinstance(prov.get("model"), dict):
        raise ValueError(f"configs.<task>.metadata.provenance.{name} is missing (an incomplete {what} run)")
    return prov


def _exit_task(task: str, res: dict, config: dict, path: Path, run: Run) -> ExitRun:
    meta = config["metadata"]
    prov = _analysis_record(config, "exit", "early-exit")
    summary = prov["exit"]
    curve = summary.get("curve") or {}
    for key in ("lambdas", "fraction_used", "accuracy"):
        if not isinstance(curve.get(key), list) or not curve[key]:
            raise ValueError(f"provenance.exit.curve.{key} is missing")
    saved = {}
    for r, name in (("0.99", "saved@99"), ("0.95", "saved@95"), ("0.9", "saved@90")):
        if f"{name},none" not in res:
            raise ValueError(f"partial results: {name} is missing")
        saved[r] = _finite(res[f"{name},none"], name)
    base = summary.get("base") if isinstance(summary.get("base"), dict) else None
    return ExitRun(task=task, projector=str(meta.get("projector")), distribution=str(prov.get("distribution")),
                   model_key=_model_key(prov["model"]), num_layers=int(prov["model"].get("num_layers") or 0),
                   items=int(summary.get("items") or 0), saved=saved, curve=curve,
                   base=base.get("projector") if base else None, base_curve=base.get("curve") if base else None,
                   paired=summary.get("paired_difference") or {}, mean_input_length=summary.get("mean_input_length"),
                   provenance=prov, results_file=path, date=run.date or (_parse_date(prov.get("date")) or 0.0))


SUBMODULE_MODES = {"linear": "", "removed": "removed_", "mat": "mat_"}
SUBMODULE_METRICS = ("p@1", "surprisal", "kl")


def _submodule_task(task: str, res: dict, config: dict, path: Path, run: Run) -> SubmoduleRun:
    prov = _analysis_record(config, "submodule", "sub-module")
    starts = prov["submodule"].get("start_layers")
    if not isinstance(starts, list) or not starts:
        raise ValueError("provenance.submodule.start_layers is missing")
    values = _per_start(res, SUBMODULE_MODES, SUBMODULE_METRICS, lambda prefix, m, l: f"{prefix}{m}.L{l},none", starts)
    return SubmoduleRun(task=task, part=str(prov["submodule"].get("part")), distribution=str(prov.get("distribution")),
                        model_key=_model_key(prov["model"]), num_layers=int(prov["model"].get("num_layers") or 0),
                        items=int(prov.get("items") or 0), starts=[int(l) for l in starts], values=values,
                        provenance=prov, results_file=path,
                        date=run.date or (_parse_date(prov.get("date")) or 0.0))


LAYER_METRICS = ("p@1", "kl", "xent")  # harness/layer_study.py (which imports torch; the site does not)


def _per_start(res: dict, groups: dict[str, str], metrics, key, starts: list) -> dict[str, dict[str, list[float]]]:
    """group -> metric -> the value at every start layer, ``key(groups[group], metric, start)`` naming it in ``res``.
    NaN is a result here: the intervened model diverged (the provenance counts where)."""
    values: dict[str, dict[str, list[float]]] = {}
    for group, tag in groups.items():
        values[group] = {}
        for m in metrics:
            keys = [key(tag, m, s) for s in starts]
            absent = [k for k in keys if k not in res]
            if absent:
                raise ValueError(f"partial results: {len(absent)} value(s) missing, e.g. {absent[0]}")
            values[group][m] = [_number_or_nan(res[k], k) for k in keys]
    return values


def _layers_task(task: str, res: dict, config: dict, path: Path, run: Run) -> LayersRun:
    prov = _analysis_record(config, "layers", "layer-intervention")
    info = prov["layers"]
    kinds, starts, summary = info.get("kinds"), info.get("starts"), info.get("summary")
    if not (isinstance(kinds, list) and kinds and isinstance(starts, list) and starts and isinstance(summary, dict)):
        raise ValueError("provenance.layers needs kinds, starts and summary")
    values = _per_start(res, {k: k for k in kinds}, LAYER_METRICS, lambda kind, m, s: f"{m}.{kind}.S{s},none", starts)
    if "xent.none,none" not in res:
        raise ValueError("partial results: xent.none (the unmodified model's cross-entropy) is missing")
    return LayersRun(task=task, distribution=str(prov.get("distribution")), model_key=_model_key(prov["model"]),
                     num_layers=int(prov["model"].get("num_layers") or 0), items=int(prov.get("items") or 0),
                     kinds=[str(k) for k in kinds], starts=[int(s) for s in starts], values=values,
                     xent_unmodified=_number_or_nan(res["xent.none,none"], "xent.none"), summary=summary,
                     provenance=prov, results_file=path, date=run.date or (_parse_date(prov.get("date")) or 0.0))


def _number_or_nan(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} is {value!r}, not a number")
    if math.isinf(value):
        raise ValueError(f"{what} is infinite")
    return float(value)


def read_results(path: Path) -> tuple[Run | None, list[Problem]]:
    """One results file: its valid jtc tasks, and a warning (naming the file) for everything else."""
    name = str(path)
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(name, f"cannot be read ({exc})")]
    except json.JSONDecodeError as exc:
        return None, [Problem(name, f"is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); file skipped")]
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or not isinstance(data.get("configs"), dict):
        return None, [Problem(name, "is not an lm-eval results file (needs 'results' and 'configs' objects); file skipped")]
    run_date = _maybe_number(data.get("date"))
    run = Run(
        results_file=path,
        run_id="run-" + hashlib.sha256(name.encode()).hexdigest()[:10],
        date=run_date or 0.0,
        date_text=_dt.datetime.fromtimestamp(run_date, _dt.timezone.utc).replace(microsecond=0).isoformat() if run_date else "unknown",
        model_name=data.get("model_name"),
        lm_eval_version=data.get("lm_eval_version"),
    )
    warnings = []
    for task, res in sorted(data["results"].items()):
        if not _TASK.match(task):
            continue  # other lm-eval tasks may share a run; they are not ours to show
        config = data["configs"].get(task)
        try:
            if _analysis(config) == "exit":
                run.exits.append(_exit_task(task, res, config, path, run))
                continue
            if _analysis(config) == "submodule":
                run.submodules.append(_submodule_task(task, res, config, path, run))
                continue
            if _analysis(config) == "layers":
                run.layers.append(_layers_task(task, res, config, path, run))
                continue
            run.tasks.append(_task(task, res, config, data, path, run))
        except (ValueError, TypeError, AttributeError) as exc:
            warnings.append(Problem(name, f"task {task}: {exc}; task skipped"))
    for t in run.tasks:
        pin = t.provenance.get("corpus_pin")
        if isinstance(pin, dict) and pin.get("status") == "differs":
            warnings.append(Problem(name, f"task {t.task}: the {t.distribution} sources read by this run differ from the "
                                           f"pinned ones (sources sha256 {str(pin.get('sources_sha256'))[:12]}… instead of "
                                           f"{str(pin.get('pinned_sha256'))[:12]}…; see corpus_pin in its provenance)"))
        if t.samples_file is None and t.values_file is None:
            warnings.append(Problem(name, f"task {t.task}: no samples_{t.task}_*.jsonl (or its item values, "
                                           ".safetensors) beside it (run lm_eval with --log_samples); its paired "
                                           "tests are not computed"))
    if not run.tasks and not run.exits and not run.submodules and not run.layers and not warnings:
        warnings.append(Problem(name, "holds no jtc tasks"))
    return run, warnings


def _newest(runs, key) -> dict:
    """Of several runs under the same key, the newest: by run date, then results file name."""
    out: dict = {}
    for r in runs:
        k = key(r)
        if k not in out or (r.date, str(r.results_file)) > (out[k].date, str(out[k].results_file)):
            out[k] = r
    return out


def load(paths: list[str | Path]) -> Loaded:
    """All runs under ``paths``; of several runs of the same (model, projector, distribution, fit distribution), the newest."""
    files, warnings = results_files(paths)
    runs = []
    for f in files:
        run, problems = read_results(f)
        warnings += problems
        if run is not None:
            runs.append(run)
    newest = _newest((t for run in runs for t in run.tasks), lambda t: (t.model_key, t.projector, t.distribution, t.fit_on))
    superseded = []
    for run in runs:
        for t in run.tasks:
            kept = newest[(t.model_key, t.projector, t.distribution, t.fit_on)]
            if kept is not t:
                t.superseded_by = kept
                superseded.append(t)
    exits = _newest((e for run in runs for e in run.exits), lambda e: (e.model_key, e.projector, e.distribution))
    studies = _newest((s for run in runs for s in run.submodules), lambda s: (s.model_key, s.part, s.distribution))
    layers = _newest((s for run in runs for s in run.layers), lambda s: (s.model_key, s.distribution))
    return Loaded(runs=runs, tasks=list(newest.values()), superseded=superseded, warnings=warnings,
                  exits=list(exits.values()), submodules=list(studies.values()), layers=list(layers.values()))


# ---------------------------------------------------------------------------------------------
# Per-item values


@dataclass
class Samples:
    ids: list[str]
    values: dict[str, dict[int, np.ndarray]]  # metric -> layer -> per-item values, in ``ids`` order
    # what each item was, in ``ids`` order: the item_sha256 its doc records (None in runs made before it
    # was recorded), and a hash of the doc's text and position draw, which every jtc sample has
    item_hashes: list[str | None] = field(default_factory=list)
    text_hashes: list[str] = field(default_factory=list)

    def without(self, excluded: set[str]) -> "Samples":
        """The same samples less the items in ``excluded``."""
        keep = [i not in excluded for i in self.ids]

        def kept(seq):
            return [x for x, k in zip(seq, keep) if k] if seq else seq

        mask = np.array(keep, dtype=bool)
        return Samples(ids=kept(self.ids), values={m: {l: v[mask] for l, v in by_layer.items()} for m, by_layer in self.values.items()},
                       item_hashes=kept(self.item_hashes), text_hashes=kept(self.text_hashes))


def doc_text_hash(doc: dict) -> str:
    """Hash of a sample doc's text and position draw: what pairs items of runs that record no item_sha256."""
    text = doc.get("text")
    if not isinstance(text, str):
        raise KeyError("doc has no item text")
    return hashlib.sha256(json.dumps([text, doc.get("u")], ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


class SampleCache:
    """Per-item values read once per samples file and metric set during one build."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Path, tuple[str, ...]], Samples] = {}

    def get(self, task: TaskRun, metrics: tuple[str, ...]) -> Samples:
        key = (task.samples_file or task.values_file, task.results_file, task.task, metrics)
        if key not in self._cache:
            self._cache[key] = load_samples(task, metrics)
        return self._cache[key]


def load_samples(task: TaskRun, metrics: tuple[str, ...]) -> Samples:
    """Per-item values of ``metrics`` at every layer, keyed by the item id in each line's ``doc``.

    Raises ValueError naming the file for a missing file, an unreadable line, or a line without
    an item id or a metric value: a comparison cannot quietly drop items. Items the run's provenance
    lists as skipped (not scored) are the exception: their lines are passed over.
    """
    if task.samples_file is None:
        if task.values_file is not None:
            ids, values, item_hashes, text_hashes = item_values.read(task, task.values_file, metrics)
            return Samples(ids=ids, values=values, item_hashes=item_hashes, text_hashes=text_hashes)
        raise ValueError(f"{task.results_file}: task {task.task} has no samples file")
    ids: list[str] = []
    skipped = task.skipped_ids
    item_hashes: list[str | None] = []
    text_hashes: list[str] = []
    columns = {m: [[] for _ in range(task.num_layers)] for m in metrics}
    with task.samples_file.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                item = row["doc"]["item_id"]
                if item in skipped:
                    continue
                recorded = row["doc"].get("item_sha256")
                text_hash = doc_text_hash(row["doc"])
                for m in metrics:
                    for l in range(task.num_layers):
                        columns[m][l].append(float(row[f"{m}.L{l}"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{task.samples_file}, line {lineno}: unusable sample ({type(exc).__name__}: {exc})") from None
            ids.append(item)
            item_hashes.append(recorded if isinstance(recorded, str) and recorded else None)
            text_hashes.append(text_hash)
    if len(ids) != task.items:
        raise ValueError(f"{task.samples_file}: {len(ids)} samples, but the results file reports {task.items} items")
    return Samples(ids=ids, values={m: {l: np.asarray(v) for l, v in enumerate(cols)} for m, cols in columns.items()},
                   item_hashes=item_hashes, text_hashes=text_hashes)


def write_item_values(paths: list[str | Path], progress=print) -> list[Path]:
    """The item values (item_values.write) of every lens task under ``paths`` that has its samples beside it."""
    files, problems = results_files(paths)
    if problems:
        raise ValueError("; ".join(str(p) for p in problems))
    written = []
    for f in files:
        run, _ = read_results(f)
        for t in run.tasks if run else ():
            if t.samples_file is None:
                continue
            out = item_values.write(t, load_samples(t, item_values.METRICS))
            progress(f"{out} ({out.stat().st_size / 1e6:.1f} MB from {t.samples_file.stat().st_size / 1e6:.0f} MB)")
            written.append(out)
    return written
