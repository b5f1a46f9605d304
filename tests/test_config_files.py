"""``config_files.refuse_irregular_file``: one refusal for every input path that is no regular file,
naming the setting, the path and what the path is, without opening it (a FIFO would block)."""

import errno
import os
import re
import socket
from pathlib import Path

import pytest

from megatron_cosmos3.config_files import file_problem, refuse_irregular_file


class CustomError(ValueError):
    """A caller's own error type (a checkpoint or request error)."""


def _path_of(kind: str, tmp_path: Path) -> Path:
    (tmp_path / "file.yaml").write_text("a: 1\n")
    if kind == "fifo":
        os.mkfifo(tmp_path / "pipe")
    elif kind == "dangling link":
        (tmp_path / "link").symlink_to("gone.yaml")
    elif kind == "link loop":
        (tmp_path / "loop").symlink_to("loop")
    return {
        "fifo": tmp_path / "pipe",
        "folder": tmp_path,
        "character device": Path("/dev/null"),
        "dangling link": tmp_path / "link",
        "link loop": tmp_path / "loop",
        "missing": tmp_path / "none.yaml",
        "below a regular file": tmp_path / "file.yaml" / "x.yaml",
        "nul byte": tmp_path / "a\0b",
        "name too long": tmp_path / ("x" * (os.pathconf(tmp_path, "PC_NAME_MAX") + 1)),
    }[kind]


@pytest.mark.timeout(30)  # a FIFO opened for reading would wait for a writer without end
@pytest.mark.parametrize(
    "kind, problem",
    [
        ("fifo", "not a regular file (a FIFO)"),
        ("folder", "not a regular file (a folder)"),
        ("character device", "not a regular file (a character device)"),
        ("dangling link", "not a regular file (a dangling symbolic link to 'gone.yaml')"),
        ("link loop", "not a regular file (a symbolic link loop)"),
        ("missing", "missing (no such file)"),
        ("below a regular file", "missing (no such file)"),
        ("nul byte", "cannot be looked up (embedded null byte)"),
        ("name too long", f"cannot be looked up ({os.strerror(errno.ENAMETOOLONG)})"),
    ],
)
def test_a_path_that_is_no_regular_file_is_refused_naming_the_setting_the_path_and_what_it_is(tmp_path, kind, problem):
    path = _path_of(kind, tmp_path)
    assert file_problem(path) == problem
    with pytest.raises(ValueError, match="^" + re.escape(f"data.x.path={str(path)!r}: {problem}") + "$"):
        refuse_irregular_file("data.x.path", path)
    with pytest.raises(CustomError, match="^" + re.escape(f"{path}: {problem}") + "$"):  # no setting: the path
        refuse_irregular_file("", str(path), CustomError)


def test_a_socket_is_refused_by_its_kind(tmp_path):
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(tmp_path / "s"))
        with pytest.raises(ValueError, match=r"^--config='.*/s': not a regular file \(a socket\)$"):
            refuse_irregular_file("--config", tmp_path / "s")
    finally:
        server.close()


def test_a_regular_file_or_a_link_to_one_passes_as_a_path(tmp_path):
    """Control: what the readers read is let through, unread."""
    (tmp_path / "file.yaml").write_text("a: 1\n")
    (tmp_path / "link.yaml").symlink_to("file.yaml")
    for given in (tmp_path / "file.yaml", str(tmp_path / "link.yaml")):
        assert file_problem(given) is None
        assert refuse_irregular_file("--config", given) == Path(given)
