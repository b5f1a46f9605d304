"""The training loop in one process: exact resume, stages, the non-finite guard, accumulation."""

import copy
import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
from pathlib import Path

import pytest
import torch

from megatron_cosmos3.checkpoint.checkpointer import Checkpointer, ResumeError, latest_checkpoint, step_of
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.testing.training import (
    TINY_MODEL,
    TINY_SYNTHETIC,
    TINY_VIT,
    loss_history,
    rewrite_checkpoint,
    tracked_run,
    tracking_store,
)
from megatron_cosmos3.training import train as train_module
from megatron_cosmos3.training.batches import MicroBatches
from megatron_cosmos3.training.config import load_config
from megatron_cosmos3.training.distributed import DistributedContext

CPU = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY = [
    *TINY_MODEL,
    *TINY_SYNTHETIC,
    "log_every=1",
    "optimizer.warmup_steps=2",
    "tracking.generation_samples=false",  # tests/training/test_training_media.py tests them
]


def config_for(tmp_path, name, *overrides):
    return load_config(
        None,
        TINY
        + [
            f"checkpoint.directory={tmp_path / name / 'ckpt'}",
            f"tracking.tracking_uri={tracking_store(tmp_path)}",
            f"tracking.run_name={name}",
            *overrides,
        ],
    )


def run_losses(tmp_path, run_name):
    return loss_history(tmp_path / "mlflow.db", run_name)


def final_weights(config):
    model = MoTModel(copy.deepcopy(config.model))
    Checkpointer(config.checkpoint.directory, async_save=False).load(
        latest_checkpoint(config.checkpoint.directory), model
    )
    return {n: p.detach() for n, p in model.named_parameters()}


def test_preempted_and_resumed_run_gives_the_same_losses_and_weights_bit_for_bit(tmp_path, monkeypatch):
    straight = config_for(tmp_path, "straight", "steps=8", "checkpoint.save_every=100")
    train_module.train(straight, CPU)

    real = MicroBatches.get

    def signalled_during_step_4(self, step, micro):
        if step == 3:  # SLURM's warning signal arrives in the middle of step 4
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(self, step, micro)

    monkeypatch.setattr(MicroBatches, "get", signalled_during_step_4)
    # The first attempt's MLflow server is down (nothing listens on the port): what it logged waits
    # in the run folder's spool, and the resumed attempt delivers it to the run, ahead of its own.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down = f"tracking.tracking_uri=http://127.0.0.1:{closed.getsockname()[1]}"
    interrupted = config_for(tmp_path, "resumed", "steps=8", "checkpoint.save_every=100", down)
    with pytest.raises(train_module.Preempted) as stop:
        train_module.train(interrupted, CPU, status_file=str(tmp_path / "status"))
    assert stop.value.code == 0 and (stop.value.step, stop.value.start_step) == (4, 0)
    assert (tmp_path / "status").read_text() == "preempted 4 0\n"
    assert latest_checkpoint(interrupted.checkpoint.directory).name == "step_00000004"
    spool = Path(interrupted.checkpoint.directory) / train_module.MLFLOW_SPOOL
    assert spool.is_file()
    monkeypatch.setattr(MicroBatches, "get", real)
    second_half = config_for(tmp_path, "resumed", "steps=8", "checkpoint.save_every=100")  # the server is back
    train_module.train(second_half, CPU, status_file=str(tmp_path / "status"))  # resumes at step 4
    assert (tmp_path / "status").read_text() == "finished 8 4\n"
    assert run_losses(tmp_path, "resumed") == run_losses(tmp_path, "straight")  # one MLflow run, continued
    assert not spool.exists()
    want, got = final_weights(straight), final_weights(second_half)
    for name in want:
        assert torch.equal(want[name], got[name]), name


def run_status(tmp_path, run_name) -> str:
    return tracked_run(tmp_path / "mlflow.db", run_name)[0].info.status


def test_a_preempted_attempt_marks_its_mlflow_run_killed_and_the_resumed_one_finishes_it(tmp_path, monkeypatch):
    """The preempted attempt left its run RUNNING while the job waited in the queue (and for good
    where it never came back): KILLED, and the resumed attempt, continuing the same run, FINISHED."""
    real = MicroBatches.get

    def signalled_during_step_2(self, step, micro):
        if step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(self, step, micro)

    monkeypatch.setattr(MicroBatches, "get", signalled_during_step_2)
    config = config_for(tmp_path, "preempted", "steps=3", "checkpoint.save_every=100")
    with pytest.raises(train_module.Preempted):
        train_module.train(config, CPU)
    assert run_status(tmp_path, "preempted") == "KILLED"
    monkeypatch.setattr(MicroBatches, "get", real)
    train_module.train(config, CPU)  # resumes at step 2, in the same run (one run of the name)
    assert run_status(tmp_path, "preempted") == "FINISHED"
    assert [step for step, _ in run_losses(tmp_path, "preempted")] == [1, 2, 3]


def test_a_checkpoint_of_another_architecture_of_the_same_shapes_is_refused_by_name(tmp_path):
    """Rotary theta, norm epsilon, the mRoPE split: nothing in the tensors' shapes shows them, so a
    resume or a stage started from a checkpoint with another value went on silently with another
    model. Refused naming the field and both values, as a weights folder is."""
    first = config_for(tmp_path, "first", "steps=1", "checkpoint.save_every=1")
    train_module.train(first, CPU)
    resumed = config_for(tmp_path, "first", "steps=2", "model.rope_theta=10000.0")
    with pytest.raises(
        ValueError, match=r"model.rope_theta=10000.0, but the weights were saved with rope_theta=1000000.0"
    ):
        train_module.train(resumed, CPU)
    source = f"stage.init_from={first.checkpoint.directory}"
    stage = config_for(tmp_path, "stage", "steps=1", source, "model.mrope_section=[4,0,0]")
    with pytest.raises(ValueError, match=r"stage.init_from=.*model.mrope_section=\[4, 0, 0\], but .*=\[2, 1, 1\]"):
        train_module.train(stage, CPU)
    train_module.train(config_for(tmp_path, "first", "steps=2"), CPU)  # the same model resumes


