"""The loader tokenises text with a local Hugging Face tokenizer (``data.tokenizer.path``), as a run
started from Qwen3-VL must: its ids, its EOS token, and a BOG id from the spare vocabulary rows."""

from __future__ import annotations

from pathlib import Path

import pytest
from world_helpers import data_config, model_config, tiny_world

from megatron_cosmos3.data.loader import PackedLoader
from megatron_cosmos3.data.tokenizer import HFTokenizer, TokenizerConfig, build_tokenizer
from megatron_cosmos3.testing.training import TINY_MODEL, TINY_SYNTHETIC
from megatron_cosmos3.training.config import load_config

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
        (
            dict(),
            64,
            r"model.vocab_size=64 is smaller than the tokenizer of data.tokenizer.path='.*' \(.*tokenizer.json\), "
            r"whose ids \(added and special tokens included\) run to 97: it needs model.vocab_size >= 98",
        ),
        (
            dict(),
            98,
            r"model.vocab_size=98 leaves no row for data.tokenizer.bog_token='': it takes id 98, the first after "
            r"the 98 ids of data.tokenizer.path=.*; it needs model.vocab_size >= 99",
        ),
    ],
)
def test_a_tokenizer_that_does_not_fit_the_model_is_refused_by_field(tokenizer_folder, config, vocab_size, message):
    with pytest.raises(ValueError, match=message):
        HFTokenizer(TokenizerConfig(str(tokenizer_folder), **config), vocab_size)


def test_ids_past_a_gap_count_as_the_tokenizers_own(tmp_path):
    """A tokenizer.json whose ids leave a gap (here 2): tokenizers' get_vocab_size counts 5 tokens, but
    ids run to 5. Counting took BOG = 5, the id of 'b' (and let a vocabulary of 5 rows in)."""
    from tokenizers import Tokenizer, models

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 5}, unk_token="[UNK]"))
    tokenizer.add_special_tokens(SPECIAL)  # ids 3 and 4: after the count, in the gap
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 5
    hf = HFTokenizer(TokenizerConfig(str(tmp_path)), vocab_size=7)
    assert hf.encode("b") == [5]
    assert hf.bog_id == 6 and hf.bog_id not in tokenizer.get_vocab(with_added_tokens=True).values()
    assert hf.decode([5, hf.eos_id, hf.bog_id]) == "b"
    for vocab_size, message in ((5, r"run to 5: it needs model.vocab_size >= 6"), (6, r"model.vocab_size >= 7")):
        with pytest.raises(ValueError, match=rf"model.vocab_size={vocab_size} .*{message}"):
            HFTokenizer(TokenizerConfig(str(tmp_path)), vocab_size)


# Runs that read text with the tokenizer: the eval suite's, or shards' (load_config reads no shard).
TEXT_READERS = {
    "eval.suite": ["eval.suite={}"],
    "shards": [
        "data_source=shards",
        "data.stages={pretrain: {datasets: {w: 1.0}, tasks: {understanding: 1.0}}}",
        "data.datasets=[{name: w, shards: [nowhere]}]",
    ],
}


@pytest.mark.parametrize("reader", sorted(TEXT_READERS))
def test_a_tokenizer_larger_than_the_model_is_refused_at_load(tokenizer_folder, reader):
    """The loader (every rank, once the run had started) and the suite (after the first steps) were
    the first to build the tokenizer; now load_config does, naming model.vocab_size, the path and
    both sizes. 98 ids need 99 rows (BOG takes the first id after them)."""
    base = [*TINY_MODEL, *TINY_SYNTHETIC, *TEXT_READERS[reader], f"data.tokenizer.path={tokenizer_folder}"]
    with pytest.raises(ValueError, match=rf"model.vocab_size=64 is smaller .*path='{tokenizer_folder}'.* >= 98"):
        load_config(None, base)  # TINY_MODEL's vocab_size=64
    with pytest.raises(ValueError, match=r"model.vocab_size=98 leaves no row for data.tokenizer.bog_token=''"):
        load_config(None, [*base, "model.vocab_size=98"])
    assert load_config(None, [*base, "model.vocab_size=99"]).model.vocab_size == 99
    # A run that reads no text never builds the tokenizer: nothing to refuse.
    synthetic = [*TINY_MODEL, *TINY_SYNTHETIC, f"data.tokenizer.path={tokenizer_folder}"]
    assert load_config(None, synthetic).model.vocab_size == 64


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
