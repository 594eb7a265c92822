"""Imported at interpreter start by jtc_lens.pth; must stay cheap and never fail.

A top-level module of its own, so that start-up imports nothing of the harness package.

It registers an import hook that patches lm-eval only when lm-eval itself is imported.
Set JTC_NO_AUTOLOAD=1 to disable.

A patch that fails must not break lm-eval for other tasks, nor make the jtc tasks vanish (lm-eval would
then only say that no task matches ``jtc_*``). So the failure is recorded, and lm-eval's task manager
refuses every request naming a jtc task with the cause; that guard is installed before the patches and
needs nothing from the harness package, which may be what failed to import.
"""

import functools
import importlib.abc
import importlib.util
import os
import sys

_TARGETS = {
    "lm_eval.tasks.manager": "patch_task_manager",
    "lm_eval.models.huggingface": "patch_hf_model",
}
_FAILURES = {}  # lm-eval module -> why patching it failed


class RegistrationError(RuntimeError):
    """jtc tasks were requested, but jtc-lens could not register with lm-eval in this process."""


def failure():
    """Why jtc-lens could not register with lm-eval in this process, or None."""
    if not _FAILURES:
        return None
    try:
        from importlib.metadata import version

        found = f"lm-eval {version('lm_eval')}"
    except Exception:
        found = "lm-eval"
    causes = "; ".join(f"patching {name} failed with {why}" for name, why in _FAILURES.items())
    return (f"jtc-lens could not register with {found}, so the jtc tasks cannot run: {causes}. "
            "Other tasks are unaffected; JTC_NO_AUTOLOAD=1 turns the jtc-lens hook off.")


def _names_jtc_task(task_list):
    """Whether a task request (a name, a comma-separated string, a pattern, a config dict or a list of
    these) names a jtc task: every jtc task, tag and pattern contains "jtc"."""
    items = task_list if isinstance(task_list, (list, tuple)) else [task_list]
    for item in items:
        if isinstance(item, dict):
            item = item.get("task")
        if isinstance(item, str) and "jtc" in item:
            return True
    return False


def _refusing_jtc_requests_after_failure(method):
    if getattr(method, "_jtc_guard", False):
        return method

    @functools.wraps(method)
    def guarded(self, task_list, *args, **kwargs):
        if _FAILURES and _names_jtc_task(task_list):
            raise RegistrationError(failure())
        return method(self, task_list, *args, **kwargs)

    guarded._jtc_guard = True
    return guarded


def _guard_task_manager(module):
    # match_tasks: what the lm_eval command resolves --tasks with; load: what simple_evaluate builds tasks with
    # (it runs after the model is built, so a failed model patch is seen there too)
    manager = module.TaskManager
    for name in ("match_tasks", "load"):
        setattr(manager, name, _refusing_jtc_requests_after_failure(getattr(manager, name)))


def _record(name, exc):
    _FAILURES[name] = f"{type(exc).__name__}: {exc}"
    print(f"jtc-lens: could not register with lm-eval ({name}: {exc!r}); jtc tasks will refuse to run", file=sys.stderr)


def _patch(module, patch_name):
    # never let an exception out: lm-eval itself must keep working
    if module.__name__ == "lm_eval.tasks.manager":
        try:
            _guard_task_manager(module)
        except Exception as exc:
            _record(module.__name__, exc)
    try:
        from jtc_lens.harness.lmeval import registration

        getattr(registration, patch_name)(module)
    except Exception as exc:
        _record(module.__name__, exc)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch_name):
        self._loader, self._patch_name = loader, patch_name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch(module, self._patch_name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        patch = _TARGETS.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


def install():
    if os.environ.get("JTC_NO_AUTOLOAD") or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
    # lm-eval imported before this hook existed (not the case at start-up, but be exact)
    for name, patch in _TARGETS.items():
        module = sys.modules.get(name)
        if module is not None:
            _patch(module, patch)


install()
