"""The DeepSpeed config is translated from the one training config, and option mixes the engines cannot
run are refused while the config loads (before any process group), naming the pair."""

import contextlib
import errno
import json
import resource
import signal

import pytest
import torch

from megatron_cosmos3.testing.training import TINY_MODEL
from megatron_cosmos3.training.config import load_config
from megatron_cosmos3.training.deepspeed_config import deepspeed_config
from megatron_cosmos3.training.deepspeed_engine import CONFIG_FILE, DeepSpeedPlan


def config(*overrides):
    return load_config(None, [*TINY_MODEL, "model.num_layers=4", *overrides])


def test_every_entry_comes_from_the_training_config():
    train = config(
        "engine=deepspeed",
        "deepspeed.zero_stage=2",
        "optimizer.micro_batches_per_step=3",
        "optimizer.grad_clip=0.5",
        "optimizer.lr=2e-4",
        "optimizer.min_lr=1e-5",
        "optimizer.betas=[0.8,0.9]",
        "optimizer.weight_decay=0.1",
        "precision=bf16",
    )
    translated = deepspeed_config(train, zero_ranks=4)
    assert translated["gradient_accumulation_steps"] == 3
    assert translated["train_micro_batch_size_per_gpu"] == 1  # one pack per micro-batch
    assert translated["train_batch_size"] == 12  # micro-batches x ranks
    assert translated["managed_gradient_accumulation"] is False  # the trainer's step is the boundary
    assert translated["gradient_clipping"] == 0.5
    assert translated["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 2e-4, "betas": [0.8, 0.9], "eps": 1e-8, "weight_decay": 0.1, "torch_adam": True},
    }
    assert "scheduler" not in translated  # the loop sets the rate from training/schedule.py
    assert translated["bf16"] == {"enabled": True}
    assert translated["zero_optimization"] == {"stage": 2}
    assert "offload_optimizer" not in translated["zero_optimization"]


def test_stage_offload_and_precision_follow_their_settings():
    translated = deepspeed_config(
        config("engine=deepspeed", "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true"), zero_ranks=2
    )
    assert translated["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "overlap_comm": False,
    }
    assert translated["zero_force_ds_cpu_optimizer"] is False  # torch's AdamW, no compiled CPU Adam
    assert translated["bf16"] == {"enabled": False}
    assert deepspeed_config(config("engine=deepspeed"), zero_ranks=2)["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["parallel.tensor=2", "deepspeed.zero_stage=3"], "parallel.tensor=2 with deepspeed.zero_stage=3"),
        (["parallel.pipeline=2", "deepspeed.zero_stage=2"], "parallel.pipeline=2 with deepspeed.zero_stage=2"),
        (["parallel.pipeline=2", "deepspeed.zero_stage=3"], "parallel.pipeline=2 with deepspeed.zero_stage=3"),
        (["parallel.tensor=2", "deepspeed.zero_stage=1"], "engine=deepspeed with parallel.tensor=2"),
        (["parallel.context=2", "deepspeed.zero_stage=3"], "parallel.context=2 with deepspeed.zero_stage=3"),
        (["model.num_experts=4", "parallel.expert=2"], "engine=deepspeed with parallel.expert=2"),
    ],
)
def test_unsupported_mixes_are_refused_naming_the_pair(overrides, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        config("engine=deepspeed", *overrides)


def test_the_same_layouts_stay_valid_for_the_megatron_engine():
    assert config("parallel.tensor=2", "parallel.pipeline=2", "deepspeed.zero_stage=3").engine == "megatron"


def test_ulysses_context_parallelism_is_accepted_with_zero_1_and_2():
    for stage in (1, 2):
        assert config("engine=deepspeed", "parallel.context=2", f"deepspeed.zero_stage={stage}").parallel.context == 2


@pytest.mark.parametrize(
    "overrides, named",
    [(["engine=fsdp"], "engine='fsdp'"), (["engine=deepspeed", "deepspeed.zero_stage=4"], "deepspeed.zero_stage=4")],
)
def test_bad_values_name_the_field(overrides, named):
    with pytest.raises(ValueError, match=named):
        config(*overrides)


class _ByName:
    """Pickles as ``getattr(owner, name)``, as Python 3.11.0-3.11.4 pickle an enum member."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_deepspeed_files_load_enum_members_pickled_by_name_and_nothing_else_through_getattr(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from megatron_cosmos3.checkpoint.safe_reader import UnsafeCheckpointError
    from megatron_cosmos3.training.deepspeed_engine import WeightsOnlyCheckpointEngine

    engine = WeightsOnlyCheckpointEngine(None)
    member = tmp_path / "member.pt"
    torch.save({"zero_stage": _ByName(ZeroStageEnum, "gradients")}, member)
    assert engine.load(str(member)) == {"zero_stage": ZeroStageEnum.gradients}
    method = tmp_path / "method.pt"
    torch.save({"x": _ByName(LossScaler, "update_scale")}, method)
    with pytest.raises(UnsafeCheckpointError, match="is not an enum member"):
        engine.load(str(method))


@contextlib.contextmanager
def file_size_limit(size: int):
    """Within: a write past ``size`` bytes fails with EFBIG, as on a disk that fills up (this
    process's soft limit, restored after; SIGXFSZ, which would end the process, ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_the_translated_config_is_written_whole_or_not_at_all(tmp_path):
    """A write cut short (a full disk: here a file-size limit below the config's size) leaves the
    previous attempt's deepspeed_config.json as it was and no partial file beside it; an uncut
    write replaces it."""
    previous = tmp_path / CONFIG_FILE
    previous.write_text('{"previous": "attempt"}\n')
    plan = DeepSpeedPlan(config("engine=deepspeed", f"checkpoint.directory={tmp_path}"), 2)
    plan.ds_config = deepspeed_config(plan.config, 2)
    with file_size_limit(200), pytest.raises(OSError) as cut:
        plan.write_config(tmp_path)
    assert cut.value.errno == errno.EFBIG
    assert previous.read_text() == '{"previous": "attempt"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE]
    assert plan.write_config(tmp_path) == previous
    assert json.loads(previous.read_text()) == plan.ds_config and len(previous.read_bytes()) > 200
