"""The loader tokenises text with a local Hugging Face tokenizer (``data.tokenizer.path``), as a run
started from Qwen3-VL must: its ids, its EOS token, and a BOG id from the spare vocabulary rows."""

from __future__ import annotations

from pathlib import Path

import pytest
from world_helpers import data_config, model_config, tiny_world

from megatron_cosmos3.data.loader import PackedLoader
from megatron_cosmos3.data.tokenizer import HFTokenizer, TokenizerConfig, build_tokenizer

# Printable ASCII, one token per character, numbered backwards: ids that UTF-8 bytes are not.
CHARACTERS = [chr(code) for code in range(32, 127)][::-1]
SPECIAL = ["<|im_end|>", "<|extra|>"]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{token: 1 + i for i, token in enumerate(SPECIAL)}}
    vocab.update({c: len(SPECIAL) + 1 + i for i, c in enumerate(CHARACTERS)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.add_special_tokens(SPECIAL)
    tokenizer.decoder = decoders.Fuse()  # characters back into one string
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_ids_eos_and_bog_come_from_the_tokenizer_file(tokenizer_folder):
    tokenizer = build_tokenizer(TokenizerConfig(str(tokenizer_folder)), vocab_size=256)
    assert isinstance(tokenizer, HFTokenizer)
    ids = tokenizer.encode("a red ball")
    assert ids == [3 + CHARACTERS.index(c) for c in "a red ball"] != list(b"a red ball")
    assert tokenizer.eos_id == 1  # <|im_end|>
    assert tokenizer.bog_id == 3 + len(CHARACTERS)  # the first id after the tokenizer's own
    named = build_tokenizer(TokenizerConfig(str(tokenizer_folder), bog_token="<|extra|>"), vocab_size=256)
    assert named.bog_id == 2


def test_decode_gives_back_the_text_without_special_tokens(tokenizer_folder):
    """Generated ids decode to their text; EOS and the BOG id (beyond the tokenizer's) are left out."""
    tokenizer = build_tokenizer(TokenizerConfig(str(tokenizer_folder)), vocab_size=256)
    ids = tokenizer.encode("a red ball")
    assert tokenizer.decode(ids + [tokenizer.eos_id, tokenizer.bog_id]) == "a red ball"
    assert tokenizer.decode(ids[:5]) == "a red"


@pytest.mark.parametrize(
    "config, vocab_size, message",
    [
        (dict(eos_token="<|endoftext|>"), 256, r"data.tokenizer.eos_token='<\|endoftext\|>' is not a token of"),
        (dict(bog_token="<bog>"), 256, r"data.tokenizer.bog_token='<bog>' is not a token of"),
        (dict(), 64, r"tokenizer size id 97 does not fit the model's vocab_size=64"),
        (dict(), 98, r"bog_token id 98 does not fit the model's vocab_size=98"),
    ],
)
def test_a_tokenizer_that_does_not_fit_the_model_is_refused_by_field(tokenizer_folder, config, vocab_size, message):
    with pytest.raises(ValueError, match=message):
        HFTokenizer(TokenizerConfig(str(tokenizer_folder), **config), vocab_size)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", r"EOF while parsing"),
        (b"\xff\xfe{}", r"stream did not contain valid UTF-8"),
        (b"[" * 100_000, r"recursion limit exceeded|expected struct Tokenizer"),
        (b'{"version": "1.0"}', r"Model missing"),
    ],
)
def test_a_tokenizer_json_the_library_cannot_read_is_named(tmp_path, data, message):
    """tokenizers raised a bare Exception ('EOF while parsing a value at line 1 column 0') naming no file."""
    (tmp_path / "tokenizer.json").write_bytes(data)
    where = rf"data.tokenizer.path='{tmp_path}': {tmp_path / 'tokenizer.json'} is not a tokenizer file"
    with pytest.raises(ValueError, match=rf"{where} Hugging Face tokenizers reads \(.*({message})"):
        HFTokenizer(TokenizerConfig(str(tmp_path)), 256)


def test_a_folder_without_tokenizer_json_is_refused_before_loading(tmp_path):
    config = data_config([str(tiny_world()["latent"])], tokenizer=TokenizerConfig(str(tmp_path)))
    with pytest.raises(ValueError, match=r"tokenizer.path='.*' holds no tokenizer.json"):
        config.validate()


def test_packs_hold_the_tokenizers_ids(tokenizer_folder):
    config = data_config([str(tiny_world()["latent"])], tokenizer=TokenizerConfig(str(tokenizer_folder)))
    with PackedLoader(config, model_config()) as loader:
        pack = next(loader)
    tokenizer = HFTokenizer(config.tokenizer, model_config().vocab_size)
    bounds = pack.ar_cu_seqlens.tolist()
    texts = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        ids = pack.ar_token_ids[start:stop]
        if pack.ar_is_vision is not None:
            ids = ids[~pack.ar_is_vision[start:stop]]
        assert tokenizer.eos_id in ids.tolist()  # every AR section ends its text with <|im_end|>
        text_ids = [i for i in ids.tolist() if i not in (tokenizer.eos_id, tokenizer.bog_id)]
        assert all(3 <= i < 3 + len(CHARACTERS) for i in text_ids)  # characters only, never [UNK]
        texts.append("".join(CHARACTERS[i - 3] for i in text_ids))
    assert any("ball" in text for text in texts), texts
    assert bool((pack.ar_token_ids == tokenizer.bog_id).any())  # generation samples begin with BOG
    assert int(pack.ar_token_ids.max()) < model_config().vocab_size
