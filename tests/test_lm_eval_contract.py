"""What the jtc integration takes from lm-eval: every class, method and function it patches, subclasses,
calls or fills in, with the parameter names it relies on.

The integration reaches into lm-eval internals (see harness/lmeval/ and _jtc_lens_autoload.py), so an
lm-eval release that renames or reshapes one of them must fail here, naming the symbol, rather than show
up as tasks that vanish or numbers that are wrong. The pinned range in pyproject.toml is the range these
checks have passed on.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent

# (module, attribute path, parameter names the integration passes or relies on, beyond self)
SIGNATURES = [
    # _jtc_lens_autoload / registration: wrapped so that the jtc task folder is among the include paths
    ("lm_eval.tasks.manager", "TaskManager.__init__", ["include_path", "include_defaults", "metadata"]),
    # wrapped by _jtc_lens_autoload: a jtc task request fails with the cause when registration failed
    ("lm_eval.tasks.manager", "TaskManager.match_tasks", ["task_list"]),
    ("lm_eval.tasks.manager", "TaskManager.load", ["task_list"]),
    # registration: wrapped to drop jtc options from the model arguments; the model registered for
    # plugin discovery subclasses it; the sweep passes these by name in --model_args
    ("lm_eval.models.huggingface", "HFLM.__init__", ["pretrained", "device", "dtype", "batch_size", "max_length"]),
    # lm-eval builds a model class from --model_args through this classmethod
    ("lm_eval.api.model", "LM.create_from_arg_string", ["arg_string", "additional_config"]),
    # task.py: JTCTask subclasses ConfigurableTask and overrides these hooks, which lm-eval calls
    ("lm_eval.api.task", "ConfigurableTask.__init__", ["config"]),
    ("lm_eval.api.task", "ConfigurableTask.download", ["dataset_kwargs"]),
    ("lm_eval.api.task", "ConfigurableTask.has_training_docs", []),
    ("lm_eval.api.task", "ConfigurableTask.has_validation_docs", []),
    ("lm_eval.api.task", "ConfigurableTask.has_test_docs", []),
    ("lm_eval.api.task", "ConfigurableTask.validation_docs", []),
    ("lm_eval.api.task", "ConfigurableTask.test_docs", []),
    ("lm_eval.api.task", "ConfigurableTask.construct_requests", ["doc", "ctx"]),
    ("lm_eval.api.task", "ConfigurableTask.process_results", ["doc", "results"]),
    ("lm_eval.api.task", "ConfigurableTask.aggregation", []),
    ("lm_eval.api.task", "ConfigurableTask.higher_is_better", []),
    # task.py builds each request, by keyword
    ("lm_eval.api.instance", "Instance", ["request_type", "doc", "arguments", "idx", "metadata"]),
    # task.py: every per-layer metric aggregates by lm-eval's mean
    ("lm_eval.api.metrics", "mean", ["arr"]),
]

# Methods lm-eval calls with keyword arguments it adds over time: they must keep accepting **kwargs.
VAR_KEYWORD = [
    ("lm_eval.models.huggingface", "HFLM.__init__"),
    ("lm_eval.api.task", "ConfigurableTask.download"),
    ("lm_eval.api.task", "ConfigurableTask.construct_requests"),
]

# Source the integration depends on that no signature shows: (module, attribute path, text, why)
SOURCE = [
    ("lm_eval.evaluator", "evaluate", "getattr(lm, reqtype)",
     "requests reach the model's method named by their request type (handler.py attaches jtc_lens to LM)"),
    ("lm_eval.evaluator", "evaluate", "task.OUTPUT_TYPE",
     "multi-process runs pad by the task's OUTPUT_TYPE, which JTCTask sets to its request type"),
    ("lm_eval.tasks.manager", "TaskManager.__init__", "self.metadata = metadata",
     "jtc options given as --metadata are read from the task manager"),
    ("lm_eval.tasks._factory", "TaskFactory._build_task", '"class" in cfg',
     "the task YAMLs name their class (class: !function jtc_task.JTCTask, a file beside the YAML)"),
    ("lm_eval.models.huggingface", "HFLM.rank", "self._rank", "CPU data parallelism sets HFLM._rank"),
    ("lm_eval.models.huggingface", "HFLM.world_size", "self._world_size", "CPU data parallelism sets HFLM._world_size"),
    ("lm_eval.models.huggingface", "HFLM.device", "self._device", "CPU data parallelism sets HFLM._device"),
    ("lm_eval.models.huggingface", "HFLM.__init__", "self.accelerator = accelerator",
     "CPU data parallelism reads the model's accelerator"),
    ("lm_eval.models.huggingface", "HFLM.__init__", "self.tokenizer",
     "the handler scores on lm.model with lm.tokenizer"),
]


def resolve(module: str, path: str):
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, property):
        obj = obj.fget
    return inspect.unwrap(obj)  # the lm-eval original under any jtc wrapper


@pytest.mark.parametrize("module, path, names", SIGNATURES, ids=[f"{m}:{p}" for m, p, _ in SIGNATURES])
def test_symbol_has_the_parameters_the_integration_uses(module, path, names):
    try:
        target = resolve(module, path)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"lm-eval no longer provides {module}:{path} ({exc!r}), which the jtc integration uses")
    params = inspect.signature(target).parameters
    missing = [n for n in names if n not in params]
    assert not missing, f"{module}:{path} lost parameter(s) {missing}; it now takes {list(params)}"


@pytest.mark.parametrize("module, path", VAR_KEYWORD, ids=[f"{m}:{p}" for m, p in VAR_KEYWORD])
def test_symbol_takes_further_keyword_arguments(module, path):
    params = inspect.signature(resolve(module, path)).parameters.values()
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params), f"{module}:{path} no longer takes **kwargs"


@pytest.mark.parametrize("module, path, text, why", SOURCE, ids=[f"{m}:{p}:{t}" for m, p, t, _ in SOURCE])
def test_source_the_integration_relies_on(module, path, text, why):
    source = inspect.getsource(resolve(module, path))
    assert text in source, f"{module}:{path} no longer contains {text!r}: {why}"


def test_modules_the_import_hook_waits_for_exist():
    import _jtc_lens_autoload

    for module in _jtc_lens_autoload._TARGETS:
        assert importlib.util.find_spec(module) is not None, f"lm-eval has no module {module}; the jtc hook never fires"


def test_jtc_task_overrides_keep_the_base_signatures():
    """JTCTask's hooks are called by lm-eval with the base class's parameter names."""
    from lm_eval.api.task import ConfigurableTask

    from jtc_lens.harness.lmeval.task import JTCTask

    for name, ours in vars(JTCTask).items():
        if not callable(ours) or name.startswith("_") or not hasattr(ConfigurableTask, name):
            continue
        base = [p for p in inspect.signature(getattr(ConfigurableTask, name)).parameters if p not in ("self", "kwargs")]
        mine = [p for p in inspect.signature(ours).parameters if p not in ("self", "kwargs")]
        assert mine == base, f"JTCTask.{name}{mine} differs from lm-eval's ConfigurableTask.{name}{base}"


def test_instance_and_mean_behave_as_used():
    from lm_eval.api.instance import Instance
    from lm_eval.api.metrics import mean

    inst = Instance(request_type="loglikelihood_rolling", doc={"text": "a"}, arguments=("a", "{}"), idx=0,
                    metadata=("jtc_id_news", 3, 1))
    assert inst.args == ("a", "{}")
    assert (inst.task_name, inst.doc_id, inst.repeats) == ("jtc_id_news", 3, 1)
    assert inst.resps == []
    assert mean([1.0, 2.0, 6.0]) == 3.0


def test_request_method_is_attached_to_every_lm():
    from lm_eval.api.model import LM

    from jtc_lens.harness.lmeval import handler

    handler.install()
    assert getattr(LM, handler.REQUEST_TYPE) is handler.jtc_lens


def test_installed_lm_eval_is_in_the_pinned_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    (spec,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "lm-eval"]
    assert spec.specifier, "pyproject.toml must pin the lm-eval versions the integration was checked against"
    version = importlib.metadata.version("lm_eval")
    assert spec.specifier.contains(version), f"lm-eval {version} is outside the pinned range {spec.specifier}"
