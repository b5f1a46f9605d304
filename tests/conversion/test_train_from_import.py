"""A training stage starts from an imported Qwen3-VL: ``stage.init_from`` names the weights folder that
``python -m megatron_cosmos3.conversion import`` wrote, in one process and under TP=2 and PP=3."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from megatron_cosmos3.conversion.__main__ import main as conversion_main
from megatron_cosmos3.conversion.mot_folder import CONFIG_FILE, load_mot_folder
from megatron_cosmos3.testing.distributed import run_on_ranks
from megatron_cosmos3.testing.training import TINY_SYNTHETIC
from megatron_cosmos3.training.config import load_config
from megatron_cosmos3.training.distributed import DistributedContext


@pytest.fixture(scope="module")
def imported(hf_folder, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("imported") / "weights"
    assert conversion_main(["import", str(hf_folder), str(folder)]) == 0
    return folder


def stage_config(folder: Path, workdir: Path, *extra: str):
    """The model section comes from the folder's own model.yaml, layered under the run's settings."""
    return load_config(
        [str(folder / CONFIG_FILE)],
        [
            *TINY_SYNTHETIC,
            "data_source=synthetic",
            "steps=1",
            "tracking.enabled=false",
            f"checkpoint.directory={workdir}",
            f"stage.init_from={folder}",
            "stage.name=midtrain",
            *extra,
        ],
    )


def initialised_parts(config, rank: int = 0, world_size: int = 1, reference: str | None = None) -> dict:
    """{name: (this rank's tensor, the folder's tensor cut to this rank's part)} after initialisation
    (``reference``: the folder to compare with, where not the one the stage starts from)."""
    from megatron_cosmos3.parallel.sharding import local_part
    from megatron_cosmos3.training.train import build_run, resume_or_initialise

    run = build_run(config, DistributedContext(rank, world_size, 0, torch.device("cpu")))
    try:
        assert resume_or_initialise(run) == (0, None)
        want, vision = load_mot_folder(reference or config.stage.init_from)
        reference = dict(want.named_parameters())
        reference.update({f"vision.{name}": param for name, param in vision.named_parameters()})
        groups = run.plan.groups
        tensor_rank, tensor_size = (groups.tensor_rank, groups.sizes.tensor) if groups else (0, 1)
        return {
            name: (param.detach().clone(), local_part(reference[name].detach(), param, tensor_rank, tensor_size))
            for name, param in run.plan.state_owner.named_parameters()
        }
    finally:
        run.batches.close()


def test_the_import_carries_the_tokenizer_and_other_support_files(hf_folder, imported):
    names = {p.name for p in hf_folder.iterdir()}
    support = {n for n in names if n != "config.json" and not n.endswith((".safetensors", ".index.json"))}
    assert "generation_config.json" in support and support <= {p.name for p in imported.iterdir()}


def test_one_process_starts_from_the_imported_weights(imported, tmp_path):
    parts = initialised_parts(stage_config(imported, tmp_path, "model.vision=null"))
    assert len(parts) == len(dict(load_mot_folder(imported)[0].named_parameters()))
    assert all(torch.equal(got, want) for got, want in parts.values())
    # A run that trains its own ViT starts it from Qwen3-VL's too.
    with_vit = initialised_parts(stage_config(imported, tmp_path / "vit"))
    vit = {name for name in with_vit if name.startswith("vision.vit.")}
    assert vit and len(with_vit) == len(parts) + len(vit)
    assert all(torch.equal(got, want) for got, want in with_vit.values())
    # The Reasoner and the Generator both start from Qwen3-VL's language model.
    assert torch.equal(*parts["layers.1.reasoner.mlp.down_proj.weight"])
    assert torch.equal(
        parts["layers.1.reasoner.mlp.down_proj.weight"][0], parts["layers.1.generator.mlp.down_proj.weight"][0]
    )


def with_extra_tensor(imported: Path, folder: Path, name: str = "dm_streams.action_in.octopus.weight") -> Path:
    """A copy of ``imported`` whose safetensors also hold ``name``, a tensor no parameter has."""
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_cosmos3.conversion.safetensors_io import SINGLE_FILE

    shutil.copytree(imported, folder)
    tensors = load_file(str(folder / SINGLE_FILE))
    tensors[name] = torch.zeros(2, 2)
    save_file(tensors, str(folder / SINGLE_FILE), metadata={"format": "pt"})
    return folder


def _parts_on_rank(rank, world_size, folder, workdir, layout, reference):
    """This rank's parts (shape, equal to the folder's) and the weights folder's warnings on it."""
    import logging

    from megatron_cosmos3.parallel.state import destroy_parallel

    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logger = logging.getLogger("megatron_cosmos3.checkpoint.weights_folder")
    logger.addHandler(handler)
    try:
        config = stage_config(Path(folder), Path(workdir) / str(rank), *layout)
        parts = initialised_parts(config, rank, world_size, reference)
        return {name: (tuple(got.shape), torch.equal(got, want)) for name, (got, want) in parts.items()}, warnings
    finally:
        logger.removeHandler(handler)
        destroy_parallel()


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "layout, ranks",
    [
        (["parallel.tensor=2", "model.vision=null"], 2),
        (["parallel.pipeline=3", "model.vision=null"], 3),
        (["parallel.tensor=2"], 2),
    ],
    ids=["tp2", "pp3", "tp2-vit"],
)
def test_every_rank_starts_from_its_part_of_the_imported_weights(imported, tmp_path, layout, ranks):
    # A tensor no parameter has is said once, by rank 0, whichever stages hold the parameters.
    folder = with_extra_tensor(imported, tmp_path / "weights")
    reports, warnings = zip(*run_on_ranks(_parts_on_rank, ranks, str(folder), str(tmp_path), layout, str(imported)))
    assert [len(said) for said in warnings] == [1] + [0] * (ranks - 1), warnings
    assert "'dm_streams.action_in.octopus.weight' match no parameter of this model" in warnings[0][0]
    for report in reports:
        assert report and all(equal for _, equal in report.values()), [n for n, (_, eq) in report.items() if not eq]
    held = [set(report) for report in reports]
    full = dict(load_mot_folder(imported)[0].named_parameters())
    if "model.vision=null" not in layout:  # and the whole ViT on each tensor rank
        full.update({f"vision.{n}": p for n, p in load_mot_folder(imported)[1].named_parameters()})
    if "parallel.tensor=2" in layout:  # both ranks hold every parameter, half of each projection
        assert held[0] == held[1] == set(full)
        assert reports[0]["layers.0.reasoner.self_attn.q_proj.weight"][0] == (32, 64)
    else:  # each pipeline rank holds (and read) only its own layer
        assert set.union(*held) == set(full)
        assert [{n.split(".")[1] for n in names if n.startswith("layers.")} for names in held] == [{"0"}, {"1"}, {"2"}]


