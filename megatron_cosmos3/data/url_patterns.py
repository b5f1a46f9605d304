"""A ``shards`` entry's URL pattern, expanded as WebDataset expands it, within a bound.

``braceexpand`` builds every name of a range before the first is used: ``a-{0..99999999}.tar``
took ten minutes and gigabytes, ``{0..99999999999999}`` was killed for memory. A pattern is
counted first, from its braces alone, and one naming more than ``MAX_URLS_PER_ENTRY`` shards is
refused (docs/DESIGN.md, "The data path").
"""

from __future__ import annotations

import re

from webdataset.shardlists import expand_urls

# A million shards of one pattern is a petabyte at a GB each: more is a typo or a crafted config.
MAX_URLS_PER_ENTRY = 1_000_000

_NUMBERS = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
_LETTERS = re.compile(r"^[A-Za-z]\.\.[A-Za-z](?:\.\.-?\d+)?$")


def expand_entry(entry: str) -> list[str]:
    """WebDataset's expansion of ``entry`` (``::`` between patterns, brace ranges and lists);
    ValueError naming the entry where it would name more than ``MAX_URLS_PER_ENTRY`` URLs."""
    count = sum(url_count(pattern) for pattern in entry.split("::"))
    if count > MAX_URLS_PER_ENTRY:
        raise ValueError(
            f"shards entry {entry[:200]!r} expands to {count} URLs, more than {MAX_URLS_PER_ENTRY} (a typo in a range?)"
        )
    return expand_urls(entry)


def url_count(pattern: str) -> int:
    """How many names brace expansion makes of ``pattern`` (an upper bound where a brace is escaped)."""
    count, start = 1, 0
    while (open_at := pattern.find("{", start)) >= 0:
        close_at = _matching_brace(pattern, open_at)
        if close_at is None:  # an unclosed brace is text
            break
        count *= _group_count(pattern[open_at + 1 : close_at])
        start = close_at + 1
    return count


def _group_count(body: str) -> int:
    numbers = _NUMBERS.match(body)
    if numbers:
        first, last, step = int(numbers[1]), int(numbers[2]), abs(int(numbers[3] or 1)) or 1
        return abs(last - first) // step + 1
    if _LETTERS.match(body):
        return 52  # at most every letter
    alternatives = _top_level_split(body)
    return sum(url_count(alternative) for alternative in alternatives) if len(alternatives) > 1 else 1


def _matching_brace(text: str, open_at: int) -> int | None:
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return None


def _top_level_split(body: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(body):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    return [*parts, body[start:]]
