"""Imported at interpreter start by jtc_lens.pth; must stay cheap and never fail.

A top-level module of its own, so that start-up imports nothing of the harness package.

It registers an import hook that patches lm-eval only when lm-eval itself is imported.
Set JTC_NO_AUTOLOAD=1 to disable.
"""

import importlib.abc
import importlib.util
import os
import sys

_TARGETS = {
    "lm_eval.tasks.manager": "patch_task_manager",
    "lm_eval.models.huggingface": "patch_hf_model",
}


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch_name):
        self._loader, self._patch_name = loader, patch_name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            from harness.lmeval import registration

            getattr(registration, self._patch_name)(module)
        except Exception as exc:  # never break lm-eval itself
            print(f"jtc-lens: could not register with lm-eval ({exc!r})", file=sys.stderr)


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
            try:
                from harness.lmeval import registration

                getattr(registration, patch)(module)
            except Exception:
                pass


install()
