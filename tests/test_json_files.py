"""``json_files.loads`` refuses what Python's json reads as NaN or inf without a word — the bare
``NaN``/``Infinity`` tokens (not JSON) and a literal past the float range — naming the field and
the text, unless the caller allows them (docs/DESIGN.md, "Layers")."""

from __future__ import annotations

import json
import math

import pytest

from megatron_cosmos3.json_files import NonFiniteNumberError, loads

LONG = "9" * 400 + ".5"  # 400 digits with a fraction: past the float range


@pytest.mark.parametrize(
    "text, field, shown",
    [
        ('{"loss": 1e999}', "loss", "1e999"),
        ('{"a": {"b": [1.0, -1e999]}}', r"a.b\[1\]", "-1e999"),
        (f'{{"rate": {LONG}}}', "rate", r"9999999999999999\.\.\.<402 characters>"),
        ('{"x": NaN}', "x", "NaN"),
        ('[0, {"y": Infinity}]', r"\[1\].y", "Infinity"),
        ("-Infinity", "the document", "-Infinity"),
    ],
)
def test_a_non_finite_number_is_refused_naming_its_field_and_text(text, field, shown):
    assert not all(map(math.isfinite, _numbers(json.loads(text))))  # control: Python's json took it
    with pytest.raises(NonFiniteNumberError, match=rf"^{field}={shown} is not a finite number"):
        loads(text)
    assert not all(map(math.isfinite, _numbers(loads(text, allow_non_finite=True))))  # asked for: read


def test_finite_numbers_at_the_edge_of_the_range_are_read():
    assert loads('{"big": 1.7e308, "small": 5e-324, "under": 1e-999, "n": 3}') == {
        "big": 1.7e308,
        "small": 5e-324,
        "under": 0.0,
        "n": 3,
    }


def _numbers(document) -> list[float]:
    if isinstance(document, dict):
        return [n for value in document.values() for n in _numbers(value)]
    if isinstance(document, list):
        return [n for value in document for n in _numbers(value)]
    return [document]
