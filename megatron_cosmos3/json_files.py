"""Reading a JSON file that may be crafted or damaged (docs/DESIGN.md, "Layers": below every package).

``json.loads`` fails on hostile bytes with errors that name neither the file nor, sometimes, the
problem: ``UnicodeDecodeError`` (not UTF-8), ``RecursionError`` (``[[[[...`` nested past the
parser), a bare ``ValueError`` (an integer of more than 4300 digits, naming no field), and takes the
last of a key given twice without a sign. ``read_json`` turns each of these into one error of the
caller's type that names the file; what the document must hold is the caller's check. ``loads`` is
``json.loads`` where a too-long integer names its field (``long_integer_problem``, as the config
side's ``yaml_integers`` names its key); ``unique_keys`` and ``no_constant`` are the parser hooks
every strict reader shares.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing a key given twice in one object (parsers disagree on which
    value wins, so a file could mean one thing to us and another to the tool that checked it)."""
    counts = Counter(key for key, _ in pairs)  # linear: an object of 10**5 keys is no quadratic scan
    repeated = sorted(key for key, n in counts.items() if n > 1)
    if repeated:
        raise ValueError(f"key(s) {repeated[:5]} given twice")
    return dict(pairs)


class LongInteger:
    """A JSON integer of more digits than Python converts (``sys.get_int_max_str_digits``, 4300 by
    default), left unconverted by ``long_integers`` so the reader can name the field it stands in:
    ``json.loads`` refused the whole document with Python's own 'Exceeds the limit' text."""

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


def long_integers(text: str) -> int | LongInteger:
    """``parse_int`` keeping an integer Python will not convert as a ``LongInteger``."""
    limit = sys.get_int_max_str_digits()
    return LongInteger(text) if limit and len(text.lstrip("-")) > limit else int(text)


class LongIntegerError(ValueError):
    """A JSON document holds an integer too long for Python (``loads``); the message names its field."""


def long_integer_problem(name: str, digits: int, takes: str = "field") -> str:
    """What a reader says of an integer too long for Python under ``name`` (a dotted key, the JSON
    field's or the config setting's)."""
    return f"{name}=<an integer of {digits} digits> is not a number any {takes} takes"


def loads(text: str, **hooks: Any) -> Any:
    """``json.loads(text, **hooks)``, where an integer of more digits than Python converts is a
    ``LongIntegerError`` (a ValueError) naming its field (``shards[0].samples=<an integer of 5000
    digits> ...``); Python's own ValueError named none."""
    found: list[LongInteger] = []

    def parse_int(digits: str) -> int | LongInteger:
        value = long_integers(digits)
        if isinstance(value, LongInteger):
            found.append(value)
        return value

    document = json.loads(text, parse_int=parse_int, **hooks)
    if found:
        raise LongIntegerError(long_integer_problem(_field_of(document, found[0]), found[0].digits))
    return document


def _field_of(document: Any, value: Any) -> str:
    """The dotted field (``a.b[2]``) where ``value`` lies in ``document``; "the document" for itself.
    Walks with a stack: a document nested as deep as the parser reads is no recursion limit here."""
    stack = [("", document)]
    while stack:
        name, node = stack.pop()
        if node is value:
            return name or "the document"
        if isinstance(node, dict):
            stack.extend((f"{name}.{key}" if name else str(key), item) for key, item in node.items())
        elif isinstance(node, list):
            stack.extend((f"{name}[{i}]", item) for i, item in enumerate(node))
    return "the document"


def no_constant(name: str) -> None:
    """``parse_constant`` refusing NaN, Infinity and -Infinity, which are not JSON."""
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: str | Path, error: type[Exception] = ValueError) -> Any:
    """The JSON document of the file ``path``; ``error("<path>: ...")`` for a path that is missing or
    not a regular file (a FIFO or device would be read without end), bytes that are not UTF-8, or
    text that is not JSON (also nested past the parser's depth, a number Python refuses, or an
    object giving a key twice; an integer Python will not convert is named by its field)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {'not a regular file' if path.exists() else 'missing'}")
    try:
        return loads(path.read_bytes().decode("utf-8"), object_pairs_hook=unique_keys)
    except OSError as cause:
        raise error(f"{path}: unreadable ({cause})") from None
    except UnicodeDecodeError as cause:
        raise error(f"{path}: not UTF-8 text ({cause})") from None
    except RecursionError:
        raise error(f"{path}: not JSON (nested deeper than the parser reads)") from None
    except LongIntegerError as cause:
        raise error(f"{path}: {cause}") from None
    except ValueError as cause:  # JSONDecodeError, or a key given twice
        raise error(f"{path}: not JSON ({cause})") from None
