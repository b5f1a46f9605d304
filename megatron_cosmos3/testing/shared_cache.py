"""Test artifacts made once per test session and shared by all its processes.

The test command runs pytest-xdist workers, each a process of its own: a ``functools.cache`` or a
session fixture makes a generated world, a trained checkpoint or an empty MLflow store once per
*worker*, and each copy costs seconds to tens of seconds of CPU on a 2-core machine. ``shared_folder``
makes it once for the whole session instead: the first process to ask makes it under a file lock,
the others wait for it and read the same folder. Only for artifacts that tests read and never change.

The session's folder is named by ``SHARED_DIR_ENV``, which the test suite's ``conftest.py`` sets in
the controller before the workers start (they inherit it) and removes at the end. Without it (a test
module run by a script, one process) each process keeps its own folder, removed when it exits.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

SHARED_DIR_ENV = "COSMOS3_TEST_SHARED_DIR"
_COMPLETE = ".complete"  # written last: a folder without it was left by a maker that died


@cache
def _own_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="cosmos3-test-shared-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def shared_root() -> Path:
    """The folder this session's shared artifacts live in."""
    named = os.environ.get(SHARED_DIR_ENV)
    return Path(named) if named else _own_root()


def shared_folder(key: str, make: Callable[[Path], object]) -> Path:
    """``shared_root()/key``, made by ``make(folder)`` (which fills the empty folder it is given)
    in the first process of the session that asks; the others block until it is complete.
    ``key`` must name everything the artifact depends on (it is the only thing compared)."""
    if not key or "/" in key or key.startswith("."):
        raise ValueError(f"shared_folder: key {key!r} must be a plain folder name")
    root = shared_root()
    folder = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not (folder / _COMPLETE).exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / _COMPLETE).touch()
    return folder
