"""The local artefact cache (built-in tiny model, bundled demo data) and safe concurrent publishing.

Several ranks (or several runs) may ask for the same artefact at the same moment. ``build_once`` makes
exactly one of them build it, into a temporary directory next to the target, and then renames it into
place: readers see either no directory or a complete one, never a half-written one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

CACHE_ENV = "LAUNCHER_CACHE_DIR"


def _repo_root() -> Path | None:
    """The checkout this package runs from (editable install), or None for an installed wheel."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "launcher").is_dir():
        return root
    return None


def cache_dir() -> Path:
    """``$LAUNCHER_CACHE_DIR``, else ``<repo>/.cache/launcher`` in a checkout, else ``./.cache/launcher``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    base = _repo_root() or Path.cwd()
    return base / ".cache" / "launcher"


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, building it first with ``build(tmp_dir)`` if it does not exist yet.

    ``build`` writes into an empty temporary directory on the same file system; the directory is then
    renamed to ``target`` (atomic). Concurrent callers wait on a lock file and reuse the result.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # flock underneath: the kernel drops it when the holder dies, so a killed builder blocks nobody.
    with FileLock(target.parent / f".{target.name}.lock"):
        if target.is_dir():  # another process published it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        try:
            build(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