def refused_at_start(config, error: type[Exception], match: str) -> None:
    """A one-process run of ``config`` raises ``error`` (matching ``match``) as it initialises."""
    from megatron_cosmos3.training.train import build_run, resume_or_initialise

    run = build_run(config, DistributedContext(0, 1, 0, torch.device("cpu")))
    try:
        with pytest.raises(error, match=match):
            resume_or_initialise(run)
    finally:
        run.batches.close()


def test_a_folder_of_another_architecture_is_refused_by_field(imported, tmp_path):
    changed = stage_config(imported, tmp_path, "model.vision=null")
    changed.model.rope_theta = 10_000.0
    refused_at_start(
        changed, ValueError, r"model.rope_theta=10000.0, but the weights were saved with rope_theta=5000000.0"
    )
    refused_at_start(
        stage_config(imported, tmp_path, "model.vision.rope_theta=100.0"),
        ValueError,
        r"model.vision.rope_theta=100.0, but the weights were saved with vision.rope_theta=10000.0",
    )


def test_missing_parameters_are_named_unless_a_new_embodiment_brings_them(imported, tmp_path):
    from megatron_cosmos3.checkpoint.weights_folder import load_weights_folder
    from megatron_cosmos3.training.train import build_run, resume_or_initialise

    config = stage_config(
        imported, tmp_path, "model.vision=null", "stage.new_embodiments={gripper: {action_dim: 7, rate_hz: 10.0}}"
    )
    run = build_run(config, DistributedContext(0, 1, 0, torch.device("cpu")))
    try:
        resume_or_initialise(run)  # the gripper's projections are new: fresh weights, no error
        with pytest.raises(
            KeyError, match=r"the weights lack parameter 'dm_streams.action_in.gripper.bias' and 3 more"
        ):
            load_weights_folder(imported, run.model, run.model.config, None)
    finally:
        run.batches.close()


