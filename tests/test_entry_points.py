"""The plugin entry points, loaded the way lm-eval's plugin discovery loads them.

lm-eval releases with plugin discovery read two groups (EleutherAI/lm-evaluation-harness#4013 for
models, #4015 for tasks):
- ``lm_eval.models``: each entry point is registered in the model registry as a lazy placeholder, loaded
  with ``EntryPoint.load()`` when its name is asked for, and the result is built with
  ``create_from_arg_string``: it must be an ``LM`` subclass.
- ``lm_eval.tasks``: the value is not loaded; its module part is found with ``importlib.util.find_spec``
  and the package's folder (a plain module's parent folder) is indexed for task YAMLs.

An editable install exposes the metadata of whichever checkout was installed, so the entry points are
read from a copy of this checkout laid out as the wheel lays it out (pyproject.toml's
[tool.hatch.build.targets.wheel]); set JTC_TEST_WHEEL=path/to/jtc_lens-*.whl to use a built wheel instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import types
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))


def install_copy(dest: Path) -> Path:
    """Files and metadata as a wheel install of this checkout has them."""
    wheel = os.environ.get("JTC_TEST_WHEEL")
    if wheel:
        zipfile.ZipFile(wheel).extractall(dest)
        return dest
    layout = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for source, target in layout["sources"].items():  # folders mapped under the import root
        shutil.copytree(ROOT / source, dest / target, ignore=ignore)
    for source, target in layout.get("force-include", {}).items():
        (dest / target).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, dest / target, ignore=ignore)
        else:
            shutil.copy2(ROOT / source, dest / target)
    project = PYPROJECT["project"]
    info = dest / f"jtc_lens-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}
    (info / "entry_points.txt").write_text(
        "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()) + "\n" for group, entries in groups.items()))
    return dest


LOAD_AS_LM_EVAL_DOES = """
import importlib.util, json
from importlib.metadata import entry_points
from pathlib import Path

from jtc_lens import harness
out = {"harness": harness.__file__}

# lm_eval.tasks: find the module part of the value without loading it, index its package folder
(ep,) = [e for e in entry_points(group="lm_eval.tasks") if e.name == "jtc"]
spec = importlib.util.find_spec(ep.value.split(":", 1)[0].strip())
locations = list(spec.submodule_search_locations or [])
folder = Path(locations[0]) if locations else Path(spec.origin).parent
from lm_eval.tasks import TaskManager

tm = TaskManager(include_defaults=False, include_path=[str(folder)])
out["task_folder"] = str(folder.resolve())
out["tasks"] = tm.match_tasks(["jtc_*", "custom_jtc_*"])

# lm_eval.models: a lazy placeholder in the model registry, loaded on request, built from --model_args
from lm_eval.api.model import LM
from lm_eval.api.registry import Registry

(ep,) = [e for e in entry_points(group="lm_eval.models") if e.name == "jtc-hf"]
registry = Registry("model")
registry.register(ep.name, target=ep)
cls = registry.get(ep.name)
out["model_entry"] = ep.value
out["is_lm_subclass"] = isinstance(cls, type) and issubclass(cls, LM)
if out["is_lm_subclass"]:
    lm = cls.create_from_arg_string("pretrained=MODEL_DIR,fit_on=news,n_eval=4", {"batch_size": 1, "device": "cpu"})
    out["model"] = type(lm.model).__name__
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny import build

    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = build("llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_entry_points_load_as_lm_eval_loads_them(tmp_path, tiny_model_dir):
    site = install_copy(tmp_path / "site")
    # the hook off: the entry points alone must find the tasks and the model
    env = {**os.environ, "PYTHONPATH": str(site), "JTC_NO_AUTOLOAD": "1"}
    code = textwrap.dedent(LOAD_AS_LM_EVAL_DOES.replace("MODEL_DIR", str(tiny_model_dir)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["harness"]).is_relative_to(site)  # the copy, not the editable checkout
    assert Path(out["task_folder"]).is_relative_to(site.resolve())
    yamls = sorted(p.stem for p in (ROOT / "tasks").glob("*jtc_*.yaml"))
    assert sorted(out["tasks"]) == yamls
    assert out["is_lm_subclass"], f"lm_eval.models entry point {out['model_entry']} does not load an lm_eval LM subclass"
    assert out["model"] == "LlamaForCausalLM"  # built from --model_args that carry jtc options


def test_task_folder_is_not_added_twice_when_lm_eval_indexes_it():
    from jtc_lens.harness.lmeval import registration

    class FakeTaskManager:
        def __init__(self, include_path=None):
            self.include_path = include_path

        def match_tasks(self, task_list):
            return []

    ours = registration.tasks_dir()
    for discovered, expected in (([ours], []), ([], [ours])):
        module = types.SimpleNamespace(TaskManager=type("TM", (FakeTaskManager,), {}),
                                       discover_plugin_task_paths=lambda found=discovered: [Path(p) for p in found])
        registration.patch_task_manager(module)
        assert module.TaskManager().include_path == expected
    old = types.SimpleNamespace(TaskManager=type("TM", (FakeTaskManager,), {}))  # lm-eval 0.4.13: no discovery
    registration.patch_task_manager(old)
    assert old.TaskManager(include_path="mine").include_path == [ours, "mine"]
