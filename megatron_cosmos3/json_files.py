"""Reading a JSON file that may be crafted or damaged (docs/DESIGN.md, "Layers": below every package).

``json.loads`` fails on hostile bytes with errors that name neither the file nor, sometimes, the
problem: ``UnicodeDecodeError`` (not UTF-8), ``RecursionError`` (``[[[[...`` nested past the
parser), a bare ``ValueError`` (an integer of more than 4300 digits, naming no field), and takes the
last of a key given twice without a sign; it also reads ``NaN``/``Infinity`` (not JSON) and a
literal past the float range (``1e999``, 400 digits with a fraction) as NaN or inf without a word.
``read_json`` turns each of these into one error of the caller's type that names the file; what
the document must hold is the caller's check; ``parse_json`` does the same for text read
elsewhere, naming where it came from. ``loads`` is ``json.loads`` where a too-long integer
or a non-finite number is a ``JsonNumberError`` naming its field (``long_integer_problem``, as the
config side's ``yaml_integers`` names its key); ``unique_keys`` is the parser hook every strict
reader shares.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from megatron_cosmos3.config_files import refuse_irregular_file


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


class NonFinite:
    """A JSON number that is not finite (``NaN``, ``Infinity``, ``-Infinity``, or a literal past the
    float range that Python reads as inf), left as its text by ``loads`` so the field can be named."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        # a 400-digit literal is named by its start and length, not written out
        return self.text if len(self.text) <= 24 else f"{self.text[:16]}...<{len(self.text)} characters>"


class JsonNumberError(ValueError):
    """A JSON document holds a number no reader takes (``loads``); the message names its field."""


class LongIntegerError(JsonNumberError):
    """An integer too long for Python."""


class NonFiniteNumberError(JsonNumberError):
    """NaN, Infinity or a literal past the float range, where the caller did not allow them."""


def long_integer_problem(name: str, digits: int, takes: str = "field") -> str:
    """What a reader says of an integer too long for Python under ``name`` (a dotted key, the JSON
    field's or the config setting's)."""
    return f"{name}=<an integer of {digits} digits> is not a number any {takes} takes"


def loads(text: str, *, allow_non_finite: bool = False, **hooks: Any) -> Any:
    """``json.loads(text, **hooks)``, where an integer of more digits than Python converts is a
    ``LongIntegerError`` naming its field (``shards[0].samples=<an integer of 5000 digits> ...``;
    Python's own ValueError named none), and ``NaN``, ``Infinity`` or a literal Python reads as inf
    (``1e999``) a ``NonFiniteNumberError`` naming its field and text (Python took them silently),
    unless ``allow_non_finite``. A hook given in ``hooks`` replaces this reader's (``parse_int=
    long_integers`` keeps a long integer in the document for the caller to name)."""
    found: list[LongInteger | NonFinite] = []

    def parse_int(digits: str) -> int | LongInteger:
        value = long_integers(digits)
        if isinstance(value, LongInteger):
            found.append(value)
        return value

    def parse_float(number: str) -> float | NonFinite:
        value = float(number)
        if math.isfinite(value):
            return value
        found.append(NonFinite(number))
        return found[-1]

    def parse_constant(name: str) -> NonFinite:
        found.append(NonFinite(name))
        return found[-1]

    own: dict[str, Any] = {} if allow_non_finite else {"parse_float": parse_float, "parse_constant": parse_constant}
    try:
        # Integers first by the C scanner (a Python hook per integer made an index of them ~4x
        # slower); only a document it refuses otherwise than as bad JSON (an integer past Python's
        # limit, or a hook's own ValueError) is read again with the hook that names the field.
        document = json.loads(text, **(own | hooks))
    except json.JSONDecodeError:
        raise
    except ValueError:
        found.clear()
        document = json.loads(text, **(own | {"parse_int": parse_int} | hooks))
    if found:
        first, name = found[0], _field_of(document, found[0])
        if isinstance(first, LongInteger):
            raise LongIntegerError(long_integer_problem(name, first.digits))
        raise NonFiniteNumberError(f"{name}={first!r} is not a finite number (NaN, Infinity or past the float range)")
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


def parse_json(text: str, where: str, error: type[Exception] = ValueError) -> Any:
    """The JSON document of ``text``, read as ``read_json`` reads a file's: ``error("<where>: ...")``
    for text that is not JSON (nested past the parser's depth, an object giving a key twice) or a
    number no reader takes (``loads``: named by its field)."""
    try:
        return loads(text, object_pairs_hook=unique_keys)
    except RecursionError:
        raise error(f"{where}: not JSON (nested deeper than the parser reads)") from None
    except JsonNumberError as cause:
        raise error(f"{where}: {cause}") from None
    except ValueError as cause:  # JSONDecodeError, or a key given twice
        raise error(f"{where}: not JSON ({cause})") from None


def read_json(path: str | Path, error: type[Exception] = ValueError) -> Any:
    """The JSON document of the file ``path``; ``error("<path>: ...")`` for a path that is missing or
    not a regular file (``config_files.refuse_irregular_file``: a FIFO or device would be read
    without end), bytes that are not UTF-8, or text ``parse_json`` refuses."""
    path = refuse_irregular_file("", path, error)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as cause:
        raise error(f"{path}: unreadable ({cause})") from None
    except UnicodeDecodeError as cause:
        raise error(f"{path}: not UTF-8 text ({cause})") from None
    return parse_json(text, str(path), error)
