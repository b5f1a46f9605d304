"""Integers too long for Python in a YAML config (docs/DESIGN.md, "Layers": below every package).

A YAML scalar of more digits than ``int()`` converts (``sys.get_int_max_str_digits``, 4300 by
default) makes the loader raise Python's own 'Exceeds the limit' ValueError, which names no key.
Every config reader (training configs and their overrides, a checkpoint's saved config, the eval
suite's) checks the text first with ``refuse_long_integers``, which names the key.
"""

from __future__ import annotations

import sys

import yaml

from megatron_cosmos3.json_files import long_integer_problem


def long_integer(node: yaml.Node, key: str = "") -> tuple[str, int] | None:
    """The first YAML scalar under ``node`` (plain or quoted: an int field converts a string) that
    is an integer of more digits than Python converts: (its dotted key, its digits), or None."""
    if isinstance(node, yaml.MappingNode):
        found = (long_integer(value, f"{key}.{name.value}".lstrip(".")) for name, value in node.value)
    elif isinstance(node, yaml.SequenceNode):
        found = (long_integer(item, f"{key}[{i}]") for i, item in enumerate(node.value))
    elif isinstance(node, yaml.ScalarNode):
        digits = str(node.value).lstrip("+-").replace("_", "")
        limit = sys.get_int_max_str_digits()
        long = digits.isdigit() and limit and len(digits) > limit
        return (key, len(digits)) if long else None
    else:  # an empty document
        return None
    return next((hit for hit in found if hit is not None), None)


def refuse_long_integers(text: str, key: str = "", owner: str = "") -> None:
    """ValueError naming the key of an integer too long for Python in the YAML ``text`` (``key``:
    the key of a value given alone, an override's; ``owner``: what the message starts with). Text
    that is no YAML passes: the loader names what is wrong with it."""
    try:
        hit = long_integer(yaml.compose(text))
    except yaml.YAMLError:
        return
    if hit is not None:
        name = ".".join(part for part in (key, hit[0]) if part)
        raise ValueError(owner + long_integer_problem(name, hit[1], "setting"))
