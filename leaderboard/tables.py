"""What the pages show, computed from loaded runs: rankings, per-layer series, paired comparisons, transfer.

Paired tests come from ``harness.stats.compare``: one family is one (model, distribution, metric,
projector pair) over its layers, Holm-corrected at ``alpha``. Items are paired by the item id
recorded in each sample's ``doc``; different item sets make that comparison an error, never a join,
and so do items of the same id whose contents differ (an edited ``file:`` corpus, another corpus version).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from ..harness.bundled import by_gguf_sha256
from ..harness.metrics import HIGHER_IS_BETTER
from ..harness.stats import LayerComparison
from .comparison_cache import ComparisonStore

from .read import NATS, SampleCache, Samples, TaskRun

LN2 = math.log(2.0)
COMPARED = ("p@1", "surprisal", "kl")  # the charted metrics; each gets its own families
PAIRS = (("mat", "id"), ("affine", "mat"), ("tuned", "mat"))  # (A, B): the difference is A - B
PROJECTOR_ORDER = ("id", "mat", "affine", "tuned")
TITLES = {"p@1": "P@1", "p@5": "P@5", "p@10": "P@10", "surprisal": "surprisal", "kl": "KL", "xent": "cross-entropy",
          "entropy": "entropy", "r2": "r² (coordinate mean)", "r2w": "r²w (variance-weighted)"}


def scale(metric: str) -> float:
    """Factor from the stored unit to the shown one: natural-log metrics are shown in bits."""
    return 1.0 / LN2 if metric in NATS else 1.0


def unit(metric: str) -> str:
    return "bits" if metric in NATS else ""


def projector_sort_key(name: str) -> tuple:
    return (PROJECTOR_ORDER.index(name) if name in PROJECTOR_ORDER else len(PROJECTOR_ORDER), name)


def display_name(task: TaskRun) -> str:
    """A short model name: the bundled model's name, else the recorded name (last folder of a local path)."""
    record = task.provenance.get("model_record")
    if isinstance(record, dict) and record.get("name"):
        name = str(record["name"])
    else:
        name = task.model_name
        if name.startswith("/"):
            name = PurePosixPath(name.rstrip("/")).name or name  # a local folder: its own name says more than the path
    layers = (task.provenance.get("model") or {}).get("layers")
    if isinstance(layers, dict) and layers.get("spec"):
        # the same weights run with blocks skipped or reordered: another model, named so
        name += f" [jtc_layers={layers['spec']}]"
    return name


def human_params(n: int | None, estimated: bool) -> str:
    if not n:
        return "unknown"
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            text = f"{n / size:.3g}{suffix}"
            break
    else:
        text = str(n)
    return ("≈ " if estimated else "") + text


# ---------------------------------------------------------------------------------------------
# Models


@dataclass
class Model:
    key: str
    name: str
    page: str
    num_layers: int
    d_model: int | None
    vocab_size: int | None
    n_params: int | None
    params_estimated: bool
    record: dict | None
    tasks: list[TaskRun] = field(default_factory=list)

    @property
    def params_text(self) -> str:
        return human_params(self.n_params, self.params_estimated)

    @property
    def params_note(self) -> str | None:
        """Why the count is larger than the original checkpoint's, for a bundled GGUF that unties the output matrix."""
        bundled = by_gguf_sha256((self.record or {}).get("gguf_sha256"))
        if not (bundled and bundled.output_apart and self.n_params and self.vocab_size and self.d_model) \
                or self.params_estimated:
            return None
        output = self.vocab_size * self.d_model
        return (f"as loaded: the GGUF stores the output matrix ({human_params(output, False)}) apart "
                f"from the token embeddings, so both are counted; the original checkpoint ties them: "
                f"{human_params(self.n_params - output, False)}")

    @property
    def distributions(self) -> list[str]:
        return ordered_distributions(t.distribution for t in self.tasks)

    def in_distribution(self, distribution: str) -> list[TaskRun]:
        """The runs of one evaluated distribution whose projector was fitted on it (or needs no fit)."""
        return sorted((t for t in self.tasks if t.distribution == distribution and not t.transfer),
                      key=lambda t: projector_sort_key(t.projector))


