"""Writing a file, or a folder of files, whole or not at all (docs/DESIGN.md, "Layers": below every
package; "Generated media").

A run killed while writing (Ctrl-C, SIGTERM from a scheduler, a full disk) must not leave a
truncated file under the name a reader looks for: a cut mp4 or JSON looks like an output until a
player or parser fails on it. ``write_atomically`` writes a hidden temporary file in the same folder
(same file system, so the rename is atomic) and renames it over the final name. A set of files (a
generated request, eval media, a step's training samples) is written into a hidden
``partial_folder`` and renamed into place (``staged_folder``); one a killed run left behind is
removed by a later run on its host (``remove_stale_partial_folders``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"  # the temporary file's name ends so; a killed process may leave one behind


def _umask() -> int:
    """The process's umask (read by setting it, so set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: str | Path, data: bytes | str, durable: bool = False) -> Path:
    """``data`` (text as UTF-8) into the file ``path``, parent folders created, through a temporary
    name beside it and one rename: ``path`` holds the old file or the whole new one, never part of
    it. ``durable``: the file is fsynced before the rename and its folder after it, so a power loss
    or a node crash after the return cannot leave the old file, or an empty one, under the name
    (the rename alone orders nothing on disk). Returns ``path``."""
    path = Path(path)
    with staged_file(path) as temporary, open(temporary, "wb") as file:
        file.write(data.encode("utf-8") if isinstance(data, str) else data)
        if durable:
            file.flush()
            os.fsync(file.fileno())
    if durable:
        sync_folder(path.parent)
    return path


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Yields a hidden temporary name beside ``path`` (parent folders created) for a writer that takes
    a path (torch.profiler's trace export); on leaving, it is renamed to ``path`` or, where the block
    raised (KeyboardInterrupt too), removed: ``path`` holds the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        # mkstemp makes the file 0600: give it the mode open() would, so a team's outputs stay readable
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def unwritable_reason(path: str | Path) -> str | None:
    """Why no file can be written at ``path`` (a folder, made if need be), or None: a file is created
    and removed in it, or in its nearest existing folder where it is yet to be made (nothing is left
    behind, and processes probing at once do not disturb each other), so a read-only file system, a
    folder without permission or one under /proc is found before a run starts."""
    path = Path(path).absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return error.strerror or str(error)
    return None


def sync_file(path: str | Path) -> None:
    """fsync of one file: its data and size reach the disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def sync_folder(path: str | Path) -> None:
    """fsync of a folder: the names created, renamed or removed in it reach the disk. A file system
    that cannot sync a folder (EINVAL or ENOTSUP: some network and FUSE ones) is left to its own
    guarantees."""
    handle = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(handle)


def sync_tree(folder: str | Path) -> None:
    """``sync_file`` of every file under ``folder`` and ``sync_folder`` of every folder, deepest first
    (``folder`` last): what one rename is about to publish is on disk before it."""
    folder = Path(folder)
    for parent, _folders, files in os.walk(folder, topdown=False):
        for name in files:
            sync_file(Path(parent) / name)
        sync_folder(parent)


def _owner() -> str:
    """This process as a partial folder's name records it: host (dots made underscores, so the name
    still splits on dots) and process id."""
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def longest_staged_name() -> int:
    """The longest name (bytes) a folder may have for its ``partial_folder`` to fit the 255-byte names
    of common file systems on this host: the partial name adds two dots, the host and a process id
    (up to 7 digits), a random part and ``PARTIAL_SUFFIX``."""
    host = socket.gethostname().replace(".", "_")
    return 255 - len(f"..{host}-{'9' * 7}.{'x' * 8}{PARTIAL_SUFFIX}".encode())


def partial_folder(folder: str | Path) -> Path:
    """A new empty hidden folder ``.<name>.<host>-<pid>.<random>.partial`` beside ``folder`` (parents
    created): where a set of files is written before one rename makes it ``folder``. The host and
    process id let a later run tell a killed run's leftover from a live run's (``remove_stale_partial_folders``)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{_owner()}.", suffix=PARTIAL_SUFFIX, dir=folder.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; renamed into place, it keeps its mode
    return staging


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def stale_partial_folders(parent: str | Path) -> list[Path]:
    """The partial folders (``partial_folder``) in ``parent`` whose process was on this host and has
    ended: a run killed (SIGKILL, a lost node) before it could remove its own. Another host's, a live
    process's and ones named otherwise are never listed: whether they are still being written cannot
    be told from here."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    host = re.escape(socket.gethostname().replace(".", "_"))
    owned = re.compile(rf"\..+\.{host}-(\d+)\.[^.]+{re.escape(PARTIAL_SUFFIX)}")
    stale = []
    for path in sorted(parent.iterdir()):
        match = owned.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink() and not _process_alive(int(match[1])):
            stale.append(path)
    return stale


def remove_stale_partial_folders(parent: str | Path) -> list[Path]:
    """Removes ``stale_partial_folders(parent)``, with a warning naming them; returns them."""
    stale = stale_partial_folders(parent)
    if stale:
        log.warning("removing partial folders left by runs that ended mid-write: %s", ", ".join(map(str, stale)))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


@contextlib.contextmanager
def staged_folder(folder: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yields a ``partial_folder`` beside ``folder`` to write a set of files into; on leaving, it is
    renamed to ``folder`` or, where the block raised (Ctrl-C and SIGTERM's SystemExit too), removed:
    ``folder`` appears whole or not at all. An empty ``folder`` (or, with ``replace``, any folder of
    the name) is replaced; one holding files is an OSError and the new set is dropped."""
    folder = Path(folder)
    staging = partial_folder(folder)
    try:
        yield staging
        if folder.is_dir() and not folder.is_symlink() and (replace or not any(folder.iterdir())):
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
