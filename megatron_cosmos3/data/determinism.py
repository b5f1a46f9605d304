"""Counter-based randomness: every random choice of the data stream is a pure function of its keys.

The loader never carries a random generator's hidden state: the dataset chosen for shard slot j,
the task of sample i of slot j, the shuffle-buffer slot replaced by the n-th insertion — each is a
hash of (seed, what it is, where it is). That is what makes the stream identical whatever the
number of dataloader workers, and its resumable state a handful of counters.
"""

from __future__ import annotations

import hashlib

import numpy as np

_MASK = (1 << 64) - 1
# The largest seed a user may give (a config, a request, a command line): torch's generators take
# any seed in [-2**63, 2**64) and numpy's only those >= 0, and hash64 keeps 64 bits, so 2**64 + s
# would silently draw what s draws. [0, 2**63) fits all three, with room for a per-case seed + i.
MAX_SEED = 2**63 - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _as_int(key: int | str) -> int:
    if isinstance(key, str):  # Python's hash() of a str differs between processes; blake2b does not
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return int(key) & _MASK


def hash64(*keys: int | str) -> int:
    """A well-mixed 64-bit hash of ``keys`` (ints or strs), stable across processes and runs."""
    h = 0x243F6A8885A308D3
    for key in keys:
        h = _splitmix64(h ^ _splitmix64(_as_int(key)))
    return h


def seed_problem(name: str, value: object) -> str | None:
    """What is wrong with ``value`` as the seed ``name`` (an int in [0, MAX_SEED]), or None: a
    seed out of range was a raw 'Overflow when unpacking long long' from torch or 'expected
    non-negative integer' from numpy, deep in the run."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        return f"{name}={value!r} must be an integer in [0, 2**63 - 1]"
    return None


def uniform(*keys: int | str) -> float:
    """A uniform draw in [0, 1) determined by ``keys``."""
    return (hash64(*keys) >> 11) / float(1 << 53)


def randbelow(n: int, *keys: int | str) -> int:
    """A uniform integer in [0, n) determined by ``keys`` (bias < n / 2**64)."""
    if n <= 0:
        raise ValueError(f"randbelow needs n > 0, got {n}")
    return hash64(*keys) % n


def permutation(n: int, *keys: int | str) -> np.ndarray:
    """A permutation of range(n) determined by ``keys``."""
    return np.random.default_rng(hash64(*keys)).permutation(n)