def test_an_empty_mrope_section_is_the_scaled_default_on_both_sides_of_the_comparison(imported, hf_folder):
    """A config that leaves mrope_section empty means the head_dim's scaled Qwen3-VL split: it
    matches a folder or a checkpoint that spells that split out, and another split is refused."""
    import dataclasses

    from megatron_cosmos3.checkpoint.weights_folder import check_architecture
    from megatron_cosmos3.conversion.hf_qwen3_vl import mot_config_from_hf, read_hf_config
    from megatron_cosmos3.conversion.safetensors_io import ConversionError
    from megatron_cosmos3.model.config import load_model_config

    saved = load_model_config(imported / CONFIG_FILE)
    assert saved.mrope_section == [4, 2, 2]
    check_architecture(imported, dataclasses.replace(saved, mrope_section=[]))
    # a dense model's routing settings shape nothing; the number of experts does
    check_architecture(imported, dataclasses.replace(saved, moe_top_k=1, moe_towers=["generator"]))
    with pytest.raises(ValueError, match=r"model.num_experts=2, but the weights were saved with num_experts=0"):
        check_architecture(imported, dataclasses.replace(saved, num_experts=2))
    with pytest.raises(ValueError, match=r"model.mrope_section=\[6, 1, 1\], but the weights were saved with"):
        check_architecture(imported, dataclasses.replace(saved, mrope_section=[6, 1, 1]))
    hf_config = read_hf_config(hf_folder)
    base = dataclasses.replace(saved, mrope_section=[])
    assert mot_config_from_hf(hf_config, base=base).mrope_section == [4, 2, 2]
    with pytest.raises(ConversionError, match=r"mrope_section=\[4, 2, 2\] but the given config has \[6, 1, 1\]"):
        mot_config_from_hf(hf_config, base=dataclasses.replace(base, mrope_section=[6, 1, 1]))


