"""An input file path a user hands us: a config, an index, a manifest, a captions list (docs/DESIGN.md,
"Layers": below every package).

Reading a path that is no regular file goes wrong in ways that name nothing: ``OmegaConf.load``,
``json`` and ``zipfile`` read a FIFO (``--config <(...)`` written by nobody, a named pipe) until a
writer comes, which may be never, and a device (``/dev/zero``) until the memory runs out; a folder
or a dangling link is the system's error, naming the path but not the setting that gave it. Every
reader of a file named by a setting, an option or a manifest entry calls ``refuse_irregular_file``
before it opens the file: one ValueError naming the setting, the path and what the path is instead.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

# What a path is, by the file-type bits of its (followed) mode, where it is no regular file.
_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_problem(path: str | Path) -> str | None:
    """What keeps ``path`` from being read as a regular file, in words ("missing (no such file)",
    "not a regular file (a folder)", a FIFO, socket, character or block device, a dangling symbolic
    link, a link loop, "cannot be looked up (<the system's reason>)"), or None where it is one (or a
    link to one). Never opens the path: a FIFO is not read."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            return f"not a regular file (a dangling symbolic link to {os.readlink(path)!r})"
        return "missing (no such file)"
    except ValueError as error:  # a NUL byte in the path
        return f"cannot be looked up ({error})"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "not a regular file (a symbolic link loop)"
        return f"cannot be looked up ({error.strerror or error})"
    if stat.S_ISREG(mode):
        return None
    kind = next((kind for test, kind in _KINDS if test(mode)), f"file type {stat.S_IFMT(mode):#o}")
    return f"not a regular file ({kind})"


def refuse_irregular_file(name: str, path: str | Path, error: type[Exception] = ValueError) -> Path:
    """``path`` as a Path where it is a regular file (``file_problem``); else ``error`` (ValueError)
    naming the setting ``name`` (a dotted field, an option such as ``--config``; "" for none) and the
    path and saying what the path is: ``--captions='/x/pipe': not a regular file (a FIFO)``."""
    problem = file_problem(path)
    if problem is not None:
        raise error(f"{name}={str(path)!r}: {problem}" if name else f"{path}: {problem}")
    return Path(path)