def test_a_signal_before_the_first_step_stops_with_no_progress_and_no_new_checkpoint(tmp_path, monkeypatch):
    """The time limit shorter than the signal lead plus start-up: the attempt reports no progress
    (slurm/train.sbatch then ends the job instead of requeuing it forever)."""
    real = train_module.resume_or_initialise

    def signalled_during_start_up(run):
        os.kill(os.getpid(), signal.SIGUSR1)
        return real(run)

    monkeypatch.setattr(train_module, "resume_or_initialise", signalled_during_start_up)
    config = config_for(tmp_path, "start_up", "steps=4")
    with pytest.raises(train_module.Preempted) as stop:
        train_module.train(config, CPU, status_file=str(tmp_path / "status"))
    assert (stop.value.step, stop.value.start_step) == (0, 0)
    assert (tmp_path / "status").read_text() == "preempted 0 0\n"
    assert latest_checkpoint(config.checkpoint.directory) is None


def test_resuming_a_checkpoint_at_or_past_steps_says_so_naming_the_step_and_steps(tmp_path, caplog):
    """A run resumed at its last step (a requeue after it finished, or steps lowered) trained nothing
    and reported itself finished without a word."""
    config = config_for(tmp_path, "done", "steps=2")
    train_module.train(config, CPU)
    for steps, how in ((2, "already at"), (1, "past")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            train_module.train(config_for(tmp_path, "done", f"steps={steps}"), CPU, str(tmp_path / "status"))
        assert f"step_00000002 is at step 2, {how} steps={steps}: nothing left to train" in caplog.text
        assert latest_checkpoint(config.checkpoint.directory).name == "step_00000002"  # nothing saved


def test_a_changed_learning_rate_schedule_is_named_on_resume_and_the_new_one_is_followed(tmp_path, caplog):
    """A resume with another lr, warm-up or schedule took the new one without a word (or, with an
    unchanged one, must say nothing): one warning names each change, old -> new, and the resumed
    steps take the new schedule's rate at their step, as a run started with it would."""
    from megatron_cosmos3.training.schedule import learning_rate

    train_module.train(config_for(tmp_path, "lr", "steps=2", "optimizer.schedule=constant"), CPU)
    with caplog.at_level(logging.WARNING):
        train_module.train(config_for(tmp_path, "lr", "steps=3", "optimizer.schedule=constant"), CPU)
    assert "learning-rate schedule changed" not in caplog.text  # steps do not shape a constant schedule
    changed = ["steps=5", "optimizer.schedule=cosine", "optimizer.lr=0.002", "optimizer.warmup_steps=1"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        metrics = train_module.train(config_for(tmp_path, "lr", *changed), CPU)
    lines = [line for line in caplog.text.splitlines() if "learning-rate schedule changed" in line]
    assert len(lines) == 1 and lines[0].endswith(
        "since the checkpoint of step 3: optimizer.lr: 0.003 -> 0.002; optimizer.warmup_steps: 2 -> 1; "
        f"optimizer.schedule: 'constant' -> 'cosine'; steps: 3 -> 5; the resumed run follows the new schedule "
        f"from there (lr {learning_rate(3, 5, 0.002, 3e-4, 1, 'cosine'):.3e} at step 4)"
    ), lines
    assert metrics["lr"] == learning_rate(4, 5, 0.002, 3e-4, 1, "cosine")  # the last step's, logged


def test_stage_change_loads_weights_freezes_and_adds_an_embodiment(tmp_path):
    pre = config_for(tmp_path, "pre", "steps=3")
    train_module.train(pre, CPU)
    pre_weights = final_weights(pre)
    # A previous stage whose latest pointer is broken is named, not read as "no .metadata index".
    broken = shutil.copytree(pre.checkpoint.directory, tmp_path / "broken")
    (broken / "latest").write_text("step_00000009")
    with pytest.raises(ResumeError, match=rf"stage.init_from={broken}: .*names step_00000009, which does not exist"):
        train_module.train(config_for(tmp_path, "from_broken", "steps=1", f"stage.init_from={broken}"), CPU)
    mid = config_for(
        tmp_path,
        "mid",
        "steps=3",
        "stage.name=midtrain",
        f"stage.init_from={pre.checkpoint.directory}",
        "stage.freeze=[layers.*.reasoner.*,embed_tokens.*,lm_head.*,reasoner_norm.*]",
        "stage.new_embodiments={quadruped: {action_dim: 12, rate_hz: 20.0}}",
    )
    train_module.train(mid, CPU)
    mid_model = MoTModel(copy.deepcopy(mid.model))
    mid_model.add_embodiment("quadruped", mid.stage.new_embodiments["quadruped"])
    meta = Checkpointer(mid.checkpoint.directory, async_save=False).load(
        latest_checkpoint(mid.checkpoint.directory), mid_model
    )
    assert meta["step"] == 3 and meta["stage"] == "midtrain"  # a fresh stage counts its own steps
    mid_weights = dict(mid_model.named_parameters())
    for name, before in pre_weights.items():
        frozen = ".reasoner." in name or name.startswith(("embed_tokens", "lm_head", "reasoner_norm"))
        if frozen:
            assert torch.equal(mid_weights[name], before), f"frozen {name} changed"
    assert not torch.equal(
        mid_weights["layers.0.generator.mlp.up_proj.weight"], pre_weights["layers.0.generator.mlp.up_proj.weight"]
    )
    assert "dm_streams.action_in.quadruped.weight" in mid_weights

    post = config_for(
        tmp_path,
        "post",
        "steps=2",
        "stage.name=posttrain",
        f"stage.init_from={mid.checkpoint.directory}",
        "stage.new_embodiments={quadruped: {action_dim: 12, rate_hz: 20.0}}",
        "stage.freeze=[layers.*]",
        "synthetic.tasks=[policy]",
    )
    train_module.train(post, CPU)  # the embodiment now comes from the checkpoint, nothing missing


def test_stage_that_freezes_everything_is_a_clear_error(tmp_path):
    config = config_for(tmp_path, "frozen", "steps=1", "stage.freeze=['*']")
    with pytest.raises(ValueError, match="freezes every parameter"):
        train_module.train(config, CPU)


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage.freeze=['layer.*.reasoner.*']", r"stage.freeze pattern 'layer\.\*\.reasoner\.\*' matches no"),
        ("stage.lr_multipliers={'reasonr': 0.1}", r"stage.lr_multipliers pattern 'reasonr' matches no parameter"),
    ],
)
def test_a_stage_pattern_that_matches_no_parameter_is_a_clear_error(tmp_path, override, message):
    """A typo in a freeze or learning-rate pattern froze or slowed nothing, without a word: a
    post-training stage meant to keep the Reasoner trained it."""
    config = config_for(tmp_path, "typo", "steps=1", override)
    with pytest.raises(ValueError, match=message + r".*its parameters start with \[.*'layers'"):
        train_module.train(config, CPU)


