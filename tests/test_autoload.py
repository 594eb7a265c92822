"""A failed registration with lm-eval: jtc task requests fail with the cause, other tasks keep working.

Each case runs in a fresh interpreter, where the import hook patches lm-eval as it is imported and one
of the patches is made to fail first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

OTHER_TASK = """\
task: plain_demo
dataset_path: json
test_split: test
output_type: loglikelihood
doc_to_text: "{{text}}"
doc_to_target: " x"
metric_list:
  - metric: acc
"""


def run(code: str, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env}
    env.pop("JTC_NO_AUTOLOAD", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


SABOTAGE = """
import jtc_lens.harness.lmeval.registration as registration

def broken(module):
    raise RuntimeError("simulated: lm-eval changed under jtc-lens")

registration.{patch} = broken
import _jtc_lens_autoload  # installed by jtc_lens.pth in an installed copy; installs the hook otherwise
"""

PROBE = """
import json
from lm_eval.tasks import TaskManager

tm = TaskManager(include_defaults=False, include_path={other!r})
out = {{"other": tm.match_tasks(["plain_demo"])}}
for name, call in (("match", lambda: tm.match_tasks(["jtc_*"])), ("load", lambda: tm.load(["jtc_id_news"])),
                   ("dict", lambda: tm.load([{{"task": "jtc_id_news"}}]))):
    try:
        call()
        out[name] = "no error"
    except Exception as exc:
        out[name] = type(exc).__name__ + ": " + str(exc)
print(json.dumps(out))
"""


@pytest.fixture
def other_tasks(tmp_path) -> str:
    (tmp_path / "plain_demo.yaml").write_text(OTHER_TASK)
    return str(tmp_path)


def test_failed_task_manager_patch_makes_jtc_requests_fail_with_the_cause(other_tasks):
    proc = run(SABOTAGE.format(patch="patch_task_manager") + PROBE.format(other=other_tasks))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["other"] == ["plain_demo"]  # lm-eval still works for other tasks
    for case in ("match", "load", "dict"):
        assert out[case].startswith("RegistrationError: jtc-lens could not register with lm-eval"), out[case]
        assert "lm_eval.tasks.manager" in out[case] and "simulated: lm-eval changed under jtc-lens" in out[case]
    assert "could not register with lm-eval" in proc.stderr  # also said at import, for runs of other tasks


def test_failed_model_patch_makes_jtc_requests_fail_with_the_cause(other_tasks):
    proc = run(SABOTAGE.format(patch="patch_hf_model") + "import lm_eval.models.huggingface\n"
               + PROBE.format(other=other_tasks))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["other"] == ["plain_demo"]
    assert "lm_eval.models.huggingface" in out["load"] and "simulated: lm-eval changed" in out["load"], out["load"]


def test_harness_that_cannot_be_imported_still_gives_the_cause(other_tasks, tmp_path):
    # a jtc_lens package that fails on import (a missing dependency, say): the guard needs nothing from it
    broken = tmp_path / "broken" / "jtc_lens"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('simulated: a dependency of jtc-lens is missing')\n")
    code = f"import sys; sys.path.insert(0, {str(broken.parent)!r})\nimport _jtc_lens_autoload\n" + PROBE.format(other=other_tasks)
    proc = run(code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["other"] == ["plain_demo"]
    assert "ImportError: simulated: a dependency of jtc-lens is missing" in out["match"], out["match"]


def test_without_a_failure_jtc_tasks_are_found(other_tasks):
    proc = run(f"""
import _jtc_lens_autoload
from lm_eval.tasks import TaskManager
tm = TaskManager(include_defaults=False, include_path={other_tasks!r})
print(tm.match_tasks(["jtc_id_n*"]), tm.match_tasks(["plain_demo"]))
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "['jtc_id_news'] ['plain_demo']"


@pytest.mark.slow
def test_lm_eval_command_names_the_cause(tmp_path):
    """The stock command line with every built-in task indexed, as a user would run it."""
    code = SABOTAGE.format(patch="patch_task_manager") + f"""
import sys
sys.argv = ["lm_eval", "run", "--model", "dummy", "--tasks", "jtc_*", "--output_path", {str(tmp_path)!r}]
from lm_eval.__main__ import cli_evaluate
cli_evaluate()
"""
    proc = run(code)
    assert proc.returncode != 0
    assert "RegistrationError: jtc-lens could not register with lm-eval" in proc.stderr
    assert "simulated: lm-eval changed under jtc-lens" in proc.stderr
    assert "Tasks not found" not in proc.stderr
