"""The lm-eval task behind every ``jtc_<projector>_<distribution>`` YAML.

The YAML names the projector and the distribution; every other option (harness/options.py) has a default
that task metadata (``--metadata '{"n_fit": 9000}'``) or model arguments (``--model_args ...,fit_on=news``)
override. Options are checked when the task is built: an unknown key or a bad value stops the run.
Documents are protocol items of the evaluation split; each becomes one ``jtc_lens`` request.
"""

from __future__ import annotations

import json
import logging

import datasets
from lm_eval.api.instance import Instance
from lm_eval.api.metrics import mean
from lm_eval.api.task import ConfigurableTask

from .. import early_exit
from ..corpora import get_corpus
from ..engine import ANALYSES, EXIT_PROJECTORS, METRICS
from ..submodule_study import STUDY_METRICS
from ..layer_study import LAYER_METRICS, REFERENCE
from ..metrics import HIGHER_IS_BETTER
from ..options import FITTED, PROJECTORS, OptionError, parse_options
from ..submodules import PARTS
from ..protocols import ProtocolConfig, build_items, item_sha256, no_items_reason
from . import handler, registration

log = logging.getLogger(__name__)
handler.install()


class _MeanForEveryMetric(dict):
    """Every per-layer metric aggregates by lm-eval's own ``mean`` (closed-form standard error); an early-exit
    metric by its own function, which recomputes the exit curve from every item's record."""

    def __missing__(self, key):
        return early_exit.AGGREGATIONS.get(key, mean)


