"""The stage configs layer over the main job's config and validate before anything starts."""

import os
import re
from pathlib import Path

import pytest

from megatron_cosmos3.training.config import load_config, task_table

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "stage, starts_from, frozen",
    [
        ("pretrain", "", []),
        ("midtrain", "outputs/pretrain/checkpoints", []),
        (
            "posttrain",
            "outputs/midtrain/checkpoints",
            ["layers.*.reasoner.*", "embed_tokens.*", "lm_head.*", "reasoner_norm.*"],
        ),
    ],
)
def test_stage_config_layers_over_the_base(stage, starts_from, frozen):
    config = load_config([str(REPO / "configs/tiny_cpu.yaml"), str(REPO / f"configs/stages/{stage}.yaml")])
    assert config.stage.name == config.data.stage == stage  # the data mixture follows the stage
    assert config.stage.init_from == starts_from and list(config.stage.freeze) == frozen
    assert task_table(config) == sorted(config.data.stages[stage].tasks)
    assert config.checkpoint.directory == f"outputs/{stage}/checkpoints"


def test_unknown_task_in_a_stage_mixture_is_named():
    with pytest.raises(ValueError, match="stages.pretrain.tasks"):
        load_config(str(REPO / "configs/tiny_cpu.yaml"), ["data.stages.pretrain.tasks={juggling: 1.0}"])


def test_a_vit_whose_tokens_do_not_cover_the_datas_picture_grid_is_refused_when_the_config_loads():
    """Pictures are cut into 32x32-pixel ViT tokens: a ViT of 14-pixel patches merged 2x2 can never
    read them (synthetic packs carry their own random pixels, so only shards and the suite refuse)."""
    from megatron_cosmos3.testing.training import TINY_MODEL, TINY_VIT

    odd_vit = [*TINY_MODEL, *TINY_VIT, "model.vocab_size=256", "model.vision.patch_size=14"]  # the suite's byte ids
    with pytest.raises(ValueError, match=r"model.vision: patch_size\*spatial_merge_size=14\*2=28, but the data's"):
        load_config(None, [*odd_vit, "eval.suite={}"])
    load_config(None, odd_vit)  # synthetic packs: nothing cuts pictures
    load_config(None, [*odd_vit, "model.vision.patch_size=8", "model.vision.spatial_merge_size=4", "eval.suite={}"])
    grey = [*TINY_MODEL, *TINY_VIT, "model.vocab_size=256", "model.vision.in_channels=1", "eval.suite={}"]
    with pytest.raises(ValueError, match=r"model.vision: in_channels=1, but the data's pictures are RGB"):
        load_config(None, grey)


