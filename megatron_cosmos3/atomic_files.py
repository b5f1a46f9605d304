"""Writing a file whole or not at all (docs/DESIGN.md, "Layers": below every package).

A run killed while writing (Ctrl-C, SIGTERM from a scheduler, a full disk) must not leave a
truncated file under the name a reader looks for: a cut mp4 or JSON looks like an output until a
player or parser fails on it. ``write_atomically`` writes a hidden temporary file in the same folder
(same file system, so the rename is atomic) and renames it over the final name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PARTIAL_SUFFIX = ".partial"  # the temporary file's name ends so; a killed process may leave one behind


def write_atomically(path: str | Path, data: bytes | str) -> Path:
    """``data`` (text as UTF-8) into the file ``path``, parent folders created, through a temporary
    name beside it and one rename: ``path`` holds the old file or the whole new one, never part of
    it. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(temporary, path)
    except BaseException:  # KeyboardInterrupt too: the temporary file goes with the error
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
