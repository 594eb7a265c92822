"""The ``jtc_lens`` request type: every jtc request of a run reaches this one method of the model.

lm-eval dispatches requests with ``getattr(lm, request_type)(all_requests)``; attaching the method to
the base LM class extends the stock ``hf`` model (and any LM exposing ``.model`` and ``.tokenizer``).
"""

from __future__ import annotations

import json

from ..distributed import group_of
from ..engine import Engine, EvalRequest
from ..fitting import FitSpec, TunedSpec
from ..models import build_lens_model
from ..options import FITTED
from ..protocols import Item, ProtocolConfig

REQUEST_TYPE = "jtc_lens"


def _fit_spec(fields: dict, protocol: ProtocolConfig) -> FitSpec:
    """The least-squares fit a request names (its own, its exit base's, or the tuned lens's warm start)."""
    return FitSpec(fit_on=fields["fit_on"], protocol=protocol, n_fit=int(fields["n_fit"]), pairs=fields["pairs"],
                   ridge=fields.get("ridge", 0.0))


def request_from_spec(text: str, spec: dict) -> EvalRequest:
    protocol = ProtocolConfig(**spec["protocol"])
    fit = None
    if spec["projector"] == "tuned":
        from ..tuned_training import TunedRecipe

        recipe = TunedRecipe(**spec["recipe"])
        start = _fit_spec(spec["start"], protocol) if recipe.warm_start == "affine" and not spec.get("import_from") else None
        fit = TunedSpec(fit_on=spec["fit_on"], recipe=recipe, import_from=spec.get("import_from"),
                        allow_unverified=bool(spec.get("allow_unverified_lens", False)), start=start)
    elif spec["projector"] in FITTED:
        fit = _fit_spec(spec, protocol)
    base = None
    if spec.get("base"):
        b = spec["base"]
        base_fit = None
        if b["projector"] in FITTED:
            base_fit = _fit_spec(b, protocol)
        base = (b["projector"], base_fit)
    return EvalRequest(
        projector=spec["projector"],
        distribution=spec["distribution"],
        split=spec["split"],
        protocol=protocol,
        item=Item(spec["item_id"], text, float(spec["u"])),
        fit=fit,
        analysis=spec.get("analysis", "lens"),
        base=base,
        part=spec.get("part"),
        every=int(spec.get("every", 1)),
    )


class LensResponse:
    """An item's metric values and the provenance record they were obtained under. lm-eval writes every
    response into the samples file twice, as text (``str`` of anything JSON cannot encode); that text is one
    line naming the record, since the values are logged as metrics and the record goes to the task's config."""

    def __init__(self, item_id: str, values: dict, provenance: dict | None):
        self.item_id = item_id
        self.values = values
        self.provenance = provenance

    def __str__(self) -> str:
        v = self.values
        record = (self.provenance or {}).get("record_id")
        if "skipped" in v:
            return f"jtc item {self.item_id}: skipped ({v['skipped']}), provenance {record}"
        return (f"jtc item {self.item_id}: position {v.get('position')}, {v.get('n_positions')} scored, "
                f"{v.get('n_tokens')} tokens, provenance {record}")

    __repr__ = __str__


def jtc_lens(lm, requests) -> list[LensResponse]:
    """Score all jtc requests of a run (this process's share of them, under data parallelism) on ``lm.model``.

    Under data parallelism every process must take part, even one that received no requests."""
    group = group_of(lm)
    if not requests and not group.distributed:
        return []
    parsed = []
    batch_size = None
    modes = set()
    asked_layers: set = set()
    for req in requests:
        text, spec_json = req.args[0], req.args[1]
        spec = json.loads(spec_json)
        batch_size = batch_size or spec.get("batch_size")
        modes.add(spec.get("on_nonfinite", "error"))
        asked_layers.add(spec.get("jtc_layers"))
        parsed.append(request_from_spec(text, spec))
    on_nonfinite = _one_mode(modes, group)
    lens = getattr(lm, "_jtc_lens", None)
    if lens is None:
        model = getattr(lm, "model", None)
        tokenizer = getattr(lm, "tokenizer", None)
        if model is None or tokenizer is None:
            raise TypeError(f"the jtc tasks need a Hugging Face model (lm-eval's hf); {type(lm).__name__} exposes no .model/.tokenizer")
        lens = build_lens_model(model, tokenizer)
        lm._jtc_lens = lens
    _check_layers(asked_layers, lens)
    max_length = getattr(lm, "max_length", None)
    engine = Engine(lens, batch_size=int(batch_size or 16), max_length=max_length, group=group, on_nonfinite=on_nonfinite)
    responses = []
    for r, values in zip(parsed, engine.run(parsed)):
        values = dict(values)
        responses.append(LensResponse(r.item.item_id, values, values.pop("provenance", None)))
    return responses


def _check_layers(asked: set, lens) -> None:
    """A task whose options name ``jtc_layers`` scores the model under that intervention, and only then: given in
    ``--metadata`` instead of ``--model_args``, it would reach the tasks while the model runs unmodified."""
    from ..layer_interventions import active_record

    active = active_record(lens.blocks)
    running = active["spec"] if active else None
    for wanted in asked:  # the option's canonical text (options.py), or None
        if wanted is not None and wanted != running:
            raise ValueError(f"the jtc tasks' options name jtc_layers={wanted}, but the model runs "
                             + (f"under jtc_layers={running}" if running else "without a layer intervention")
                             + ": give jtc_layers in --model_args (the model's arguments), not in --metadata")


def _one_mode(modes: set[str], group) -> str:
    """The run's on_nonfinite, the same on every process: its tasks share fits and batches, so they must agree."""
    every = sorted(set().union(*group.gather(modes)))
    if len(every) > 1:
        raise ValueError(f"the tasks of this run ask for different on_nonfinite values ({', '.join(every)}); "
                         "they share fitted projectors and batches, so give one value to all of them")
    return every[0] if every else "error"


def install() -> None:
    from lm_eval.api.model import LM

    if getattr(LM, REQUEST_TYPE, None) is not jtc_lens:
        setattr(LM, REQUEST_TYPE, jtc_lens)
