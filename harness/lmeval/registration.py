"""How lm-eval finds the jtc tasks without --include_path, and what plugin entry points point at.

lm-eval 0.4.13 reads no plugin entry points, so the wheel ships a .pth file that imports
``_jtc_lens_autoload``; that module waits for ``lm_eval.tasks.manager`` to be imported and then wraps
``TaskManager.__init__`` so that the jtc task folder is always among its include paths. It also lets
``--model_args`` carry jtc options (``fit_on=news``) that lm-eval forwards to every task's metadata,
by removing them before the stock ``hf`` model passes its arguments to ``from_pretrained``.

lm-eval 0.4.13 turns on data parallelism only when it counts more than one GPU, so processes started by
``accelerate launch`` on CPUs would each score every item. When accelerate runs several CPU processes
(gloo), the patched model takes accelerate's rank and world size, as it would on GPUs.

Entry points (pyproject.toml), for lm-eval releases with plugin discovery:
- ``lm_eval.tasks``: ``jtc = "jtc_lens.tasks"``. lm-eval does not load the value; it finds the module part
  (``importlib.util.find_spec``) and indexes the package's folder, where the wheel puts the task YAMLs
  (EleutherAI/lm-evaluation-harness#4015). When lm-eval indexes that folder itself, the patch above
  does not add it a second time.
- ``lm_eval.models``: ``jtc-hf = "jtc_lens.harness.lmeval.model:JTCHFLM"``, an ``LM`` subclass, which lm-eval
  loads by ``EntryPoint.load()`` and builds with ``create_from_arg_string`` (#4013).
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

from ..options import NAMES as OPTION_NAMES
from ..options import OptionError, likely_misspelled, parse_options, unknown_message
from . import layers

# Keys the hf model was given in this process: lm-eval merges them into every task's metadata, where they
# are the model's arguments, not unknown options.
MODEL_ARGUMENT_KEYS: set[str] = set()


def model_argument_names() -> set[str]:
    """Names that may reach task metadata as model arguments: the hf model's own parameters and the keys it was given."""
    names = set(MODEL_ARGUMENT_KEYS)
    try:
        from lm_eval.models.huggingface import HFLM

        names |= {p for p in inspect.signature(HFLM.__init__).parameters if p not in ("self", "kwargs")}
    except Exception:  # lm-eval without its hf extra: only what was seen
        pass
    return names


def tasks_dir() -> str:
    """The folder of task YAMLs: inside the installed package, or ``tasks/`` of a source checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "tasks", here.parent / "tasks"):
        if candidate.is_dir() and any(candidate.glob("jtc_*.yaml")):
            return str(candidate)
    raise FileNotFoundError(f"the jtc task YAMLs were not found beside {here}")


def _wrap_init(cls, adjust_kwargs, after=None, before=None) -> None:
    """Make ``cls.__init__`` call ``before(args, kwargs)`` (checks), pass its keyword arguments through
    ``adjust_kwargs`` and call ``after(self, kwargs)`` (the given ones) once it is done; idempotent."""
    original = cls.__init__
    if getattr(original, "_jtc_patched", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        if before is not None:
            before(args, kwargs)
        original(self, *args, **adjust_kwargs(kwargs))
        if after is not None:
            after(self, kwargs)

    __init__._jtc_patched = True
    cls.__init__ = __init__


def _indexed_by_lm_eval(module, ours: str) -> bool:
    """Whether lm-eval indexes the jtc task folder itself, from the ``lm_eval.tasks`` entry point."""
    discover = getattr(module, "discover_plugin_task_paths", None)
    if discover is None:
        return False
    try:
        return any(Path(p).resolve() == Path(ours) for p in discover())
    except Exception:  # lm-eval logs its own discovery problems; the include path below still works
        return False


def _with_our_tasks(module):
    def adjust(kwargs: dict) -> dict:
        include_path = kwargs.get("include_path")
        paths = [] if include_path is None else list(include_path) if isinstance(include_path, (list, tuple)) else [include_path]
        ours = tasks_dir()
        if not any(Path(p).resolve() == Path(ours) for p in paths) and not _indexed_by_lm_eval(module, ours):
            paths.insert(0, ours)  # user paths come later and may override
        return {**kwargs, "include_path": paths}

    return adjust


def _without_jtc_options(kwargs: dict) -> dict:
    MODEL_ARGUMENT_KEYS.update(k for k in kwargs if k not in OPTION_NAMES)
    return {k: v for k, v in kwargs.items() if k not in OPTION_NAMES}


def is_jtc_task(name) -> bool:
    return isinstance(name, str) and (name.startswith("jtc_") or name.startswith("custom_jtc_") or name in ("jtc", "jtc-custom"))


def check_options(metadata: dict | None) -> None:
    """Refuse bad jtc options before any model is loaded: a value a jtc option does not allow, or a key
    that is no option yet is close to one (a typo). Other unknown keys may still be model arguments; the
    task refuses those that are not once the model has been built."""
    metadata = dict(metadata or {})
    typos = likely_misspelled(metadata, known=model_argument_names())
    if typos:
        raise OptionError(unknown_message(typos[0], "jtc"))
    parse_options(metadata, ignore=set(metadata) - set(OPTION_NAMES), where="jtc")


def _checking_matches(original):
    """TaskManager.match_tasks, which the lm_eval command calls before it loads the model: once jtc tasks
    are among the matches, their options are checked."""
    if getattr(original, "_jtc_patched", False):
        return original

    @functools.wraps(original)
    def match_tasks(self, task_list, *args, **kwargs):
        matches = original(self, task_list, *args, **kwargs)
        if any(is_jtc_task(m) for m in matches):
            check_options(getattr(self, "metadata", None))
        return matches

    match_tasks._jtc_patched = True
    return match_tasks


def patch_task_manager(module) -> None:
    _wrap_init(module.TaskManager, _with_our_tasks(module))
    module.TaskManager.match_tasks = _checking_matches(module.TaskManager.match_tasks)


def _data_parallel_on_cpu(lm) -> None:
    accelerator = getattr(lm, "accelerator", None)
    if accelerator is None or accelerator.num_processes <= 1 or getattr(lm, "_world_size", 1) > 1:
        return
    if accelerator.device.type != "cpu":
        return  # accelerator devices: lm-eval's own logic applies
    lm._rank = accelerator.process_index
    lm._world_size = accelerator.num_processes
    lm._device = accelerator.device
    _close_process_group_at_exit()


def _close_process_group_at_exit() -> None:
    # gloo aborts the interpreter at exit ("terminate called without an active exception") when the
    # process group is still open, which turns a finished run into a failed exit status.
    import atexit

    import torch.distributed as dist

    def close():
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    atexit.register(close)


def after_hf_init(lm, kwargs: dict) -> None:
    """What the hf model needs once built: CPU data parallelism, and the ``jtc_layers`` intervention."""
    _data_parallel_on_cpu(lm)
    layers.install(lm, kwargs)


def patch_hf_model(module) -> None:
    # jtc_layers is checked (syntax, and range from the config) before the weights are loaded
    _wrap_init(module.HFLM, _without_jtc_options, after=after_hf_init, before=layers.check_before_load)