def test_a_pattern_naming_a_tied_weight_by_its_second_name_matches(tmp_path):
    """configs/stages/posttrain.yaml freezes 'lm_head.*': with tied embeddings that weight's only
    name in named_parameters() is embed_tokens.weight, yet the pattern names a real parameter, and
    freezes it (by either name), as a multiplier for 'lm_head' scales it."""
    config = config_for(tmp_path, "tied", "model.tie_word_embeddings=true", "stage.freeze=[lm_head.*]")
    model = MoTModel(copy.deepcopy(config.model))
    groups = train_module.stage_param_groups(model, config)
    assert sum(len(group["params"]) for group in groups) > 0
    assert not model.embed_tokens.weight.requires_grad and model.lm_head.weight is model.embed_tokens.weight
    config = config_for(tmp_path, "tied-lr", "model.tie_word_embeddings=true", "stage.lr_multipliers={lm_head: 0.5}")
    groups = train_module.stage_param_groups(MoTModel(copy.deepcopy(config.model)), config)
    scaled = next(group["params"] for group in groups if group["lr_multiplier"] == 0.5)
    assert [p.shape for p in scaled] == [model.embed_tokens.weight.shape]


def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop_the_run(tmp_path, monkeypatch):
    real = MicroBatches.get
    poisoned_steps = {2, 5, 6, 7}

    def poisoned(self, step, micro):
        batch, targets = real(self, step, micro)
        if step in poisoned_steps:
            targets = {k: torch.full_like(v, float("inf")) for k, v in targets.items()}
        return batch, targets

    monkeypatch.setattr(MicroBatches, "get", poisoned)
    config = config_for(tmp_path, "guarded", "steps=12", "optimizer.max_consecutive_nonfinite_steps=3")
    with pytest.raises(train_module.NonFiniteLossError, match="3 steps in a row .* step 8"):
        train_module.train(config, CPU)
    assert run_status(tmp_path, "guarded") == "FAILED"  # not RUNNING for good
    poisoned_steps.clear()
    poisoned_steps.add(1)
    config = config_for(tmp_path, "one-bad-step", "steps=4", "optimizer.max_consecutive_nonfinite_steps=3")
    metrics = train_module.train(config, CPU)
    assert metrics["loss"] == metrics["loss"]  # finite at the end


def test_gradient_accumulation_equals_one_big_step(tmp_path):
    """Two micro-batches of accumulation give the mean of their gradients."""
    config = config_for(
        tmp_path,
        "accumulate",
        "steps=1",
        "optimizer.micro_batches_per_step=2",
        "optimizer.warmup_steps=0",
        "optimizer.grad_clip=1e9",
        "checkpoint.async_save=false",
    )
    run = train_module.build_run(config, CPU)
    initial = copy.deepcopy(run.model)
    train_module.train(config, CPU)
    from megatron_cosmos3.objectives.losses import mot_losses

    expected_grads = None
    for micro in range(2):
        batch, targets = MicroBatches(config, 0, 1, CPU.device).get(0, micro)
        initial.zero_grad()
        mot_losses(initial, batch, targets).total.backward()
        grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in initial.named_parameters()}
        expected_grads = (
            grads
            if expected_grads is None
            else {
                n: (g if expected_grads[n] is None else expected_grads[n] if g is None else expected_grads[n] + g)
                for n, g in grads.items()
            }
        )
    reference = copy.deepcopy(initial)
    optimizer = torch.optim.AdamW(
        reference.parameters(),
        lr=config.optimizer.lr,
        betas=tuple(config.optimizer.betas),
        weight_decay=config.optimizer.weight_decay,
    )
    for n, p in reference.named_parameters():
        p.grad = None if expected_grads[n] is None else expected_grads[n] / 2
    optimizer.step()
    got = final_weights(config)
    for n, p in reference.named_parameters():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-6, atol=1e-7, msg=n)


def vit_weights(config):
    """Every weight of the latest checkpoint of a run that trains its own ViT."""
    model = MoTModel(copy.deepcopy(config.model))
    model.add_vision_encoder()
    Checkpointer(config.checkpoint.directory, async_save=False).load(
        latest_checkpoint(config.checkpoint.directory), model
    )
    return {n: p.detach() for n, p in model.named_parameters()}


