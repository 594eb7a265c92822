"""The class of every jtc task, named by the YAMLs as ``!function jtc_task.JTCTask``.

lm-eval loads this file by its path, beside the YAML, so no folder on ``sys.path`` (such as a source
checkout's ``harness/``) can stand in for it. It takes the task class from the installed ``jtc_lens`` and
checks that it is the copy installed beside this file.
"""

import sys
from pathlib import Path

from jtc_lens.harness.lmeval.task import JTCTask

_installed = Path(__file__).resolve().parent.parent
_loaded = Path(sys.modules[JTCTask.__module__].__file__).resolve()
if not _loaded.is_relative_to(_installed):
    raise ImportError(f"jtc_lens was imported from {_loaded}, not from the installation that holds these tasks "
                      f"({_installed}): a folder named jtc_lens on sys.path (the working folder?) shadows it")

__all__ = ["JTCTask"]