def models(tasks: list[TaskRun]) -> list[Model]:
    by_key: dict[str, Model] = {}
    for t in tasks:
        if t.model_key not in by_key:
            record = t.provenance.get("model_record")
            by_key[t.model_key] = Model(
                key=t.model_key, name=display_name(t), page=f"model-{t.model_key}.html", num_layers=t.num_layers,
                d_model=t.d_model, vocab_size=t.vocab_size, n_params=t.n_params, params_estimated=t.params_estimated,
                record=record if isinstance(record, dict) else None)
        by_key[t.model_key].tasks.append(t)
    out = sorted(by_key.values(), key=lambda m: (m.n_params or 0, m.name))
    names = defaultdict(list)
    for m in out:
        names[m.name].append(m)
    for same in names.values():
        if len(same) > 1:  # two different models under one name: tell them apart by their recorded id
            for m in same:
                m.name = f"{m.name} ({m.key[:8]})"
    return out


# ---------------------------------------------------------------------------------------------
# Ranking


@dataclass
class RankRow:
    model: Model
    distribution: str
    task: TaskRun
    rank_p1: int
    rank_kl: int
    p1: float
    p1_stderr: float | None
    kl_bits: float
    kl_bits_stderr: float | None


def rankings(all_models: list[Model]) -> list[RankRow]:
    """Projectors of each (model, distribution), ranked by layer-averaged P@1 (and, separately, KL)."""
    rows = []
    for m in all_models:
        for dist in m.distributions:
            group = m.in_distribution(dist)
            by_p1 = sorted(group, key=lambda t: -t.means["p@1"])
            by_kl = sorted(group, key=lambda t: t.means["kl"])
            for t in by_p1:
                se = t.mean_stderr.get("kl")
                rows.append(RankRow(
                    model=m, distribution=dist, task=t, rank_p1=by_p1.index(t) + 1, rank_kl=by_kl.index(t) + 1,
                    p1=t.means["p@1"], p1_stderr=t.mean_stderr.get("p@1"),
                    kl_bits=t.means["kl"] / LN2, kl_bits_stderr=se / LN2 if se is not None else None))
    return rows


# ---------------------------------------------------------------------------------------------
# Across models


def is_random_control(m: Model) -> bool:
    return bool(m.record and m.record.get("random_init"))


@dataclass
class CrossModel:
    """One distribution across models: per model (by size, random-weights controls last) and projector, the
    layer-averaged P@1 and KL (bits), and the run each comes from."""

    distribution: str
    projectors: list[str]
    rows: list[tuple[Model, dict[str, TaskRun]]]

    @property
    def has_control(self) -> bool:
        return any(is_random_control(m) for m, _ in self.rows)


def by_size(all_models: list[Model]) -> list[Model]:
    """Models smallest first, random-weights controls last: the order of every view across models."""
    return sorted(all_models, key=lambda m: (is_random_control(m), m.n_params or 0, m.name))


def across(all_models: list[Model], distribution: str) -> CrossModel:
    """One distribution: a row per model that has runs of it (by size, controls last)."""
    rows = [(m, {t.projector: t for t in m.in_distribution(distribution)}) for m in by_size(all_models)
            if distribution in m.distributions]
    return CrossModel(distribution, sorted({p for _, by in rows for p in by}, key=projector_sort_key), rows)


# the paper's two distributions first, then the others by name
PAPER_DISTRIBUTIONS = ("wikipedia", "news")


def distribution_order(distribution: str) -> tuple:
    if distribution in PAPER_DISTRIBUTIONS:
        return (0, PAPER_DISTRIBUTIONS.index(distribution), "")
    return (1, 0, distribution)


def ordered_distributions(names) -> list[str]:
    return sorted(set(names), key=distribution_order)


def cross_model(all_models: list[Model]) -> list[CrossModel]:
    """Only when more than one model has results: a view of one model is its own page."""
    if len(all_models) < 2:
        return []
    views = [across(all_models, dist) for dist in ordered_distributions(d for m in all_models for d in m.distributions)]
    return [v for v in views if len(v.rows) >= 2]


# ---------------------------------------------------------------------------------------------
# Paired comparisons