def test_the_models_own_vit_trains_resumes_exactly_and_a_stage_can_freeze_it(tmp_path):
    straight = config_for(tmp_path, "vit-straight", *TINY_VIT, "steps=4", "checkpoint.save_every=100")
    train_module.train(straight, CPU)
    train_module.train(config_for(tmp_path, "vit-resumed", *TINY_VIT, "steps=2", "checkpoint.save_every=2"), CPU)
    resumed = config_for(tmp_path, "vit-resumed", *TINY_VIT, "steps=4", "checkpoint.save_every=100")
    train_module.train(resumed, CPU)
    assert run_losses(tmp_path, "vit-resumed") == run_losses(tmp_path, "vit-straight")
    want, got = vit_weights(straight), vit_weights(resumed)
    assert any(name.startswith("vision.vit.") for name in want)
    for name in want:
        assert torch.equal(want[name], got[name]), name

    torch.manual_seed(straight.seed)
    initial = MoTModel(copy.deepcopy(straight.model))
    initial.add_vision_encoder()
    assert not torch.equal(initial.vision.vit.merger.linear_fc2.weight, want["vision.vit.merger.linear_fc2.weight"])

    frozen = config_for(
        tmp_path,
        "vit-frozen",
        *TINY_VIT,
        "steps=2",
        "stage.name=midtrain",
        f"stage.init_from={straight.checkpoint.directory}",
        "stage.freeze=[vision.*]",
    )
    train_module.train(frozen, CPU)
    after = vit_weights(frozen)
    assert all(torch.equal(after[name], want[name]) for name in want if name.startswith("vision."))
    assert not torch.equal(after["layers.0.reasoner.mlp.up_proj.weight"], want["layers.0.reasoner.mlp.up_proj.weight"])


def test_training_the_vit_needs_its_config_and_its_deepstack_layers_on_the_first_stage():
    with pytest.raises(ValueError, match=r"data.vision .* no longer a setting: .* when model.vision .* is set"):
        load_config(None, [*TINY, "data.vision=vit"])
    with pytest.raises(ValueError, match=r"data.vision \(in the overrides\) is no longer a setting"):
        load_config(None, [*TINY, "data.vision=clip"])
    two_sets = [*TINY_VIT, "model.vision.deepstack_visual_indexes=[0,1]"]
    with pytest.raises(ValueError, match=r"2 DeepStack feature sets join Reasoner layers 0..1, .* gives it 1"):
        load_config(None, [*TINY, *two_sets, "parallel.pipeline=2"])
    load_config(None, [*TINY, *two_sets, "parallel.tensor=2"])  # no pipeline: nothing to check
    # Uneven stages: the first chunk is the first stage's own count (of 4 layers, 2 would go there evenly).
    four = [*two_sets, "model.num_layers=4", "parallel.pipeline=2"]
    with pytest.raises(ValueError, match=r"num_layers_in_first_pipeline_stage=1 gives it 1"):
        load_config(None, [*TINY, *four, "parallel.num_layers_in_first_pipeline_stage=1"])
    load_config(None, [*TINY, *four, "parallel.num_layers_in_last_pipeline_stage=1"])  # 3 on the first stage


def test_a_model_without_embodiments_trains_its_other_tasks_and_refuses_action_tasks_by_field(tmp_path):
    """model.embodiments={} (video and audio alone): the default synthetic tasks' policy and
    forward-dynamics packs failed in the first step (a randint over no embodiments); now the
    config names them, and the model trains on the tasks without actions."""
    refused = r"synthetic.tasks lists \['forward_dynamics', 'policy'\], which need an action stream"
    with pytest.raises(ValueError, match=refused):
        load_config(None, [*TINY, "model.embodiments={}"])
    no_actions = ["model.embodiments={}", "synthetic.tasks=[understanding,text_to_video,image_to_video,video_to_audio]"]
    config = config_for(tmp_path, "no-embodiments", "steps=2", *no_actions)
    train_module.train(config, CPU)
    losses = [value for _, value in run_losses(tmp_path, "no-embodiments")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_the_eval_console_line_shows_a_dash_for_a_loss_the_held_out_packs_have_no_tokens_of():
    """Held-out packs of generation tasks only have no text targets: the metrics window leaves
    eval/loss/ce out, and the console line shows "-" for it, as the training line does (not "nan")."""
    line = train_module.eval_line(4, 10, {"eval/loss": 0.5, "eval/loss/fm": 0.25})
    assert line == "step 4/10  eval loss 0.5000  ce -  fm 0.2500"


def test_held_out_loss_is_logged_changes_no_training_step_and_equals_a_recomputation(tmp_path):
    from megatron_cosmos3.objectives.losses import loss_breakdown
    from megatron_cosmos3.training.batches import held_out_batches

    plain = config_for(tmp_path, "no-eval", "steps=4", "checkpoint.save_every=2")
    train_module.train(plain, CPU)
    evaluated = config_for(tmp_path, "eval", "steps=4", "checkpoint.save_every=2", "eval.every=2")
    train_module.train(evaluated, CPU)
    assert run_losses(tmp_path, "eval") == run_losses(tmp_path, "no-eval")  # evaluation changes nothing
    logged = loss_history(tmp_path / "mlflow.db", "eval", metric="eval/loss")
    assert [step for step, _ in logged] == [2, 4]

    packs = held_out_batches(evaluated, 0, 1, torch.device("cpu"))
    assert len(packs) == evaluated.eval.micro_batches
    model = MoTModel(copy.deepcopy(evaluated.model))
    weight = evaluated.optimizer.flow_matching_weight
    for step, value in logged:  # the weights of that step's checkpoint on the same packs
        Checkpointer(evaluated.checkpoint.directory, async_save=False).load(
            Path(evaluated.checkpoint.directory) / f"step_{step:08d}", model
        )
        ce_sum = ce_count = fm_sum = fm_count = 0.0
        with torch.no_grad():
            for batch, targets in packs:
                losses = loss_breakdown(model(batch), batch, targets, weight)
                ce_sum, ce_count = ce_sum + float(losses.ce_sum), ce_count + float(losses.ce_count)
                fm_sum, fm_count = fm_sum + float(losses.fm_sum), fm_count + float(losses.fm_count)
        assert value == pytest.approx(ce_sum / ce_count + weight * fm_sum / fm_count, rel=1e-6)
    assert logged[1][1] != logged[0][1]  # the weights changed in between


def test_evaluation_settings_are_validated_by_field(tmp_path):
    from megatron_cosmos3.training.batches import held_out_share

    with pytest.raises(ValueError, match=r"eval.every=-1 must be >= 0"):
        load_config(None, [*TINY, "eval.every=-1"])
    three = load_config(None, [*TINY, "eval.every=5", "eval.micro_batches=3"])
    assert held_out_share(three, 3) == 1
    with pytest.raises(ValueError, match=r"eval.micro_batches=3 is not divisible by the 2 data-parallel ranks"):
        held_out_share(three, 2)
    with pytest.raises(ValueError, match=r"eval.every > 0 with data_source=shards needs eval.datasets"):
        load_config(
            None,
            [
                *TINY,
                "eval.every=10",
                "data_source=shards",
                f"data.datasets=[{{name: train, shards: [{tmp_path}]}}]",
                "data.stages={pretrain: {datasets: {train: 1.0}, tasks: {understanding: 1.0}}}",
            ],
        )


def _truncate_a_shard_file(root: Path) -> None:
    shard = max((root / "step_00000004").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _meta_json_of_a_later_step(root: Path) -> None:
    """Crafted, checksums rewritten to match: before meta.json was checked, the resumed run took
    step 6 for its own and, asked for 5 steps, trained none and reported itself finished."""
    from megatron_cosmos3.checkpoint.safe_reader import MANIFEST, write_manifest

    folder = root / "step_00000004"
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "step": 6}))
    write_manifest(folder, extra=tuple(p.name for p in folder.iterdir() if p.name != MANIFEST))


