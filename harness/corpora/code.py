"""Python source code: the standard library of the interpreter that runs the benchmark.

Every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` is a document, kept as written
(doc_id is the path relative to that folder), except test suites (``test``, ``tests`` and
``idle_test`` folders), installed packages (``site-packages``) and byte-code caches. Empty files
(most ``__init__.py``) are hashed but make no document. The files depend on the Python version,
which ``notes`` records; the per-file hashes pin the exact text.
"""

from __future__ import annotations

import platform
import sysconfig
from pathlib import Path

from .base import Corpus, Document, MissingSourceError, cached_documents, hash_files

LOADER_VERSION = "code-1"
_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*.py")
        if p.is_file() and not _SKIPPED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )


def load() -> Corpus:
    root = stdlib_dir()
    paths = source_files(root) if root.is_dir() else []
    if not paths:
        raise MissingSourceError(
            f"no standard-library sources under {root}; this interpreter ships without them "
            "(on Debian/Ubuntu: apt-get install libpython3-stdlib)"
        )
    hashes = hash_files(paths, root)

    def build():
        docs = []
        for p in paths:
            # PEP 3120: sources are UTF-8 unless declared otherwise; the standard library declares nothing else.
            text = p.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
            if text.strip():
                rel = p.relative_to(root).as_posix()
                docs.append(Document(doc_id=f"stdlib:{rel}", text=text, title=rel))
        return docs

    version = platform.python_version()
    return Corpus(
        name="code",
        documents=cached_documents("code", LOADER_VERSION, hashes, build),
        source_hashes=hashes,
        description=f"Python {version} standard library source files (tests excluded), unmodified",
        license="PSF License Agreement (Python Software Foundation License)",
        notes={"python": version, "implementation": platform.python_implementation(),
               "package": f"CPython {version} standard library"},
    )