class JTCTask(ConfigurableTask):
    def __init__(self, config: dict | None = None, **kwargs):
        config = dict(config or {})
        config.pop("class", None)  # lm-eval's loader keeps it; TaskConfig does not know it
        given = dict(config.get("metadata") or {})
        # lm-eval merges the model's arguments into every task's metadata; those are the model's, not options
        options = parse_options(given, ignore=registration.model_argument_names(), where=f"task {config.get('task')}")
        meta = {**given, **options}
        if meta.get("custom"):
            # custom_jtc_<projector>: the distribution is whatever the user names
            if not meta.get("corpus"):
                raise ValueError(f"task {config.get('task')} needs the distribution to read: "
                                 "--metadata '{\"corpus\": \"file:PATH\"}' (a .txt or .jsonl file) or '{\"corpus\": \"hf:NAME[:CONFIG]\"}'")
            meta["distribution"] = meta["corpus"]
        for key in ("projector", "distribution"):
            if not meta.get(key):
                raise ValueError(f"task {config.get('task')}: metadata needs {key!r}")
        if meta["projector"] not in PROJECTORS:
            raise ValueError(f"task {config.get('task')}: unknown projector {meta['projector']!r}; known: {', '.join(PROJECTORS)}")
        meta["analysis"] = meta.get("analysis") or "lens"
        if meta["analysis"] not in ANALYSES:
            raise ValueError(f"task {config.get('task')}: unknown analysis {meta['analysis']!r}; known: {', '.join(ANALYSES)}")
        if meta["analysis"] == "submodule" and (meta["projector"] != "mat" or meta.get("part") not in PARTS):
            raise ValueError(f"task {config.get('task')}: a sub-module task names a part ({', '.join(PARTS)}) and the mat "
                             "projector (its baseline and fit)")
        if meta["analysis"] == "layers" and meta["projector"] != "id":
            raise ValueError(f"task {config.get('task')}: a layer-intervention task scores the model's own output "
                             "(projector: id)")
        if meta["analysis"] == "exit" and meta["projector"] not in EXIT_PROJECTORS:
            raise ValueError(f"task {config.get('task')}: early exit is measured with {', '.join(EXIT_PROJECTORS)}, "
                             f"not {meta['projector']!r}")
        meta["fit_on"] = meta.get("fit_on") or meta["distribution"]
        if meta["stride"] is not None and meta["stride"] > meta["chunk_len"]:
            raise OptionError(f"task {config.get('task')}: option stride={meta['stride']} is larger than chunk_len={meta['chunk_len']}")
        try:
            self._protocol = ProtocolConfig(name=meta["protocol"], seed=meta["seed"], chunk_len=meta["chunk_len"],
                                            stride=meta["stride"], position_draw=meta["position_draw"])
        except ValueError as exc:
            raise OptionError(f"task {config.get('task')}: {exc}") from None
        config["metadata"] = meta
        self._meta = meta
        self._jtc_higher_is_better: dict = {}
        super().__init__(config=config, **kwargs)
        # Requests are of our own type; lm-eval pads multi-process runs by OUTPUT_TYPE.
        self.OUTPUT_TYPE = handler.REQUEST_TYPE

    # -- data -------------------------------------------------------------------------------------

    def download(self, dataset_kwargs=None, **kwargs) -> None:
        meta = self._meta
        corpus = get_corpus(meta["distribution"])
        items = build_items(corpus, meta["split"], self._protocol, limit=meta["n_eval"])
        if not items:
            raise ValueError(f"{meta['distribution']}/{meta['split']} has no items under protocol {self._protocol.name}: "
                             + no_items_reason(corpus, meta["split"], self._protocol))
        # item_sha256 travels in the doc (lm-eval writes docs into the samples files, and would take any
        # other returned value for a metric): paired comparisons check it
        docs = [{"item_id": it.item_id, "text": it.text, "u": it.u, "item_sha256": item_sha256(it, self._protocol)}
                for it in items]
        self.dataset = datasets.DatasetDict({meta["split"]: datasets.Dataset.from_list(docs)})

    def has_training_docs(self) -> bool:
        return False

    def has_validation_docs(self) -> bool:
        return self._meta["split"] == "validation"

    def has_test_docs(self) -> bool:
        return self._meta["split"] == "test"

    def validation_docs(self):
        return self.dataset["validation"]

    def test_docs(self):
        return self.dataset["test"]

    # -- requests and results ---------------------------------------------------------------------

    def construct_requests(self, doc, ctx, **kwargs):
        meta = self._meta
        spec = {
            "projector": meta["projector"],
            "distribution": meta["distribution"],
            "split": meta["split"],
            "protocol": {"name": self._protocol.name, "seed": self._protocol.seed, "chunk_len": self._protocol.chunk_len,
                         "stride": self._protocol.stride, "position_draw": self._protocol.position_draw},
            "item_id": doc["item_id"],
            "u": doc["u"],
            "batch_size": meta["jtc_batch_size"],
            "on_nonfinite": meta["on_nonfinite"],
            # the layer intervention the options name: the model must run under it (checked before scoring)
            "jtc_layers": None if meta.get("jtc_layers") is None else str(meta["jtc_layers"]),
        }
        if meta["analysis"] == "submodule":
            spec.update(analysis="submodule", part=meta["part"], every=meta["submodule_every"])
        if meta["analysis"] == "layers":
            spec.update(analysis="layers", every=meta["layers_every"])
        if meta["analysis"] == "exit":
            spec["analysis"] = "exit"
            base = early_exit.PAIRED_BASE.get(meta["projector"])
            if base is not None:
                spec["base"] = {"projector": base, **(self._least_squares_spec() if base in FITTED else {})}
        if meta["projector"] == "tuned":
            spec.update(fit_on=meta["fit_on"], recipe={
                "name": meta["recipe"], "token_budget": meta["token_budget"], "chunk_len": meta["tuned_chunk_len"],
                "tokens_per_step": meta["tokens_per_step"], "warm_fit_tokens": meta["warm_fit_tokens"],
                "warm_start": meta["warm_start"], "loss": meta["tuned_loss"], "stop_at": meta["stop_at"], "seed": meta["seed"]},
                import_from=meta["tuned_lens_path"], allow_unverified_lens=meta["allow_unverified_lens"],
                start=self._least_squares_spec())  # warm_start=affine: the fit of the run's affine projector
        elif meta["projector"] in FITTED:
            spec.update(self._least_squares_spec())
        return Instance(
            request_type=handler.REQUEST_TYPE,
            doc=doc,
            arguments=(doc["text"], json.dumps(spec, sort_keys=True)),
            idx=0,
            metadata=kwargs.get("metadata", (self.config.task, None, 1)),
        )

    def _least_squares_spec(self) -> dict:
        meta = self._meta
        return {"fit_on": meta["fit_on"], "n_fit": meta["n_fit"], "pairs": meta["pairs"], "ridge": meta["ridge"]}

    def process_results(self, doc, results):
        (response,) = results
        values = response.values
        prov = response.provenance
        if prov is not None:
            recorded = self.config.metadata.setdefault("provenance", prov)
            if recorded is not prov and recorded != prov:
                raise RuntimeError(f"{self.config.task}: items were scored under different provenance records")
        if self._meta["analysis"] == "exit":
            # the same record under every headline metric: each aggregation recomputes the curve from all of them
            metrics = {m: values["exit"] for m in early_exit.metric_names(self._meta["projector"])} if "exit" in values else {}
            for key in metrics:
                self._jtc_higher_is_better.setdefault(key, True)
            return metrics
        if self._meta["analysis"] == "submodule":
            # p@1.L3 (the part replaced by its map from block 3 on), removed_p@1.L3, mat_p@1.L3
            metrics = {k: v for k, v in values.items() if k.split(".")[0].split("_")[-1] in STUDY_METRICS}
            for key in metrics:
                self._jtc_higher_is_better.setdefault(key, HIGHER_IS_BETTER[key.split(".")[0].split("_")[-1]])
            return metrics
        if self._meta["analysis"] == "layers":
            # xent.none (the unmodified model), and p@1.skip.S3, kl.skip.S3, xent.skip.S3 ... (kind, start of the span)
            metrics = {k: v for k, v in values.items() if k == REFERENCE or k.split(".")[0] in LAYER_METRICS}
            for key in metrics:
                self._jtc_higher_is_better.setdefault(key, HIGHER_IS_BETTER[key.split(".")[0]])
            return metrics
        metrics = {k: v for k, v in values.items() if k.split(".")[0] in METRICS}
        for key in metrics:
            self._jtc_higher_is_better.setdefault(key, HIGHER_IS_BETTER[key.split(".")[0]])
        return metrics

    def aggregation(self) -> dict:
        return _MeanForEveryMetric()

    def higher_is_better(self) -> dict:
        return dict(self._jtc_higher_is_better)
