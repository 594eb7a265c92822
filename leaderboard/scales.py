"""Per-layer tables across models: P@1 and KL of every projector at every layer, with relative depth."""

from __future__ import annotations

from pathlib import Path

from .read import Loaded, load
from .tables import PROJECTOR_ORDER, by_size, models

METRICS = (("p@1", "P@1", "{:.3f}"), ("kl", "KL (nats)", "{:.2f}"))


def model_title(m, record: dict) -> str:
    control = record.get("random_init")
    what = f"random weights (seed {control.get('seed')}) in the architecture of {control.get('architecture_of')}" if control \
        else record.get("weights", "")
    return f"{m.name}: {m.num_layers} layers, d = {m.d_model}, {m.params_text} parameters" + (f"; {what}" if what else "")


def markdown(paths: list[str | Path], distributions: tuple[str, ...] = ("wikipedia", "news"),
             loaded: Loaded | None = None) -> str:
    """For each model (by size, random-weights controls last) and distribution: a row per layer l (the state after l
    blocks, relative depth l / L), P@1 and KL (nats) of each projector fitted on the evaluated distribution.
    ``loaded``: the runs under ``paths``, when the caller has read them already."""
    loaded = load(paths) if loaded is None else loaded
    if not loaded.tasks:
        raise ValueError(f"no jtc lens results under {', '.join(map(str, paths))}")
    out = []
    for m in by_size(models(loaded.tasks)):
        record = m.record or {}
        out.append(f"### {model_title(m, record)}\n")
        if m.params_note:
            out.append(f"Parameters {m.params_note}.\n")
        weights = m.tasks[0].provenance.get("model", {}).get("weights_sha256")
        for dist in distributions:
            present = {t.projector: t for t in m.in_distribution(dist)}
            names = [p for p in PROJECTOR_ORDER if p in present] + sorted(p for p in present if p not in PROJECTOR_ORDER)
            if not names:
                continue
            first = present[names[0]]
            fits = sorted({f"{p} {present[p].fit_items}" for p in names if present[p].fit_items})
            out.append(f"**{dist}**: {first.items} items ({first.provenance.get('split', '?')} split, seed "
                       f"{first.provenance.get('seed')}, corpus sha256 {str(first.provenance.get('corpus_sha256'))[:12]}…), "
                       f"fit items {', '.join(fits) or 'none'}; weights sha256 {str(weights)[:12]}…; "
                       f"{first.results_file.parent.name}/{first.results_file.name}\n")
            head = ["layer", "depth"] + [f"{label} {p}" for _, label, _ in METRICS for p in names]
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---:|" * len(head))
            for l in range(m.num_layers):
                cells = [str(l), f"{l / m.num_layers:.2f}"]
                for metric, _, fmt in METRICS:
                    cells += [fmt.format(present[p].layers[metric][l]) for p in names]
                out.append("| " + " | ".join(cells) + " |")
            means = ["mean", ""] + [fmt.format(present[p].means[metric]) for metric, _, fmt in METRICS for p in names]
            out.append("| " + " | ".join(means) + " |\n")
    return "\n".join(out)
