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
- ``lm_eval.tasks``: ``jtc = "harness.tasks"``. lm-eval does not load the value; it finds the module part
  (``importlib.util.find_spec``) and indexes the package's folder, where the wheel puts the task YAMLs
  (EleutherAI/lm-evaluation-harness#4015). When lm-eval indexes that folder itself, the patch above
  does not add it a second time.
- ``lm_eval.models``: ``jtc-hf = "harness.lmeval.model:JTCHFLM"``, an ``LM`` subclass, which lm-eval
  loads by ``EntryPoint.load()`` and builds with ``create_from_arg_string`` (#4013).
"""

from __future__ import annotations

import functools
from pathlib import Path

# jtc options accepted in --model_args; they reach the tasks through lm-eval's metadata merge.
MODEL_ARG_OPTIONS = ("fit_on", "n_fit", "n_eval", "protocol", "seed", "pairs", "chunk_len", "stride", "jtc_batch_size",
                     "recipe", "token_budget", "tuned_chunk_len", "tokens_per_step", "warm_fit_tokens", "tuned_loss", "stop_at", "tuned_lens_path")


def tasks_dir() -> str:
    """The folder of task YAMLs: inside the installed package, or ``tasks/`` of a source checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "tasks", here.parent / "tasks"):
        if candidate.is_dir() and any(candidate.glob("jtc_*.yaml")):
            return str(candidate)
    raise FileNotFoundError(f"the jtc task YAMLs were not found beside {here}")


def _wrap_init(cls, adjust_kwargs, after=None) -> None:
    """Make ``cls.__init__`` pass its keyword arguments through ``adjust_kwargs`` first and call
    ``after(self)`` once it is done; idempotent."""
    original = cls.__init__
    if getattr(original, "_jtc_patched", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **adjust_kwargs(kwargs))
        if after is not None:
            after(self)

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
    return {k: v for k, v in kwargs.items() if k not in MODEL_ARG_OPTIONS}


def patch_task_manager(module) -> None:
    _wrap_init(module.TaskManager, _with_our_tasks(module))


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


def patch_hf_model(module) -> None:
    _wrap_init(module.HFLM, _without_jtc_options, after=_data_parallel_on_cpu)