def test_a_crafted_weights_folder_is_refused_naming_the_file(imported, tmp_path, caplog):
    """Its model.yaml (unknown key, wrong type, not YAML), its index (a shard outside the folder, a
    weight map of another shape) and its tensors (integers where the model holds floats)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_cosmos3.checkpoint.checkpointer import CheckpointMismatchError
    from megatron_cosmos3.checkpoint.weights_folder import load_weights_folder
    from megatron_cosmos3.conversion.safetensors_io import INDEX_FILE, SINGLE_FILE, ConversionError
    from megatron_cosmos3.model.config import load_model_config
    from megatron_cosmos3.model.mot import MoTModel

    config = load_model_config(imported / CONFIG_FILE)
    config.vision = None

    def crafted(name, change):
        folder = shutil.copytree(imported, tmp_path / name)
        change(folder)
        return folder

    text = (imported / CONFIG_FILE).read_text()
    for name, yaml, message in (
        ("unknown_key", text + "  bogus: 3\n", r"not a valid model config: Key 'bogus' not in 'MoTConfig'"),
        ("wrong_type", text.replace("num_layers: 3", "num_layers: abc"), r"not a valid model config: Value 'abc'"),
        ("not_yaml", "{{{: [", r"not YAML \(ParserError"),
    ):
        folder = crafted(name, lambda f, yaml=yaml: (f / CONFIG_FILE).write_text(yaml))
        with pytest.raises(ValueError, match=rf"{folder / CONFIG_FILE}: {message}"):
            load_weights_folder(folder, MoTModel(copy.deepcopy(config)), config, None)

    # A depth the weights do not have: named before a thousand layers are built (a million hung).
    folder = crafted("deep", lambda f: (f / CONFIG_FILE).write_text(text.replace("num_layers: 3", "num_layers: 1000")))
    with pytest.raises(ConversionError, match=rf"{folder / CONFIG_FILE}: num_layers=1000, but the weights hold 3 "):
        load_mot_folder(folder)
    # Sizes beyond any real model: refused by the model config's own bound (model/config.py
    # MODEL_SIZE_LIMITS, the one a training YAML and a checkpoint's meta.json meet), before any build.
    for field, huge in (("num_layers: 3", "num_layers: 1000000000"), ("hidden_size: 32", "hidden_size: 100000000")):
        folder = crafted(
            f"huge_{field[:-3]}", lambda f, r=(field, huge): (f / CONFIG_FILE).write_text(text.replace(*r, 1))
        )
        name, value = huge.split(": ")
        with pytest.raises(ValueError, match=rf"{folder / CONFIG_FILE}: .*{name}={value} is above [0-9,]+, far beyond"):
            load_mot_folder(folder)

    def index_of(weight_map):
        def change(folder):
            (folder / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))

        return change

    for name, weight_map, message in (
        ("escape", {"embed_tokens.weight": f"../{imported.name}/x.safetensors"}, r"not a file of the folder"),
        ("rows", [["embed_tokens.weight", "x.safetensors"]], r"'weight_map' must map tensor names to shard files"),
    ):
        folder = crafted(name, index_of(weight_map))
        with pytest.raises(ConversionError, match=rf"{folder / INDEX_FILE}: .*{message}"):
            load_weights_folder(folder, MoTModel(copy.deepcopy(config)), config, None)

    def stored_embedding(dtype):
        def change(folder):
            shard = next(p for p in folder.glob("model*.safetensors") if p.name != INDEX_FILE)
            tensors = load_file(str(shard))
            if "embed_tokens.weight" in tensors:
                tensors["embed_tokens.weight"] = tensors["embed_tokens.weight"].to(dtype)
            save_file(tensors, str(shard), metadata={"format": "pt"})

        return change

    integer_embedding = stored_embedding(torch.int64)

    from megatron_cosmos3.release.trained import RELEASE_INFO, CheckpointLoadError, load_trained_model

    for name, info in (("info_list", "[1]"), ("info_text", "{step"), ("info_step", '{"step": "abc"}')):
        folder = crafted(name, lambda f, info=info: (f / RELEASE_INFO).write_text(info))
        with pytest.raises(CheckpointLoadError, match=rf"{folder / RELEASE_INFO}: (not JSON|expected an object)"):
            load_trained_model(folder)

    folder = with_extra_tensor(imported, tmp_path / "extra")  # loads, but says what it left out (not the ViT's)
    with caplog.at_level("WARNING", logger="megatron_cosmos3.checkpoint.weights_folder"):
        load_weights_folder(folder, MoTModel(copy.deepcopy(config)), config, None)
    assert "'dm_streams.action_in.octopus.weight' match no parameter of this model" in caplog.text
    assert "vision." not in caplog.text

    assert (imported / SINGLE_FILE).is_file() or (imported / INDEX_FILE).is_file()
    folder = crafted("integers", integer_embedding)
    with pytest.raises(CheckpointMismatchError, match=r"tensor 'embed_tokens.weight' is stored as torch.int64"):
        load_weights_folder(folder, MoTModel(copy.deepcopy(config)), config, None)
    # FP8 is a float, but its values mean nothing without the scales an FP8 checkpoint keeps beside
    # them: read as plain numbers, the stage would start from wrong weights.
    folder = crafted("fp8", stored_embedding(torch.float8_e4m3fn))
    with pytest.raises(CheckpointMismatchError, match=r"tensor 'embed_tokens.weight' is stored as torch.float8_e4m3fn"):
        load_weights_folder(folder, MoTModel(copy.deepcopy(config)), config, None)


def test_a_release_folder_whose_file_fails_its_checksum_is_refused_as_a_stage_start(imported, tmp_path):
    """stage.init_from read a release folder's weights without its checksums.json (cosmos3-generate
    checks them): a damaged shard whose values stayed finite started the stage from wrong weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_cosmos3.checkpoint.safe_reader import CheckpointCorruptError, write_manifest
    from megatron_cosmos3.conversion.safetensors_io import SINGLE_FILE

    folder = Path(shutil.copytree(imported, tmp_path / "release"))
    write_manifest(folder, extra=tuple(p.name for p in folder.iterdir() if p.is_file()))  # as export seals it
    tensors = load_file(str(folder / SINGLE_FILE))
    tensors["embed_tokens.weight"][0, 0] += 1.0  # finite: nothing but the checksum can tell
    save_file(tensors, str(folder / SINGLE_FILE), metadata={"format": "pt"})
    config = stage_config(folder, tmp_path / "run", "model.vision=null")
    refused_at_start(config, CheckpointCorruptError, rf"file {SINGLE_FILE} .*does not match its sha256 checksum")


def test_weights_holding_nan_or_inf_are_refused_at_load_naming_the_tensor(imported, tmp_path):
    """Not left to the non-finite-step guard after max_consecutive_nonfinite_steps steps (the same folder,
    finite, starts: test_one_process_starts_from_the_imported_weights)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_cosmos3.checkpoint.finite import NonFiniteWeightsError
    from megatron_cosmos3.conversion.safetensors_io import SINGLE_FILE

    name = "layers.1.generator.mlp.down_proj.weight"
    for value in (float("nan"), float("inf")):
        folder = Path(shutil.copytree(imported, tmp_path / str(value)))
        tensors = load_file(str(folder / SINGLE_FILE))
        tensors[name][0, 1] = value
        save_file(tensors, str(folder / SINGLE_FILE), metadata={"format": "pt"})
        config = stage_config(folder, tmp_path / f"run-{value}", "model.vision=null")
        refused_at_start(
            config, NonFiniteWeightsError, rf"^stage.init_from={folder}: parameter '{name}' holds NaN or inf"
        )
