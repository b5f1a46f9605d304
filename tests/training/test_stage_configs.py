"""The stage configs layer over the main job's config and validate before anything starts."""

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
