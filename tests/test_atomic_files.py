"""Folders of files written whole or not at all, and what killed runs left removed
(docs/DESIGN.md, "Generated media")."""

import logging
import os
import signal
import socket
import subprocess
import sys

import pytest

from megatron_cosmos3.atomic_files import partial_folder, remove_stale_partial_folders, staged_folder

# A process that makes a partial folder for OUT/request and is then SIGKILLed: nothing of its
# cleanup runs, as with the OOM killer or a lost node.
_KILLED = """
import os, signal, sys
from megatron_cosmos3.atomic_files import partial_folder
(partial_folder(sys.argv[1]) / "video.mp4").write_bytes(b"half a video")
os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_run_partial(folder) -> "os.PathLike":
    result = subprocess.run([sys.executable, "-c", _KILLED, str(folder)], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    (left,) = [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]
    return left


def test_a_killed_runs_partial_folder_is_removed_and_a_live_runs_kept(tmp_path, caplog):
    """SIGKILL left cosmos3-generate's hidden ``.<name>.*.partial`` request folders forever: nothing
    told a dead run's from a live one's. The name now records host and pid; a later run removes
    only those of ended processes on its host, naming them."""
    out = tmp_path / "out"
    dead = killed_run_partial(out / "request")
    live = partial_folder(out / "other")  # this process: alive
    elsewhere = out / f".third.{socket.gethostname().replace('.', '_')}x-1.abcdefgh.partial"
    unrelated = out / ".notes.partial"
    for folder in (elsewhere, unrelated):
        folder.mkdir()
    with caplog.at_level(logging.WARNING):
        assert remove_stale_partial_folders(out) == [dead]
    assert str(dead) in caplog.text
    assert sorted(out.iterdir()) == sorted([live, elsewhere, unrelated])


def test_another_hosts_partial_folder_is_kept(tmp_path, monkeypatch, ended_run_partial_folder):
    """Whether another host's writer lives cannot be told here: the folder stays (control: the same
    folder on its own host, its process ended, goes)."""
    dead = ended_run_partial_folder(tmp_path / "request")
    monkeypatch.setattr(socket, "gethostname", lambda: "another.host")
    assert remove_stale_partial_folders(tmp_path) == [] and dead.is_dir()
    monkeypatch.undo()
    assert remove_stale_partial_folders(tmp_path) == [dead] and not dead.exists()


def test_a_staged_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "set"
    with pytest.raises(KeyboardInterrupt), staged_folder(target) as staging:
        (staging / "first.png").write_bytes(b"one")
        raise KeyboardInterrupt  # Ctrl-C before the second file
    assert list(tmp_path.iterdir()) == []  # neither the set nor its partial folder
    with staged_folder(target) as staging:
        (staging / "first.png").write_bytes(b"one")
        assert not target.exists()  # not before it is whole
    assert [p.name for p in tmp_path.iterdir()] == ["set"] and (target / "first.png").read_bytes() == b"one"
    with pytest.raises(OSError), staged_folder(target) as staging:  # never mixed into a full folder
        (staging / "second.png").write_bytes(b"two")
    assert [p.name for p in target.iterdir()] == ["first.png"] and len(list(tmp_path.iterdir())) == 1
    with staged_folder(target, replace=True) as staging:
        (staging / "second.png").write_bytes(b"two")
    assert [p.name for p in target.iterdir()] == ["second.png"]


def test_the_partial_folder_name_says_whose_it_is(tmp_path):
    folder = partial_folder(tmp_path / "a.b")
    host = socket.gethostname().replace(".", "_")
    assert folder.name.startswith(f".a.b.{host}-{os.getpid()}.") and folder.name.endswith(".partial")


def test_files_and_folders_written_whole_get_the_modes_open_and_mkdir_would_give(tmp_path):
    """mkstemp and mkdtemp make 0600 files and 0700 folders, which the rename kept: a team's
    generated outputs, eval media and training samples were readable by their writer alone."""
    from megatron_cosmos3.atomic_files import write_atomically

    previous = os.umask(0o027)
    try:
        written = write_atomically(tmp_path / "report.json", "{}")
        with staged_folder(tmp_path / "media") as staging:
            (staging / "a.mp4").write_bytes(b"whole")
    finally:
        os.umask(previous)
    assert written.stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "media").stat().st_mode & 0o777 == 0o750