@dataclass
class Family:
    """A versus B on one metric over the layers of one model and distribution (one Holm family)."""

    model: str
    distribution: str
    metric: str
    a: TaskRun
    b: TaskRun
    alpha: float
    n_resamples: int = 0
    rows: list[LayerComparison] = field(default_factory=list)
    error: str | None = None
    notes: list[str] = field(default_factory=list)  # caveats of a comparison that was computed
    a_label: str = ""
    b_label: str = ""
    short: str = ""  # the pair's name in a chart's significance strip
    without_position_0: bool = False  # tested on the items not scored at position 0 only

    def __post_init__(self) -> None:
        self.a_label = self.a_label or self.a.label
        self.b_label = self.b_label or self.b.label
        self.short = self.short or f"{self.a_label} vs {self.b_label}"

    @property
    def description(self) -> str:
        items = ", items not scored at position 0" if self.without_position_0 else ""
        return (f"family: {self.model}, {self.distribution}{items}, {TITLES[self.metric]}, {self.a_label} vs {self.b_label} "
                f"over {self.a.num_layers} layers; Holm at α = {self.alpha:g}")

    @property
    def test(self) -> str:
        return self.rows[0].test if self.rows else ""

    @property
    def significant_layers(self) -> list[int]:
        return [int(r.layer) for r in self.rows if r.significant]

    @property
    def factor(self) -> float:
        return scale(self.metric)

    def better(self, row: LayerComparison) -> str:
        """Which side the difference favours, given the metric's direction."""
        hib = HIGHER_IS_BETTER.get(self.metric)
        if hib is None or row.diff == 0:
            return ""
        return self.a_label if (row.diff > 0) == hib else self.b_label


def resamples_for(n_layers: int, alpha: float, requested: int) -> int:
    """Resamples for a family of ``n_layers``: at least enough that Holm can reach ``alpha``.

    A sign-flip p-value cannot fall below 2 / (n + 1), and Holm compares the smallest of m
    p-values with alpha / m; with too few resamples no layer of a deep model could ever be
    significant. Twice the bare minimum leaves room for more than one layer to pass.
    """
    return max(requested, math.ceil(4 * n_layers / alpha))


def position_0_items(a: TaskRun, b: TaskRun) -> set[str]:
    """The items either run scored at position 0; an error when a run did not record them."""
    out = set()
    for t in (a, b):
        ids = t.position_0_ids
        if ids is None:
            raise ValueError(f"{t.task} does not list its items at position 0 (a run of an older jtc-lens, or the dense "
                             "protocol, where every item starts at position 0); build without --without-position-0")
        out |= ids
    return out


def family(model: str, a: TaskRun, b: TaskRun, metric: str, cache: SampleCache, *, alpha: float,
           n_resamples: int, seed: int, without_position_0: bool = False, store: ComparisonStore | None = None,
           **labels: str) -> Family:
    """A against B on one metric, layer by layer; ``store`` keeps the paired tests' results for the next build."""
    fam = Family(model=model, distribution=a.distribution, metric=metric, a=a, b=b, alpha=alpha,
                 n_resamples=resamples_for(a.num_layers, alpha, n_resamples), without_position_0=without_position_0, **labels)
    try:
        if a.num_layers != b.num_layers:
            raise ValueError(f"{a.task} has {a.num_layers} layers and {b.task} {b.num_layers}")
        sa, sb = cache.get(a, COMPARED), cache.get(b, COMPARED)
        if without_position_0:
            at0 = position_0_items(a, b)
            sa, sb = sa.without(at0), sb.without(at0)
        contents_a, contents_b = item_contents(sa, sb)
        store = store if store is not None else ComparisonStore(None)
        fam.rows = store.compare(sa.ids, sa.values[metric], sb.ids, sb.values[metric], metric=metric, alpha=alpha,
                                 n_resamples=fam.n_resamples, seed=seed, contents_a=contents_a, contents_b=contents_b)
        fam.notes = provenance_notes(a, b)
    except ValueError as exc:
        fam.error = (f"{fam.a_label} ({a.samples_file or a.results_file}) vs {fam.b_label} "
                     f"({b.samples_file or b.results_file}): {exc}")
    return fam


def item_contents(sa: Samples, sb: Samples) -> tuple[list, list]:
    """Per-item content hashes of both sides: the recorded item_sha256 when both sides record it (text, position
    draw and protocol chunking), else a hash of each doc's text and position draw (runs that predate it)."""
    if all(sa.item_hashes) and all(sb.item_hashes):
        return sa.item_hashes, sb.item_hashes
    return sa.text_hashes, sb.text_hashes