# Damage to the latest checkpoint (step 4 of a run that also kept step 2) -> where a fallback resumes.
DAMAGES = {
    "meta_json_of_a_later_step": (_meta_json_of_a_later_step, "step_00000002"),
    "meta_json_missing": (lambda root: (root / "step_00000004" / "meta.json").unlink(), "step_00000002"),
    "latest_names_a_missing_step": (lambda root: (root / "latest").write_text("step_00000006"), "step_00000004"),
    "truncated_shard_file": (_truncate_a_shard_file, "step_00000002"),
    "checksums_json_missing": (lambda root: (root / "step_00000004" / "checksums.json").unlink(), "step_00000002"),
}


def test_a_damaged_latest_checkpoint_never_restarts_from_step_0_nor_deletes_an_intact_one(tmp_path, caplog):
    from megatron_cosmos3.checkpoint.checkpointer import ResumeError
    from megatron_cosmos3.checkpoint.safe_reader import verify_checkpoint

    constant = "optimizer.schedule=constant"  # the run to step 4 and the one to step 5 share their schedule
    straight = config_for(tmp_path, "straight", constant, "steps=5", "checkpoint.save_every=100")
    train_module.train(straight, CPU)
    base = config_for(tmp_path, "base", constant, "steps=4", "checkpoint.save_every=2")
    train_module.train(base, CPU)
    want = final_weights(straight)
    for name, (damage, newest_intact) in DAMAGES.items():
        root = tmp_path / name / "ckpt"
        shutil.copytree(base.checkpoint.directory, root)
        damage(root)
        with pytest.raises(ResumeError, match=r"cannot resume .* committed checkpoints in .*: step_00000002") as error:
            train_module.train(config_for(tmp_path, name, constant, "steps=5", "checkpoint.save_every=2"), CPU)
        assert "checkpoint.fallback_to_verified=true" in str(error.value)
        verify_checkpoint(root / "step_00000002")  # nothing was pruned, nothing overwritten
        assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000004"]

        caplog.clear()
        fallback = config_for(tmp_path, name, constant, "steps=5", "checkpoint.fallback_to_verified=true")
        with caplog.at_level(logging.WARNING):
            train_module.train(fallback, CPU)
        assert f"RESUMING FROM {root / newest_intact}" in caplog.text, name
        got = final_weights(fallback)
        for key in want:
            assert torch.equal(want[key], got[key]), (name, key)

    # Starting over where checkpoints are takes an explicit setting; older ones survive until pruned.
    fresh = [f"checkpoint.directory={base.checkpoint.directory}", "checkpoint.resume=false", "steps=1"]
    with pytest.raises(ResumeError, match="checkpoint.allow_fresh_start=true"):
        train_module.train(config_for(tmp_path, "base", *fresh), CPU)
    train_module.train(config_for(tmp_path, "base", *fresh, "checkpoint.allow_fresh_start=true"), CPU)
    root = Path(base.checkpoint.directory)
    assert latest_checkpoint(root).name == "step_00000001"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000001", "step_00000002", "step_00000004"]


def _nan_weight(model, optimizer, per_rank, named):
    with torch.no_grad():
        model.get_parameter(NAMED_PARAMETER)[0, 0] = float("nan")


def _inf_moment(model, optimizer, per_rank, named):
    optimizer.state[model.get_parameter(NAMED_PARAMETER)]["exp_avg_sq"][0, 0] = float("inf")


