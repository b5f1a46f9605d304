"""Every broken input is a clear error naming the file and the key; hub-format configs import."""

import dataclasses
import json
import shutil

import pytest
import torch
from qwen3_vl_tiny import TINY_YAML
from safetensors.torch import load_file, save_file

from megatron_cosmos3.conversion import ConversionError, load_qwen3_vl
from megatron_cosmos3.model.config import load_model_config

INDEX = "model.safetensors.index.json"
UP_PROJ = "model.language_model.layers.1.mlp.up_proj.weight"


@pytest.fixture
def folder(hf_folder, tmp_path):
    """A private copy of the tiny checkpoint to break."""
    return shutil.copytree(hf_folder, tmp_path / "copy")


def edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def shard_of(folder, key: str):
    return folder / json.loads((folder / INDEX).read_text())["weight_map"][key]


def rewrite_shard(path, change) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_folder_that_is_not_qwen3_vl(folder, tmp_path):
    with pytest.raises(ConversionError, match="no config.json: not a Hugging Face model folder"):
        load_qwen3_vl(tmp_path)
    edit_json(folder / "config.json", lambda c: c.update(model_type="qwen2_5_vl"))
    with pytest.raises(ConversionError, match=r"config.json: model_type='qwen2_5_vl', expected 'qwen3_vl'"):
        load_qwen3_vl(folder)


def test_missing_tensor(folder):
    rewrite_shard(shard_of(folder, UP_PROJ), lambda t: t.pop(UP_PROJ))
    edit_json(folder / INDEX, lambda index: index["weight_map"].pop(UP_PROJ))
    with pytest.raises(ConversionError, match=f"missing tensor '{UP_PROJ}'"):
        load_qwen3_vl(folder)


def test_tensor_the_index_promises_but_the_shard_lacks(folder):
    shard = shard_of(folder, UP_PROJ)
    rewrite_shard(shard, lambda t: t.pop(UP_PROJ))
    message = f"{shard.name}: the index lists tensor '{UP_PROJ}' but the shard lacks it"
    with pytest.raises(ConversionError, match=message):
        load_qwen3_vl(folder)


def test_extra_tensor(folder):
    extra = "model.language_model.layers.3.mlp.up_proj.weight"  # a fourth layer the config does not have
    shard = shard_of(folder, UP_PROJ)
    rewrite_shard(shard, lambda t: t.update({extra: t[UP_PROJ].clone()}))
    edit_json(folder / INDEX, lambda index: index["weight_map"].update({extra: shard.name}))
    with pytest.raises(ConversionError, match=f"unexpected tensor '{extra}'"):
        load_qwen3_vl(folder)


def test_shape_that_does_not_match_the_config(folder):
    edit_json(folder / "config.json", lambda c: c["text_config"].update(intermediate_size=96))
    with pytest.raises(
        ConversionError,
        match=r"tensor 'model\.language_model\.layers\.\d\.mlp\.\w+_proj\.weight' "
        r"has shape \(\d+, \d+\), but the config gives",
    ):
        load_qwen3_vl(folder)


def test_truncated_shard(folder):
    shard = shard_of(folder, UP_PROJ)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ConversionError, match=f"{shard.name}: shard is truncated or corrupt"):
        load_qwen3_vl(folder)


def test_missing_shard_file(folder):
    shard = shard_of(folder, UP_PROJ)
    shard.unlink()
    with pytest.raises(ConversionError, match=f"{shard.name}: shard file is missing"):
        load_qwen3_vl(folder)


def test_no_safetensors_weights(folder):
    for path in list(folder.glob("model*.safetensors*")):
        path.unlink()
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"no model.safetensors.index.json or model.safetensors .*only safetens"):
        load_qwen3_vl(folder)


def test_given_config_must_agree_with_the_checkpoint(folder):
    wider = load_model_config(TINY_YAML)
    wider.ffn_hidden_size = 256
    with pytest.raises(ConversionError, match="the checkpoint has ffn_hidden_size=128 but the given config has 256"):
        load_qwen3_vl(folder, config=wider)
    deeper_vit = load_model_config(TINY_YAML)
    deeper_vit.vision.depth = 27
    with pytest.raises(ConversionError, match="the checkpoint has vision.depth=3 but the given config has 27"):
        load_qwen3_vl(folder, config=deeper_vit)
    # A config of experts was an 'unexpected tensor' or 'missing tensor' error that blamed the checkpoint.
    for towers in (["reasoner", "generator"], ["generator"]):
        experts = dataclasses.replace(load_model_config(TINY_YAML), num_experts=2, moe_top_k=1, moe_towers=towers)
        with pytest.raises(ConversionError, match=r"config.json: the given config has num_experts=2 .* MLPs are dense"):
            load_qwen3_vl(folder, config=experts)