def provenance_notes(a: TaskRun, b: TaskRun) -> list[str]:
    """Checks beyond the items' texts, from the two runs' provenance. Token ids that differ for the same texts
    (another tokenizer, another max_length) refuse the comparison; another corpus version is noted."""
    pa, pb = a.provenance, b.provenance
    tokens_a, tokens_b = pa.get("items_data_sha256"), pb.get("items_data_sha256")
    if tokens_a and tokens_b and tokens_a != tokens_b:
        raise ValueError(f"the items' texts agree but their token ids or scored positions do not (items_data_sha256 "
                         f"{a.label} {str(tokens_a)[:12]}…, {b.label} {str(tokens_b)[:12]}…): the runs tokenised them differently")
    notes = []
    corpus_a, corpus_b = pa.get("corpus_sha256"), pb.get("corpus_sha256")
    if corpus_a and corpus_b and corpus_a != corpus_b:
        notes.append(f"the two runs read different versions of {a.distribution} (corpus sha256 {a.label} {str(corpus_a)[:12]}…, "
                     f"{b.label} {str(corpus_b)[:12]}…); the paired items have identical contents, but what the projectors "
                     "were fitted on may differ")
    return notes


def comparisons(m: Model, distribution: str, cache: SampleCache, *, alpha: float, n_resamples: int,
                seed: int, without_position_0: bool = False, store: ComparisonStore | None = None) -> list[Family]:
    present = {t.projector: t for t in m.in_distribution(distribution)}
    out = []
    for metric in COMPARED:
        for a, b in PAIRS:
            if a in present and b in present:
                out.append(family(m.name, present[a], present[b], metric, cache, alpha=alpha,
                                  n_resamples=n_resamples, seed=seed, without_position_0=without_position_0, store=store))
    return out


# ---------------------------------------------------------------------------------------------
# Transfer


@dataclass
class Transfer:
    """A fitted projector evaluated on a distribution other than the one it was fitted on."""

    model: Model
    task: TaskRun
    in_dist: TaskRun | None  # the same projector fitted on the evaluated distribution, when run
    baseline: TaskRun | None  # id on the same distribution, when run
    families: list[Family] = field(default_factory=list)

    @property
    def fit_sizes_differ(self) -> bool:
        return self.in_dist is not None and self.task.fit_items != self.in_dist.fit_items

    def delta(self, metric: str) -> float | None:
        if self.in_dist is None:
            return None
        return (self.task.means[metric] - self.in_dist.means[metric]) * scale(metric)


def transfers(all_models: list[Model], cache: SampleCache, *, alpha: float, n_resamples: int, seed: int,
              without_position_0: bool = False, store: ComparisonStore | None = None) -> list[Transfer]:
    out = []
    for m in all_models:
        for t in sorted((t for t in m.tasks if t.transfer), key=lambda t: (t.distribution, projector_sort_key(t.projector), t.fit_on)):
            same = [u for u in m.tasks if u.distribution == t.distribution and not u.transfer]
            in_dist = next((u for u in same if u.projector == t.projector), None)
            baseline = next((u for u in same if u.projector == "id"), None)
            tr = Transfer(model=m, task=t, in_dist=in_dist, baseline=baseline)
            if in_dist is not None:
                tr.families = [family(m.name, t, in_dist, metric, cache, alpha=alpha, n_resamples=n_resamples, seed=seed,
                                      without_position_0=without_position_0, store=store,
                                      a_label=t.fit_label, b_label=in_dist.fit_label, short="vs in-dist. fit")
                               for metric in COMPARED]
            out.append(tr)
    return out


# ---------------------------------------------------------------------------------------------
# r^2 matrices


def r2_by_projector(tasks: list[TaskRun], metric: str = "r2") -> tuple[list[str], list[list[float | None]]]:
    """Rows of r^2 (``r2``, coordinate-averaged, or ``r2w``, variance-weighted) from each layer to the last, per
    projector, and the same without position-0 items where recorded."""
    labels, rows = [], []
    for t in tasks:
        labels.append(t.label)
        rows.append(list(t.layers[metric]))
    for t in tasks:
        alt = (t.without_position_0 or {}).get("layers", {}).get(metric)
        if alt:
            labels.append(f"{t.label}, no pos-0 items")
            rows.append(list(alt))
    return labels, rows


def r2_pairwise(t: TaskRun) -> tuple[list[int], list[int], list[list[float | None]]] | None:
    """The full source-by-target r^2 matrix when a results file records ``r2.L{l}.L{m}`` keys."""
    if not t.pairwise_r2:
        return None
    src = sorted({s for s, _ in t.pairwise_r2})
    dst = sorted({d for _, d in t.pairwise_r2})
    return src, dst, [[t.pairwise_r2.get((s, d)) for d in dst] for s in src]