def _crafted_rng(model, optimizer, per_rank, named):
    per_rank["rng"] = torch.full_like(per_rank["rng"], 255)  # the right size, an invalid mt19937 state


NAMED_PARAMETER = "layers.1.reasoner.mlp.down_proj.weight"
UNUSABLE_STATES = {
    "nan_weight": (_nan_weight, rf"parameter '{NAMED_PARAMETER}' holds NaN or inf values"),
    "inf_adam_moment": (_inf_moment, rf"optimizer state exp_avg_sq of parameter '{NAMED_PARAMETER}' holds NaN or inf"),
    "invalid_rng_state": (_crafted_rng, r"RNG state entry 'rank0/rng' \(torch.uint8, shape \(5056,\)\) is not one"),
}


def test_non_finite_weights_or_moments_and_a_crafted_rng_state_are_refused_on_resume_naming_the_entry(tmp_path, caplog):
    """A resume took NaN weights or AdamW moments as they were (every later step NaN, skipped until
    the non-finite guard stopped the run), and an RNG entry torch refuses was a bare RuntimeError.
    Each names the tensor or entry; the fallback to the newest usable checkpoint applies."""
    base = config_for(tmp_path, "base", "steps=2", "checkpoint.save_every=1")
    train_module.train(base, CPU)
    for name, (change, message) in UNUSABLE_STATES.items():
        root = tmp_path / name / "ckpt"
        shutil.copytree(base.checkpoint.directory, root)
        changed = rewrite_checkpoint(config_for(tmp_path, name, "steps=2"), change)
        with pytest.raises(ResumeError, match=rf"cannot resume .*checkpoint.*{changed}.*{message}"):
            train_module.train(config_for(tmp_path, name, "steps=3"), CPU)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            train_module.train(config_for(tmp_path, name, "steps=3", "checkpoint.fallback_to_verified=true"), CPU)
        assert f"RESUMING FROM {root / 'step_00000001'}" in caplog.text, name


def test_a_second_trainer_on_a_locked_run_folder_refuses_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    import json
    import socket
    import subprocess

    from megatron_cosmos3.training.run_lock import LOCK_FILE, RunFolderLock, RunFolderLocked

    config = config_for(tmp_path, "locked", "steps=1")
    root = Path(config.checkpoint.directory)
    holder = RunFolderLock(root, job_id="job-17")
    holder.acquire()
    refusal = rf"in use by another trainer: pid {os.getpid()} on host .* \(job job-17, since"
    with pytest.raises(RunFolderLocked, match=refusal):
        train_module.train(config, CPU)
    assert not list(root.glob("step_*")) and not list(root.glob(".step_*"))  # it wrote nothing
    holder.release()

    gone = subprocess.Popen(["true"])
    gone.wait()
    owner = {"host": socket.gethostname(), "pid": gone.pid, "process_start": "1", "job_id": "job-16", "since": "x"}
    (root / LOCK_FILE).write_text(json.dumps(owner))
    with caplog.at_level(logging.WARNING):
        train_module.train(config, CPU)
    assert f"taking over the stale lock {root / LOCK_FILE} of pid {gone.pid}" in caplog.text
    assert not (root / LOCK_FILE).exists()  # released at exit
    # A recycled pid (ours, started at another time) is not the owner either.
    (root / LOCK_FILE).write_text(json.dumps({**owner, "pid": os.getpid(), "process_start": "0"}))
    RunFolderLock(root).acquire()
    # A lock from another host cannot be checked from here, and a file that is not an owner record
    # cannot be judged: both refuse, naming the file to delete once that trainer is known to be gone.
    (root / LOCK_FILE).write_text(json.dumps({**owner, "host": "node-that-is-not-this-one", "pid": os.getpid()}))
    with pytest.raises(RunFolderLocked, match=rf"on host node-that-is-not-this-one .* delete {root / LOCK_FILE}"):
        RunFolderLock(root).acquire()
    # Except an earlier attempt of this same SLURM job (requeued after a hard kill, now on another node).
    requeued = {**owner, "host": "node-that-is-not-this-one", "job_id": "4242", "slurm_attempt": 0}
    (root / LOCK_FILE).write_text(json.dumps(requeued))
    with pytest.raises(RunFolderLocked, match="in use by another trainer"):  # the same attempt: not stale
        RunFolderLock(root, job_id="4242", slurm_attempt=0).acquire()
    with pytest.raises(RunFolderLocked, match="in use by another trainer"):  # another job
        RunFolderLock(root, job_id="4343", slurm_attempt=1).acquire()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        RunFolderLock(root, job_id="4242", slurm_attempt=1).acquire()
    assert "an earlier attempt of this SLURM job" in caplog.text
    for crafted in ("[1, 2]", '"x"', ""):  # "": killed between creating the file and writing it
        (root / LOCK_FILE).write_text(crafted)
        with pytest.raises(RunFolderLocked, match=rf"a damaged lock file, .*\. .* delete {root / LOCK_FILE}"):
            RunFolderLock(root).acquire()


@pytest.mark.parametrize("where", ["below a regular file", "a name longer than NAME_MAX"])
def test_a_run_folder_whose_lock_cannot_be_written_is_a_start_up_refusal_naming_the_path_and_reason(tmp_path, where):
    """An OSError making the run folder or writing its lock (a regular file where a folder belongs, a
    name the file system refuses, a full disk) left ``train`` as a raw OSError, which the console
    command prints as a traceback on every rank: now a StartupRefusal naming the lock file and the
    system's reason. (As root, chmod blocks no write: the paths here fail for every user.)"""
    from megatron_cosmos3.training.refusals import StartupRefusal
    from megatron_cosmos3.training.run_lock import LOCK_FILE

    (tmp_path / "a_file").write_text("")
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    folder = tmp_path / "a_file" / "ckpt" if where.startswith("below") else tmp_path / ("x" * (name_max + 1))
    reason = os.strerror(errno.ENOTDIR if where.startswith("below") else errno.ENAMETOOLONG)
    config = config_for(tmp_path, "unwritable", "steps=1", f"checkpoint.directory={folder}")
    with pytest.raises(StartupRefusal) as raised:
        train_module.train(config, CPU)
    message = str(raised.value)
    assert message.startswith(f"checkpoint.directory={folder}: its lock file {folder / LOCK_FILE} cannot be written")
    assert reason in message, message
    assert (tmp_path / "a_file").read_text() == ""  # nothing written


