"""Text -> token ids for the AR section.

``ByteTokenizer`` is the tokenizer of the tiny models this repository trains on CPU: UTF-8 bytes
are the ids, and EOS / BOG take the last two ids of the vocabulary (``vocab_size - 2`` and
``vocab_size - 1``, the convention of ``data/synthetic_packs.py``). With a 256-entry vocabulary
they are 0xFE and 0xFF, two bytes that never occur in UTF-8, so no text can forge them.

``HFTokenizer`` is the tokenizer of a model converted from Qwen3-VL: the ``tokenizer.json`` of a
local Hugging Face folder (the Qwen3-VL folder itself, or an exported one), read with the
``tokenizers`` library, behind the same members (``encode``, EOS, BOG, and ``decode`` for generated
text). ``build_tokenizer`` picks one from ``data.tokenizer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    eos_id: int
    bog_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


# The smallest vocabulary ``ByteTokenizer`` takes: one id per byte.
BYTE_VOCAB_SIZE = 256


class ByteTokenizer:
    """UTF-8 bytes as ids; EOS = vocab_size - 2, BOG = vocab_size - 1 (see module doc)."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < BYTE_VOCAB_SIZE:
            raise ValueError(
                f"model.vocab_size={vocab_size} is below the byte tokenizer's {BYTE_VOCAB_SIZE} ids (one per byte; "
                f"data.tokenizer.path is empty): it needs vocab_size >= {BYTE_VOCAB_SIZE}, or a tokenizer folder"
            )
        self.vocab_size = vocab_size
        self.eos_id, self.bog_id = vocab_size - 2, vocab_size - 1

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """The text of byte ids; EOS, BOG and invalid UTF-8 (a model's mistakes) become U+FFFD."""
        return bytes(i if i < 256 else 0xFF for i in ids).decode("utf-8", errors="replace")


TOKENIZER_FILE = "tokenizer.json"


@dataclass
class TokenizerConfig:
    """``data.tokenizer``: which tokenizer turns captions, instructions and answers into AR ids.

    path: "" = ``ByteTokenizer`` (the tiny CPU models; vocabulary >= 256); else a local folder
        holding a Hugging Face ``tokenizer.json`` (e.g. the Qwen3-VL folder a run was imported from).
    eos_token: the token that ends the AR section (Qwen3-VL's chat turns end with ``<|im_end|>``).
    bog_token: the token that begins generation (the DM section follows it). Qwen3-VL has no such
        token: "" takes the first id after the tokenizer's own, one of the spare rows of its
        embedding (151,669 tokens, 151,936 rows); its embedding is learnt from scratch.
    """

    path: str = ""
    eos_token: str = "<|im_end|>"
    bog_token: str = ""


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (no special tokens added: the layout places EOS and BOG)."""

    def __init__(self, config: TokenizerConfig, vocab_size: int) -> None:
        from tokenizers import Tokenizer as FastTokenizer

        path = Path(config.path) / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"data.tokenizer.path={config.path!r}: no {TOKENIZER_FILE} there")
        self._path = path
        try:
            self._tokenizer = FastTokenizer.from_file(str(path))
        except Exception as error:  # the Rust library raises a bare Exception that names no file
            raise ValueError(
                f"data.tokenizer.path={config.path!r}: {path} is not a tokenizer file Hugging Face tokenizers reads "
                f"({error})"
            ) from None
        # Ids, not the count of tokens: a tokenizer.json may leave gaps, or number an added token past them.
        size = id_span(self._tokenizer)
        self._size = size
        self.eos_id = self._id_of(config.eos_token, "eos_token")
        self.bog_id = self._id_of(config.bog_token, "bog_token") if config.bog_token else size
        where = f"data.tokenizer.path={config.path!r} ({path})"
        if size > vocab_size:
            raise ValueError(
                f"model.vocab_size={vocab_size} is smaller than the tokenizer of {where}, whose ids (added and "
                f"special tokens included) run to {size - 1}: it needs model.vocab_size >= {size}"
            )
        if self.bog_id >= vocab_size:  # "" takes the first id after the tokenizer's: one spare row
            raise ValueError(
                f"model.vocab_size={vocab_size} leaves no row for data.tokenizer.bog_token={config.bog_token!r}: "
                f"it takes id {self.bog_id}, the first after the {size} ids of {where}; it needs "
                f"model.vocab_size >= {self.bog_id + 1} (or a bog_token of the tokenizer)"
            )

    def _id_of(self, token: str, field: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"data.tokenizer.{field}={token!r} is not a token of {self._path}")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``; special tokens (and ids beyond the tokenizer's, e.g. BOG) are left out."""
        return self._tokenizer.decode([i for i in ids if i < self._size], skip_special_tokens=True)


def id_span(tokenizer) -> int:
    """One past the largest id of a ``tokenizers.Tokenizer`` (added and special tokens included): the
    embedding rows its ids need. Its ``get_vocab_size`` counts tokens, which is less where ids leave gaps."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1


def build_tokenizer(config: TokenizerConfig, vocab_size: int) -> Tokenizer:
    return HFTokenizer(config, vocab_size) if config.path else ByteTokenizer(vocab_size)