def test_hub_format_config_imports_the_same(folder, hf_folder):
    """Hub checkpoints were saved by transformers 4.57: rope_scaling + rope_theta, vision model_type
    'qwen3_vl', torch_dtype. They give the same model config."""

    def legacy(config):
        text = config["text_config"]
        rope = text.pop("rope_parameters")
        text["rope_scaling"] = {
            "mrope_interleaved": True,
            "mrope_section": rope["mrope_section"],
            "rope_type": "default",
        }
        text["rope_theta"] = rope["rope_theta"]
        config["vision_config"]["model_type"] = "qwen3_vl"
        config["vision_config"].pop("rope_parameters")
        config["torch_dtype"] = config.pop("dtype")

    edit_json(folder / "config.json", legacy)
    assert load_qwen3_vl(folder)[0].config == load_qwen3_vl(hf_folder)[0].config


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("config.json", b"[1]", "config.json: holds a JSON list, not an object"),
        ("config.json", b'{"model_type": "\xff"}', "config.json: not UTF-8 text ('utf-8' codec can't decode"),
        ("config.json", b"[" * 100_000, "config.json: not JSON (nested deeper than the parser reads)"),
        # parsers disagree on which value of a key given twice wins: json took the last one silently
        (
            "config.json",
            b'{"model_type": "qwen3_vl", "model_type": "x"}',
            "config.json: not JSON (key(s) ['model_type']",
        ),
        ("config.json", {"hidden_size": "32"}, "config.json: Validation error for field 'hidden_size'"),
        ("config.json", {"num_hidden_layers": 2.5}, "config.json: Validation error for field 'num_hidden_layers'"),
        ("config.json", {"vision": [99]}, "config.json: model.vision.deepstack_visual_indexes=[99] must be distinct"),
        # Absurd sizes: refused before transformers or the model builds by them (they hung or ran out of memory).
        ("config.json", {"num_hidden_layers": 10**9}, "config.json: text_config.num_hidden_layers=1000000000: must be"),
        ("config.json", {"hidden_size": 10**9}, "config.json: text_config.hidden_size=1000000000: must be 1..65536"),
        ("config.json", {"vocab_size": 0}, "config.json: text_config.vocab_size=0: must be 1..4194304"),
        (
            "config.json",
            {"num_hidden_layers": 1000},
            "config.json: text_config.num_hidden_layers=1000, but the weights hold 3 (model.language_model.layers.<i>)",
        ),
        (INDEX, b'{"weight_map": {"\xff": 1}}', f"{INDEX}: not UTF-8 text ('utf-8'"),
        (INDEX, b"[" * 100_000, f"{INDEX}: not JSON (nested deeper than the parser reads)"),
        (
            INDEX,
            b'{"weight_map": {}, "weight_map": {"a": "b"}}',
            f"{INDEX}: not JSON (key(s) ['weight_map'] given twice)",
        ),
        (INDEX, b"[1]", f"{INDEX}: 'weight_map' must map tensor names to shard files"),
    ],
)
def test_a_crafted_config_or_index_is_a_conversion_error_naming_the_file(folder, name, text, message):
    """Each was a traceback (AttributeError, UnicodeDecodeError, RecursionError, transformers' own
    validation error, a VisionConfig ValueError) that ``cosmos3-convert`` did not turn into one line."""
    if isinstance(text, dict):
        if "vision" in text:
            edit_json(folder / name, lambda c: c["vision_config"].update(deepstack_visual_indexes=text["vision"]))
        else:
            edit_json(folder / name, lambda c: c["text_config"].update(text))
    else:
        (folder / name).write_bytes(text)
    with pytest.raises(ConversionError) as error:
        load_qwen3_vl(folder)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_config_the_weights_do_not_fit_is_refused_before_the_model_is_allocated(folder, hf_folder, monkeypatch):
    """A vocabulary of four million (under the bounds; 2 GB of embeddings and head) that the weights
    do not have: named from the shards' headers while the model is still on the meta device."""
    from megatron_cosmos3.model.mot import MoTModel

    allocated = []
    materialize = MoTModel.materialize
    monkeypatch.setattr(
        MoTModel, "materialize", lambda self, device: allocated.append(device) or materialize(self, device)
    )
    edit_json(folder / "config.json", lambda c: c["text_config"].update(vocab_size=4_000_000))
    with pytest.raises(ConversionError, match=r"tensor '.*embed_tokens.weight' has shape \(320, 64\), but the config"):
        load_qwen3_vl(folder)
    assert allocated == []
    load_qwen3_vl(hf_folder)  # control: a folder that fits is allocated once
    assert allocated == ["cpu"]


@pytest.mark.parametrize("dtype", [torch.int64, torch.float8_e4m3fn, torch.uint16])
def test_an_embedding_stored_in_no_float_width_is_named_as_the_model_dtype_it_would_give(folder, dtype):
    """The model is built in the embedding's stored dtype: F8_E4M3 and U16 were a raw KeyError out
    of the dtype table, and I64 built an integer model."""
    key = "model.language_model.embed_tokens.weight"
    rewrite_shard(shard_of(folder, key), lambda tensors: tensors.update({key: tensors[key].to(dtype)}))
    with pytest.raises(ConversionError, match=rf"{shard_of(folder, key)}: tensor '{key}' is stored as \w+, not as"):
        load_qwen3_vl(folder)
