"""Export: import -> export is bit-exact, and transformers loads the export with identical logits."""

import dataclasses
import os

import pytest
import torch
from qwen3_vl_tiny import TINY_YAML, processor_like_inputs, random_qwen3_vl, save_sharded, tiny_hf_config

from megatron_cosmos3.conversion import ConversionError, export_qwen3_vl, load_qwen3_vl
from megatron_cosmos3.conversion.__main__ import main as cli
from megatron_cosmos3.conversion.hf_qwen3_vl import build_empty
from megatron_cosmos3.conversion.mot_folder import load_mot_folder, save_mot_folder
from megatron_cosmos3.conversion.safetensors_io import iter_tensors
from megatron_cosmos3.model.config import load_model_config


def all_tensors(folder) -> dict[str, torch.Tensor]:
    return {key: tensor for _, key, tensor in iter_tensors(folder)}


def assert_bit_exact(original, exported) -> None:
    want, got = all_tensors(original), all_tensors(exported)
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


def test_round_trip_is_bit_exact_and_loads_in_transformers(hf_folder, hf_model, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    model, vision = load_qwen3_vl(hf_folder, config=load_model_config(TINY_YAML))
    with torch.no_grad():  # the Generator is ours alone: training it must not touch the export
        for layer in model.layers:
            for p in layer.generator.parameters():
                p.add_(1.0)
    out = export_qwen3_vl(model, vision, tmp_path / "hf", max_shard_bytes=100_000, copy_files_from=hf_folder)
    assert len(list(out.glob("model-*.safetensors"))) >= 2
    assert (out / "generation_config.json").is_file()  # non-weight files came along
    assert_bit_exact(hf_folder, out)

    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(str(out)).eval()
    for kind in ("text", "image", "video"):
        inputs = processor_like_inputs(kind, seed=7)
        with torch.no_grad():
            assert torch.equal(reloaded(**inputs).logits, hf_model(**inputs).logits), kind


@pytest.mark.parametrize("import_dtype", [None, torch.float32])
def test_bf16_checkpoint_round_trips_bit_exact(tmp_path, import_dtype):
    """bf16 -> (bf16 or fp32 master weights) -> bf16 loses nothing."""
    source = save_sharded(random_qwen3_vl(tiny_hf_config(), seed=1).to(torch.bfloat16), tmp_path / "bf16")
    model, vision = load_qwen3_vl(source, dtype=import_dtype)
    assert model.embed_tokens.weight.dtype == (import_dtype or torch.bfloat16)
    out = export_qwen3_vl(model, vision, tmp_path / "out", dtype=torch.bfloat16)
    assert_bit_exact(source, out)


def test_tied_embeddings_round_trip(tmp_path):
    source = save_sharded(random_qwen3_vl(tiny_hf_config(tie_word_embeddings=True)), tmp_path / "tied")
    assert "lm_head.weight" not in all_tensors(source)  # transformers stores a tied head once
    model, vision = load_qwen3_vl(source)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight
    assert_bit_exact(source, export_qwen3_vl(model, vision, tmp_path / "out"))


def test_weights_folder_keeps_both_towers(hf_folder, tmp_path):
    model, vision = load_qwen3_vl(hf_folder)
    with torch.no_grad():
        model.layers[0].generator.mlp.up_proj.weight.add_(1.0)
    save_mot_folder(model, vision, tmp_path / "mot", max_shard_bytes=50_000)
    again, again_vision = load_mot_folder(tmp_path / "mot")
    assert again.config == model.config
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(vision.state_dict().items(), again_vision.state_dict().values()):
        assert torch.equal(a, b), name


def test_command_line_round_trip(hf_folder, tmp_path, capsys):
    assert (
        cli(["import", str(hf_folder), str(tmp_path / "mot"), "--config", str(TINY_YAML), "--max-shard-size", "60KB"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "reasoner tower" in printed and "generator tower" in printed and "total" in printed
    assert cli(["export", str(tmp_path / "mot"), str(tmp_path / "hf"), "--copy-files-from", str(hf_folder)]) == 0
    assert_bit_exact(hf_folder, tmp_path / "hf")
    # A second export into the now non-empty folder is refused, not merged.
    assert cli(["export", str(tmp_path / "mot"), str(tmp_path / "hf")]) == 2
    assert "export folder is not empty" in capsys.readouterr().err


@pytest.mark.timeout(60)  # a FIFO given as --config was read until a writer came: a hang
@pytest.mark.parametrize(
    "argv, message",
    [
        # --config that is missing, a folder, a FIFO, not UTF-8: tracebacks (the command named only
        # checkpoint errors), or a hang
        (["--config", "{tmp}/none.yaml"], "error: --config: {tmp}/none.yaml: missing (no such file)"),
        (["--config", "{tmp}"], "error: --config: {tmp}: not a regular file (a folder)"),
        (["--config", "{tmp}/pipe.yaml"], "error: --config: {tmp}/pipe.yaml: not a regular file (a FIFO"),
        (["--config", "{tmp}/link.yaml"], "error: --config: {tmp}/link.yaml: not a regular file (a dangling symbolic"),
        (["--config", "{tmp}/latin.yaml"], "error: --config: {tmp}/latin.yaml: not YAML (UnicodeDecodeError"),
        # an output folder that is a file: NotADirectoryError's traceback, after the model loaded
        (["--out", "{tmp}/latin.yaml"], "error: {tmp}/latin.yaml: output folder is a file, not a folder"),
        # 0 was taken (every tensor its own shard); 400 digits were inf, and int(inf) OverflowError's traceback
        (["--max-shard-size", "0"], "argument --max-shard-size: '0' is 0 bytes; a shard holds at least 1 byte"),
        (["--max-shard-size", "9" * 400], None),
    ],
)
def test_the_command_names_a_bad_config_output_or_size_in_one_line(hf_folder, tmp_path, capsys, argv, message):
    os.mkfifo(tmp_path / "pipe.yaml")
    (tmp_path / "link.yaml").symlink_to(tmp_path / "gone.yaml")
    (tmp_path / "latin.yaml").write_bytes("model:\n  name: caf\u00e9\n".encode("latin-1"))
    argv = [a.format(tmp=tmp_path) for a in argv]
    out = argv[argv.index("--out") + 1] if "--out" in argv else str(tmp_path / "mot")
    argv = [a for a in argv if a != "--out" and a != out]
    try:
        code = cli(["import", str(hf_folder), out, *argv])
    except SystemExit as exited:  # argparse's own refusal
        code = exited.code
    err = capsys.readouterr().err
    if message is None:  # a size that is no problem: the import is written
        assert code == 0 and (tmp_path / "mot" / "model.yaml").is_file(), err
        return
    assert code == 2 and message.format(tmp=tmp_path) in err and "Traceback" not in err, err
    assert not (tmp_path / "mot").exists()


@pytest.mark.parametrize("source, message", [("none", "is missing"), ("mot/model.yaml", "is a file")])
def test_an_export_whose_support_files_folder_is_not_one_writes_nothing(hf_folder, tmp_path, capsys, source, message):
    """--copy-files-from naming nothing (or a file) was FileNotFoundError's traceback once the weights
    were written, leaving an export without its tokenizer."""
    assert cli(["import", str(hf_folder), str(tmp_path / "mot")]) == 0
    capsys.readouterr()
    argv = ["export", str(tmp_path / "mot"), str(tmp_path / "hf"), "--copy-files-from", str(tmp_path / source)]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / source}: the folder to copy tokenizer and processor files from {message}\n"
    assert not (tmp_path / "hf").exists()


def test_command_line_help():
    for argv in (["--help"], ["import", "--help"], ["export", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            cli(argv)
        assert exit_info.value.code == 0


@pytest.mark.parametrize("moe_towers", [["reasoner"], ["generator"]])
def test_a_reasoner_of_experts_is_refused_and_a_generator_of_experts_exports(hf_folder, tmp_path, moe_towers):
    """Qwen3-VL's MLPs are dense: a routed Reasoner was written under a dense config, which
    transformers loaded with fresh MLP weights and a warning. The Generator is not exported."""
    dense = load_model_config(TINY_YAML)
    config = dataclasses.replace(dense, num_experts=2, moe_top_k=1, moe_towers=moe_towers)
    model, vision = build_empty(config)
    out = tmp_path / "out"
    if moe_towers == ["reasoner"]:
        with pytest.raises(ConversionError, match=r"the Reasoner's MLPs are a mixture of experts \(num_experts=2"):
            export_qwen3_vl(model, vision, out)
        assert not out.exists()
    else:
        export_qwen3_vl(model, vision, out)
        assert sorted(all_tensors(out)) == sorted(all_tensors(hf_folder))
