import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Each test module writes projector and corpus caches under its own folder, never ~/.cache/jtc."""
    shared = os.environ.get("JTC_TEST_SHARED_CACHE")
    root = Path(shared) if shared else tmp_path_factory.getbasetemp() / "jtc-cache"
    monkeypatch.setenv("JTC_CACHE", str(root))
    return root
