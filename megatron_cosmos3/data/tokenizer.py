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
            raise ValueError(f"ByteTokenizer needs vocab_size >= {BYTE_VOCAB_SIZE} (one id per byte), got {vocab_size}")
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
        size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._id_of(config.eos_token, "eos_token")
        self.bog_id = self._id_of(config.bog_token, "bog_token") if config.bog_token else size
        for name, value in (("tokenizer size", size - 1), ("eos_token", self.eos_id), ("bog_token", self.bog_id)):
            if value >= vocab_size:
                raise ValueError(
                    f"data.tokenizer: {name} id {value} does not fit the model's vocab_size={vocab_size} "
                    f"({path} holds {size} tokens)"
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
        size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        return self._tokenizer.decode([i for i in ids if i < size], skip_special_tokens=True)


def build_tokenizer(config: TokenizerConfig, vocab_size: int) -> Tokenizer:
    return HFTokenizer(config, vocab_size) if config.path else ByteTokenizer(vocab_size)
