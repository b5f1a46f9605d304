"""Reading a JSON file that may be crafted or damaged (docs/DESIGN.md, "Layers": below every package).

``json.loads`` fails on hostile bytes with errors that name neither the file nor, sometimes, the
problem: ``UnicodeDecodeError`` (not UTF-8), ``RecursionError`` (``[[[[...`` nested past the
parser), a bare ``ValueError`` (an integer of more than 4300 digits). ``read_json`` turns each of
these into one error of the caller's type that names the file; what the document must hold is
the caller's check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: str | Path, error: type[Exception] = ValueError) -> Any:
    """The JSON document of the file ``path``; ``error("<path>: ...")`` for a path that is missing or
    not a regular file (a FIFO or device would be read without end), bytes that are not UTF-8, or
    text that is not JSON (also nested past the parser's depth or a number Python refuses)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {'not a regular file' if path.exists() else 'missing'}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as cause:
        raise error(f"{path}: unreadable ({cause})") from None
    except UnicodeDecodeError as cause:
        raise error(f"{path}: not UTF-8 text ({cause})") from None
    except RecursionError:
        raise error(f"{path}: not JSON (nested deeper than the parser reads)") from None
    except ValueError as cause:  # JSONDecodeError, or an integer too long to convert
        raise error(f"{path}: not JSON ({cause})") from None