@pytest.mark.parametrize(
    "override, message",
    [
        # NaN passes every range check written as a comparison (nan <= 0 is false): refused by key.
        ("optimizer.lr=nan", r"optimizer.lr=nan \(in the overrides\) must be a finite number"),
        ("optimizer.grad_clip=.inf", r"optimizer.grad_clip=inf \(in the overrides\) must be a finite number"),
        ("stage.lr_multipliers={'layers.*': nan}", r"stage.lr_multipliers.layers.\*=nan .* must be a finite number"),
        ("model.embodiments.arm.rate_hz=nan", r"model.embodiments.arm.rate_hz=nan"),
        ("optimizer.weight_decay=-0.1", r"optimizer.weight_decay=-0.1 must be >= 0"),
        ("optimizer.flow_matching_weight=-1", r"optimizer.flow_matching_weight=-1.0 must be >= 0"),
        ("stage.lr_multipliers={'layers.*': -2}", r"a learning-rate multiplier must be >= 0"),
        ("tracking.tracking_uri=''", r"tracking.tracking_uri is empty"),
        ("tracking.flush_timeout_s=-1", r"tracking.flush_timeout_s=-1.0 must be >= 0"),
        ("tracking.sample_steps=0", r"tracking.sample_steps=0 must be in \[1, 1000\] \(solvers.MAX_STEPS\)"),
        ("tracking.sample_steps=1000000000", r"tracking.sample_steps=1000000000 must be in \[1, 1000\]"),
        ("tracking.experiment=' '", r"tracking.experiment is empty"),
        ("steps=abc", r"steps"),
        ("optimizer.lr=${nope}", r"the overrides: Interpolation key 'nope' not found"),
        # Sizes beyond any real model: refused at load, before a model of terabytes is built.
        ("model.num_layers=1000000000", r"model.num_layers=1000000000 is above 1,024"),
        ("model.vocab_size=10000000000", r"model.vocab_size=10000000000 is above 4,194,304"),
        ("model.num_experts=100000000", r"model.num_experts=100000000 must be 0 or an int in 1..4,096"),
        # Seeds torch or numpy refuse ('Overflow when unpacking long long' at the first manual_seed), or
        # that hash64 would alias (2**64 draws what 0 draws).
        ("seed=18446744073709551616", r"^seed=18446744073709551616 must be an integer in \[0, 2\*\*63 - 1\]"),
        ("data.seed=-1", r"^data.seed=-1 must be an integer"),
        ("data.encoders.pooled_seed=-1", r"^data.encoders.pooled_seed=-1 must be an integer"),
        ("synthetic.tasks=[]", r"^synthetic.tasks is empty; name one or more of \['understanding'"),
        # A stage's new embodiment passed the config and failed when the model was built, in the run.
        ("stage.new_embodiments={x: {action_dim: 0}}", r"stage.new_embodiments: model.embodiments.x.action_dim"),
        ("stage.new_embodiments={x: {rate_hz: -5}}", r"stage.new_embodiments: model.embodiments.x.rate_hz must"),
        # A mapping where a list belongs (or the other way) was OmegaConf's raw TypeError 'Cannot
        # merge incompatible container types', naming no key.
        ("stage.freeze={a: 1}", r"^stage.freeze: a mapping where a list belongs, got \{'a': 1\}"),
        ("model.vision=[1]", r"^model.vision: a list where a mapping belongs"),
        ("eval.suite={closed_loop_tasks: {a: 1}}", r"^eval.suite.closed_loop_tasks: a mapping where a list belongs"),
        # A typo inside a list item was OmegaConf's 'full_key: shard', naming neither list nor item.
        ("eval.datasets=[{shard: a}]", r"^eval.datasets\[0\]: unknown key 'shard' \(did you mean 'shards'\?\)"),
        ("data.datasets=[{name: a}, {nmae: b}]", r"^data.datasets\[1\]: unknown key 'nmae' \(did you mean 'name'"),
        # More digits than Python converts: its 'Exceeds the limit' ValueError named no key.
        ("steps=" + "9" * 5000, r"^steps=<an integer of 5000 digits> is not a number any setting takes"),
        ("eval.suite={resolution: '" + "1" * 4400 + "'}", r"^eval.suite.resolution=<an integer of 4400 digits>"),
        # An unknown key in an override was OmegaConf's ConfigKeyError (a KeyError): a traceback from
        # cosmos3-train, which names ValueErrors in one line.
        ("stepz=3", r"^the overrides: ConfigKeyError: Key 'stepz' not in 'TrainConfig'\. Did you mean"),
        ("=3", r"^the overrides: ConfigKeyError: Key '' not in 'TrainConfig'"),
        # A value that is not YAML (a shape's list or mapping mistyped) was the YAML parser's error,
        # naming no override: a traceback from cosmos3-train.
        ("model.mrope_section=[4,2", r"^the overrides: 'model.mrope_section=\[4,2' is not key=<YAML value>: while"),
        ("model.embodiments={a:{action_dim:1}}", r"^the overrides: 'model.embodiments=\{a:\{action_dim:1\}\}' is not"),
        # A list or mapping inside a list or mapping of plain values was stored as is, and the config's
        # range checks then failed with a TypeError naming no key (ConfigTypeError: a traceback).
        ("optimizer.betas=[[0.9],0.95]", r"^optimizer.betas\[0\]: a list where a number belongs, got \[0.9\]"),
        ("model.mrope_section=[{a: 6},3,3]", r"^model.mrope_section\[0\]: a mapping where an integer belongs"),
        ("synthetic.tasks=[[policy]]", r"^synthetic.tasks\[0\]: a list where a string belongs"),
        ("data.stages.pretrain.tasks={policy: [1]}", r"^data.stages.pretrain.tasks.policy: a list where a number"),
        ("data.stages={mine: {datasets: {world: [1]}}}", r"^data.stages.mine.datasets.world: a list where a number"),
    ],
)
def test_bad_values_are_named_before_anything_starts(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(str(REPO / "configs/tiny_cpu.yaml"), [override])


def test_a_bad_value_in_a_yaml_file_names_the_file(tmp_path):
    layer = tmp_path / "bad.yaml"
    for text, message in (
        ("optimizer:\n  min_lr: .nan\n", r"optimizer.min_lr=nan \(in {layer}\)"),
        ("optimizer:\n  lrr: 1\n", r"{layer}: ConfigKeyError: Key 'lrr' not in 'OptimizerConfig'"),
        ("steps: [1, 2]\n", r"{layer}: ValidationError: .* could not be converted to Integer"),
        ("steps: {{{: [\n", r"{layer}: ParserError"),
        ("5\n", r"{layer}: Invalid loaded object type: int"),  # was an OSError naming no file
        ("steps: ${nothere}\n", r"{layer}: Interpolation key 'nothere' not found"),  # named no file
        ("data:\n  datasets: {world: 1}\n", r"{layer}: ValueError: data.datasets: a mapping where a list belongs"),
        ("- data\n", r"{layer}: ValueError: holds a YAML list, not a mapping of settings"),  # was 'Index 'data''
        ("data:\n  datasets:\n    - {name: a, shard: x}\n", r"{layer}: ValueError: data.datasets\[0\]: unknown key"),
        (
            "model:\n  hidden_size: " + "6" * 4400 + "\n",
            r"{layer}: ValueError: model.hidden_size=<an integer of 4400 digits>",
        ),
    ):
        layer.write_text(text)
        with pytest.raises(ValueError, match=message.format(layer=layer)):
            load_config([str(REPO / "configs/tiny_cpu.yaml"), str(layer)])


def test_a_saved_config_with_an_integer_too_long_for_python_names_its_source_and_key():
    """A checkpoint's meta.json config (``config_from_yaml``) is crafted or damaged input too."""
    from megatron_cosmos3.training.config import config_from_yaml

    with pytest.raises(ValueError, match=r"^meta.json: not a valid training config: seed=<an integer of 4301 digits>"):
        config_from_yaml("seed: " + "1" * 4301 + "\n", "meta.json")


@pytest.mark.timeout(30)  # without the check a FIFO's read waits for a writer that never comes
@pytest.mark.parametrize(
    "kind, what",
    [
        ("fifo", "not a regular file (a FIFO"),
        ("folder", "not a regular file (a folder)"),
        ("device", "not a regular file (a character device)"),
        ("dangling link", "not a regular file (a dangling symbolic link to 'gone.yaml')"),
        ("missing", "missing (no such file)"),
        ("below a file", "missing (no such file)"),
    ],
)
def test_a_config_path_that_is_no_regular_file_is_refused_naming_the_option_and_what_it_is(tmp_path, kind, what):
    """``--config`` naming a FIFO hung (OmegaConf read it until a writer came), a device such as
    /dev/zero was read until the memory ran out; a folder was IsADirectoryError, a missing file or
    a dangling link FileNotFoundError, each naming no option: now one ValueError naming --config,
    the path and what it is (``config_files.refuse_irregular_file``)."""
    (tmp_path / "a_file.yaml").write_text("steps: 1\n")
    path = {
        "folder": tmp_path,
        "fifo": tmp_path / "pipe.yaml",
        "device": Path("/dev/null"),
        "dangling link": tmp_path / "link.yaml",
        "missing": tmp_path / "none.yaml",
        "below a file": tmp_path / "a_file.yaml" / "x.yaml",
    }[kind]
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling link":
        path.symlink_to("gone.yaml")
    with pytest.raises(ValueError, match="^" + re.escape(f"--config={str(path)!r}: {what}")):
        load_config([str(REPO / "configs/tiny_cpu.yaml"), str(path)])


def test_embodiments_given_whole_are_the_models_embodiments(tmp_path):
    """model.embodiments given whole (a file's mapping, ``model.embodiments={...}``) lists the model's
    embodiments; OmegaConf merged it into the defaults, so a model of two other robots also held the
    default single_arm and humanoid heads. A dotted key still changes one entry. A checkpoint's saved
    config reads back with exactly its embodiments."""
    from megatron_cosmos3.model.config import EmbodimentConfig, load_model_config
    from megatron_cosmos3.training.config import config_from_yaml, to_yaml

    two = {"gripper": EmbodimentConfig(1, 5.0), "quadruped": EmbodimentConfig(300, 50.0)}
    given = load_config(
        None, ["model.embodiments={gripper: {action_dim: 1, rate_hz: 5}, quadruped: {action_dim: 300, rate_hz: 50}}"]
    )
    assert given.model.embodiments == two
    assert config_from_yaml(to_yaml(given), "saved").model.embodiments == two
    (tmp_path / "robots.yaml").write_text("model:\n  embodiments:\n    gripper: {action_dim: 1, rate_hz: 5}\n")
    assert load_config(str(tmp_path / "robots.yaml")).model.embodiments == {"gripper": two["gripper"]}
    assert load_model_config(tmp_path / "robots.yaml").embodiments == {"gripper": two["gripper"]}
    one_changed = load_config(None, ["model.embodiments.single_arm.rate_hz=20"]).model.embodiments
    assert one_changed == {"single_arm": EmbodimentConfig(19, 20.0), "humanoid": EmbodimentConfig(57, 30.0)}
