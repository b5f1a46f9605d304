"""A config file path a user hands us (docs/DESIGN.md, "Layers": below every package).

``OmegaConf.load`` reads a FIFO (``--config <(...)`` written by nobody, a named pipe) until a writer
comes, which may be never, and a device (``/dev/zero``) until the memory runs out: the command hung
where it should have refused. Every YAML config reader (training configs, a model config, the eval
suite's) calls ``refuse_irregular_file`` before it reads.
"""

from __future__ import annotations

from pathlib import Path


def refuse_irregular_file(path: str | Path, owner: str = "") -> None:
    """ValueError naming ``path`` where it exists but is not a regular file (a folder, FIFO, socket
    or device); ``owner``: what the message starts with. A missing path passes: the reader's own
    error (the system's, naming the path) says so."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"{owner}{path}: not a regular file (a folder, FIFO or device); a config is a YAML file")
