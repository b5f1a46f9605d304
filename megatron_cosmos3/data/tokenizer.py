"""Text -> token ids for the AR section.

``ByteTokenizer`` is the tokenizer of the tiny models this repository trains on CPU: UTF-8 bytes
are the ids, and EOS / BOG take the last two ids of the vocabulary (``vocab_size - 2`` and
``vocab_size - 1``, the convention of ``data/synthetic_packs.py``). With a 256-entry vocabulary
they are 0xFE and 0xFF, two bytes that never occur in UTF-8, so no text can forge them. A model
converted from Qwen3-VL uses its own tokenizer behind the same three members.
"""

from __future__ import annotations

from typing import Protocol


class Tokenizer(Protocol):
    eos_id: int
    bog_id: int

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids; EOS = vocab_size - 2, BOG = vocab_size - 1 (see module doc)."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 256:
            raise ValueError(f"ByteTokenizer needs vocab_size >= 256 (one id per byte), got {vocab_size}")
        self.vocab_size = vocab_size
        self.eos_id, self.bog_id = vocab_size - 2, vocab_size - 1

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))