def test_a_lock_whose_owner_has_ended_but_is_not_yet_reaped_is_stale(tmp_path):
    """A trainer killed a moment ago is a zombie until its parent (torchrun, srun) reaps it: it still
    answered kill(pid, 0) with its own start time, so a restart right after the kill was refused."""
    import json
    import socket
    import subprocess
    import time

    from megatron_cosmos3.training.run_lock import LOCK_FILE, RunFolderLock, RunFolderLocked, _process_start

    ended = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 60
        while Path(f"/proc/{ended.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never ended"
            time.sleep(0.05)
        owner = {"host": socket.gethostname(), "pid": ended.pid, "process_start": _process_start(ended.pid)}
        (tmp_path / LOCK_FILE).write_text(json.dumps({**owner, "job_id": "", "since": "x"}))
        RunFolderLock(tmp_path).acquire()
        # Control: a live owner with the same kind of record still holds the folder.
        alive = {**owner, "pid": os.getpid(), "process_start": _process_start(os.getpid())}
        (tmp_path / LOCK_FILE).write_text(json.dumps({**alive, "job_id": "", "since": "x"}))
        with pytest.raises(RunFolderLocked, match="in use by another trainer"):
            RunFolderLock(tmp_path).acquire()
    finally:
        ended.wait()


def test_a_crafted_lock_file_is_unreadable_or_stale_never_a_traceback(tmp_path):
    """A lock nested past the JSON parser raised RecursionError, and a pid past the C range
    OverflowError out of os.kill, instead of refusing (unreadable) or taking over (no such process)."""
    import json
    import socket

    from megatron_cosmos3.training.run_lock import LOCK_FILE, RunFolderLock, RunFolderLocked

    (tmp_path / LOCK_FILE).write_text("[" * 100_000)
    with pytest.raises(
        RunFolderLocked, match=r"a damaged lock file, which names no trainer \(it holds '\[{200}'\.\.\.\)"
    ):
        RunFolderLock(tmp_path).acquire()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": 10**30}))
    lock = RunFolderLock(tmp_path)
    lock.acquire()
    assert lock.held and json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("pid", ["abc", -1, 0, "", None, True])
def test_a_lock_on_this_host_whose_pid_is_no_process_id_is_refused_naming_the_file_and_its_content(tmp_path, pid):
    """A lock this code wrote holds its trainer's pid (an int >= 1): one holding 'abc', -1, 0, '',
    none or a bool is damaged or hand-made, and whether a trainer uses the folder cannot be told.
    It is refused, quoting the file (it was taken over as stale: two trainers could then share the
    folder); the file is left as it is."""
    from megatron_cosmos3.training.run_lock import LOCK_FILE, RunFolderLock, RunFolderLocked

    owner = {"host": socket.gethostname(), "job_id": "job-9", "since": "x"}
    text = json.dumps(owner if pid is None else {**owner, "pid": pid})
    (tmp_path / LOCK_FILE).write_text(text)
    refusal = f"a damaged lock file, which names no trainer (it holds {text!r}). "
    with pytest.raises(RunFolderLocked, match=re.escape(refusal) + f".* delete {re.escape(str(tmp_path / LOCK_FILE))}"):
        RunFolderLock(tmp_path).acquire()
    assert (tmp_path / LOCK_FILE).read_text() == text


def test_paths_are_checked_by_field_before_any_process_group(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "no_index").mkdir()
    shards = [
        "data_source=shards",
        "data.stages={pretrain: {datasets: {w: 1.0}, tasks: {understanding: 1.0}}}",
        "model.vocab_size=256",  # the loader's byte tokenizer
    ]
    cases = {
        r"checkpoint.directory='.*a_file' exists and is not a directory": [
            f"checkpoint.directory={tmp_path / 'a_file'}"
        ],
        r"runs_root='.*a_file' exists and is not a directory": [f"runs_root={tmp_path / 'a_file'}"],
        r"stage.init_from='.*nowhere' does not exist": [f"stage.init_from={tmp_path / 'nowhere'}"],
        r"data.datasets\[w\].shards\[0\]='.*nowhere': does not exist": [
            *shards,
            f"data.datasets=[{{name: w, shards: [{tmp_path / 'nowhere'}]}}]",
        ],
        r"data.datasets\[w\].shards\[0\]='.*no_index': the directory has no index.json": [
            *shards,
            f"data.datasets=[{{name: w, shards: [{tmp_path / 'no_index'}]}}]",
        ],
    }
    # Action statistics whose width is not the embodiment's, or that are not statistics at all.
    from megatron_cosmos3.data.schema import Sample
    from megatron_cosmos3.data.shard_writer import ShardWriter

    with ShardWriter(tmp_path / "indexed", "text") as writer:  # a real (one-sample) shard set
        writer.write(Sample(key="s0", caption="words"))
    raw = {"layout": "raw", "count": 3, "mean": [0.0] * 5, "std": [1.0] * 5, "rotation_6d": "standardised"}
    (tmp_path / "narrow.json").write_text(json.dumps({"format_version": 2, "embodiments": {"so100": raw}}))
    (tmp_path / "list.json").write_text("[]")
    dataset = f"data.datasets=[{{name: w, shards: [{tmp_path / 'indexed'}], action_stats: {tmp_path}/%s}}]"
    so100 = "model.embodiments={so100: {action_dim: 6, rate_hz: 30}}"
    cases[r"data.datasets\[w\].action_stats='.*narrow.json': 'so100' has 5 dims, but .*so100.action_dim=6"] = [
        *shards,
        so100,
        dataset % "narrow.json",
    ]
    cases[r"data.datasets\[w\].action_stats='.*list.json': .* holds a JSON list"] = [*shards, dataset % "list.json"]
    monkeypatch.setattr(train_module, "init_distributed", lambda *_: pytest.fail("a process group was started"))
    for message, overrides in cases.items():
        with pytest.raises(ValueError, match=message):
            train_module.main([*TINY, *overrides])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_workers_die_with_a_killed_torchrun_and_the_restart_resumes_bit_exact(tmp_path, caplog):
    """kill -9 of torchrun alone (its workers run in sessions of their own): the workers die with
    it, the lock they leave is stale, and the restarted job takes it over and resumes exactly. The
    restart runs in this process: what it must do (take over the lock a dead pid left, resume from
    the last commit) is the same code as under torchrun, without two more interpreters' start-up."""
    import random
    import subprocess
    import time

    from megatron_cosmos3.testing.training import child_processes, launch_environment, trainer_command

    steps = ["steps=10", "optimizer.schedule=constant"]
    # The uninterrupted run saves once, at its last step (what final_weights reads); the killed one
    # saves every step, so that the kill falls anywhere in a step or a save. No MLflow in the killed
    # one: its worker would import MLflow (5 s of CPU) for metrics nothing here reads.
    straight = config_for(tmp_path, "straight", *steps)
    train_module.train(straight, CPU)
    steps += ["checkpoint.save_every=1", "tracking.enabled=false"]
    killed = config_for(tmp_path, "killed", *steps)
    args = [*TINY, *steps, f"checkpoint.directory={killed.checkpoint.directory}"]
    args += [f"tracking.tracking_uri={tracking_store(tmp_path)}", "tracking.run_name=killed"]  # as `killed`'s
    root = Path(killed.checkpoint.directory)
    launcher = subprocess.Popen(
        trainer_command(1, *args),
        cwd=tmp_path,
        env=launch_environment(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while not (root / "latest").exists() and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.3))  # anywhere in a step or a save
        workers = child_processes(launcher.pid)
        assert workers and launcher.poll() is None, "the run ended before it could be killed"
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 20
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), "torchrun's workers outlived it"
        # Until init reaps them, dead workers answer kill(pid, 0) as the lock's owner: the restart
        # (here at once, not after a launcher's start-up) would find them alive.
        deadline = time.monotonic() + 60
        while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        launcher.kill()
        launcher.stderr.close()
    stopped_at = latest_checkpoint(root).name
    assert stopped_at != "step_00000010"
    with caplog.at_level(logging.INFO):
        train_module.train(killed, CPU)
    assert "taking over the stale lock" in caplog.text
    assert f"resumed from {root / stopped_at}" in caplog.text
    want, got = final_weights(straight), final_weights(killed)
    for name in want:
        assert torch.equal(want[name], got[name]), name


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_killed_rank_restarts_the_group_from_its_checkpoint_and_sigterm_checkpoints_after_one_step(tmp_path):
    """torchrun --max-restarts=1, one of two ranks SIGKILLed mid-run: the restarted group meets in a
    store of its own (not at the dead attempt's addresses, pytorch#135712), takes the run folder's
    lock again and resumes from the last committed checkpoint. Then, without SLURM, torchrun passes
    SIGTERM on to its workers, which checkpoint after the same step within torchrun's grace period
    and write the outcome line."""
    import re
    import subprocess

    from megatron_cosmos3.testing.training import child_processes, launch_environment, trainer_command

    root, status = tmp_path / "ckpt", tmp_path / "status"
    args = [*TINY, "steps=100000", "checkpoint.save_every=2", f"checkpoint.directory={root}"]
    # No MLflow: each attempt's rank 0 would import it (5 s of CPU) for metrics nothing here reads.
    args += ["tracking.enabled=false", "--status-file", str(status)]
    command = trainer_command(2, *args)
    command.insert(command.index("--standalone"), "--max-restarts=1")
    launcher = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=launch_environment(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        output = []
        for line in launcher.stderr:  # rank 0 logs every step (log_every=1)
            output.append(line)
            if re.search(r"\] step \d+/100000 ", line) and latest_checkpoint(root) is not None:
                break
        killed_after = latest_checkpoint(root)
        os.kill(child_processes(launcher.pid)[-1], signal.SIGKILL)
        resumed = None
        for line in launcher.stderr:
            output.append(line)
            resumed = resumed or re.search(rf"resumed from {root}/step_(\d+) at step \d+", line)
            if resumed and re.search(r"\] step \d+/100000 ", line):  # a step of the restarted group
                break
        launcher.send_signal(signal.SIGTERM)
        rest = launcher.stderr.read()
        launcher.wait(timeout=120)
    finally:
        launcher.kill()
    text = "".join(output) + rest
    assert "connectFullMesh failed" not in text and resumed, text[-3000:]
    assert int(resumed.group(1)) >= step_of(killed_after)
    outcome, step, start_step = status.read_text().split()
    assert outcome == "preempted" and int(step) > int(start_step) == int(resumed.group(1)), rest[-3000:]
    assert f"preempted (SIGTERM): checkpoint of step {step} committed" in rest
    assert latest_checkpoint(root).name == f"step_{int(step):08d}"
