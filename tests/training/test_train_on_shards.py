"""Training on generated-world shards: the loader's position is checkpointed, so a preempted run
resumes mid-epoch with exactly the next pack, and two processes train from the same shards."""

import json
import logging
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_cosmos3.checkpoint.checkpointer import ResumeError, latest_checkpoint
from megatron_cosmos3.data.media import encode_json
from megatron_cosmos3.data.schema import Sample, encode_sample
from megatron_cosmos3.data.shard_writer import ShardWriter
from megatron_cosmos3.testing.distributed import run_on_ranks
from megatron_cosmos3.testing.scripts import load_script
from megatron_cosmos3.testing.shared_cache import shared_folder
from megatron_cosmos3.testing.training import (
    TINY_MODEL,
    child_processes,
    loss_history,
    rewrite_checkpoint,
    tracking_store,
    train_on_ranks,
)
from megatron_cosmos3.training import train as train_module
from megatron_cosmos3.training.batches import MicroBatches
from megatron_cosmos3.training.config import load_config
from megatron_cosmos3.training.distributed import DistributedContext

CPU = DistributedContext(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def world() -> Path:
    """24 clips of the generated world as pooled latents at the tiny model's widths, written once
    per test session (the tests only read them)."""
    flags = ["--samples", "24", "--shard-size", "4", "--resolution", "32", "--duration", "1.0"]
    return shared_folder("train-on-shards-world", lambda out: write_world(out, *flags)) / "latent"


def write_world(out: Path, *flags: str) -> Path:
    """A generated world's pooled-latent shards at the tiny model's widths (``data_pipelines/generate_world.py``,
    its ``main`` run in this process: no second interpreter importing torch)."""
    widths = ["--video-latent-channels", "4", "--audio-latent-dim", "6", "--latents", "pooled"]
    assert load_script("generate_world").main([str(out), *widths, *flags]) == 0
    return out / "latent"


def shard_overrides(tmp_path, world, name, *extra):
    return [
        *TINY_MODEL,
        "model.vocab_size=256",  # the loader's byte tokenizer needs 256 ids
        "data_source=shards",
        f"data.datasets=[{{name: world, shards: [{world}]}}]",
        "data.stages={pretrain: {datasets: {world: 1.0}, tasks: {understanding: 1.0, text_to_video: 1.0, "
        "image_to_video: 1.0, video_to_audio: 1.0, forward_dynamics: 1.0, policy: 1.0}}}",
        "data.packing.tokens_per_pack=768",
        "data.shuffle_buffer=8",
        "log_every=1",
        "optimizer.warmup_steps=1",
        "checkpoint.save_every=100",
        f"checkpoint.directory={tmp_path / name}",
        f"tracking.tracking_uri={tracking_store(tmp_path)}",
        f"tracking.run_name={name}",
        *extra,
    ]


def losses(tmp_path, name):
    return loss_history(tmp_path / "mlflow.db", name)


def _train_straight(folder: Path, world: Path) -> None:
    straight = shard_overrides(folder, world, "straight", "steps=6", "data.num_workers=0")
    train_module.train(load_config(None, straight), CPU)


@pytest.fixture(scope="module")
def straight(world) -> Path:
    """The folder of an uninterrupted 6-step run without loader workers, made once per test session:
    the loader's stream is the same with any number of workers (tests/data/test_loader_resume.py),
    so every preempted run below, with or without workers, must end with its losses."""
    return shared_folder("train-on-shards-straight", lambda folder: _train_straight(folder, world))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_preempted_mid_epoch_resumes_with_the_exact_next_pack(tmp_path, world, straight, workers, monkeypatch):

    real = MicroBatches.get
    # Children this run did not start (the session's fork server for run_on_ranks): not the job's
    # processes, and signalled they died, so the next multi-process test paid a new one's start-up.
    before = set(child_processes(os.getpid()))

    def signalled(self, step, micro):
        if step == 2:  # as SLURM does: every process of the job, the loader's workers included
            loader_workers = [pid for pid in child_processes(os.getpid()) if pid not in before]
            assert len(loader_workers) >= workers, loader_workers  # the signal must reach them
            for name in ("USR1", "TERM"):  # from another process, as slurmstepd (not from their parent)
                subprocess.run(["kill", "-s", name, str(os.getpid()), *map(str, loader_workers)], check=True)
        return real(self, step, micro)

    monkeypatch.setattr(MicroBatches, "get", signalled)
    config = load_config(None, shard_overrides(tmp_path, world, "resumed", "steps=6", f"data.num_workers={workers}"))
    with pytest.raises(train_module.Preempted):
        train_module.train(config, CPU)
    assert latest_checkpoint(config.checkpoint.directory).name == "step_00000003"
    monkeypatch.setattr(MicroBatches, "get", real)
    train_module.train(config, CPU)
    assert losses(tmp_path, "resumed") == losses(straight, "straight")  # bit for bit, steps 1-6


def _damaged_dataset(directory: Path) -> Path:
    """Two shards (one per data rank), each a usable latent clip of the world's widths and a bad one:
    an absurd frame rate (out_of_range), a caption with a lone surrogate (bad_metadata)."""
    rng = np.random.default_rng(0)

    def clip(key: str, **meta) -> dict:
        latents = rng.normal(size=(2, 4 * 4)).astype(np.float32)  # 4 latent channels, 2x2 patches
        sample = encode_sample(
            Sample(key=key, caption="a clip", fps=24.0, video_latent_grid=(2, 1, 1), video_latents=latents)
        )
        return {**sample, "meta.json": encode_json({**json.loads(sample["meta.json"]), **meta})}

    with ShardWriter(directory, "damaged", max_samples_per_shard=2, validate=False) as writer:
        for sample in (clip("good0"), clip("fast", fps=1e-9), clip("good1"), clip("text", caption="bad \ud800")):
            writer.write_raw(sample)
    return directory


def test_a_finite_stream_that_ends_before_steps_is_an_error_naming_the_step_the_epochs_and_the_data(tmp_path):
    """data.epochs=1 over two shards of two clips each ran out at the loader's StopIteration: a bare
    StopIteration out of the run (or, inside a generator, a RuntimeError naming nothing)."""
    from megatron_cosmos3.data.errors import DataExhaustedError

    damaged = _damaged_dataset(tmp_path / "two_clips")
    stage = ["data.stages={pretrain: {datasets: {world: 1.0}, tasks: {text_to_video: 1.0}}}"]
    config = load_config(
        None,
        shard_overrides(
            tmp_path,
            damaged,
            "finite",
            "steps=6",
            "data.epochs=1",
            *stage,
        ),
    )
    with pytest.raises(
        DataExhaustedError,
        match=r"the data ran out at step [2-6] of steps=6: data.epochs=1 pass\(es\) over dataset 'world' gave "
        r"data rank 0 [1-5] packs, .* optimizer.micro_batches_per_step=1 a step; raise data.epochs",
    ) as ended:
        train_module.train(config, CPU)
    # The steps done are saved (checkpoint.save_every=100 saved none of them before).
    ran_out_at = int(re.search(r"at step (\d+)", str(ended.value))[1])
    assert latest_checkpoint(tmp_path / "finite").name == f"step_{ran_out_at - 1:08d}"

    # Under tensor parallelism only the reader's stream ends: it sends the end to its peer, which
    # waited for a pack in the broadcast; both stop at that step and save it.
    tp2 = shard_overrides(tmp_path, damaged, "finite_tp2", "steps=6", "data.epochs=1", "parallel.tensor=2", *stage)
    with pytest.raises(RuntimeError, match=rf"(?s)rank 0.*the data ran out at step {ran_out_at}.*rank 1.*ran out"):
        train_on_ranks(2, *tp2, timeout=120)
    assert latest_checkpoint(tmp_path / "finite_tp2").name == f"step_{ran_out_at - 1:08d}"


def test_a_resume_under_changed_data_settings_names_each_and_restarts_the_stream_only_when_told(tmp_path, caplog):
    """The resumed run's error said 'a different data config', naming no setting, and offered to
    'start a fresh data stream' with no way to ask for one. A crafted loader position was a
    ValueError naming neither the checkpoint nor the entry."""
    from megatron_cosmos3.data.errors import DataStreamChangedError

    clips = _damaged_dataset(tmp_path / "clips")
    mixture = "data.stages={pretrain: {datasets: {world: 1.0}, tasks: {text_to_video: 1.0}}}"
    train_module.train(load_config(None, shard_overrides(tmp_path, clips, "changed", "steps=1", mixture)), CPU)
    changed = shard_overrides(tmp_path, clips, "changed", "steps=2", mixture, "data.seed=7", "data.shuffle_buffer=4")
    with pytest.raises(DataStreamChangedError) as error:
        train_module.train(load_config(None, changed), CPU)
    assert error.value.changes == ("data.seed: 0 -> 7", "data.shuffle_buffer: 8 -> 4")
    assert "checkpoint.restart_changed_data=true restarts it" in str(error.value)
    with caplog.at_level(logging.WARNING):
        train_module.train(load_config(None, [*changed, "checkpoint.restart_changed_data=true"]), CPU)
    assert (
        "checkpoint.restart_changed_data: the data stream restarts from the start of this run's data settings "
        "(data.seed: 0 -> 7; data.shuffle_buffer: 8 -> 4)" in caplog.text
    )
    assert latest_checkpoint(tmp_path / "changed").name == "step_00000002"

    # A loader position that is no loader state (resealed: crafted) names the checkpoint and the entry.
    def crafted_position(model, optimizer, per_rank, named):
        named["data0/loader"] = torch.frombuffer(bytearray(b'{"format_version": 1}'), dtype=torch.uint8).clone()

    folder = rewrite_checkpoint(load_config(None, changed), crafted_position, ("data0/loader",))
    with pytest.raises(
        ResumeError, match=rf"checkpoint {folder}: entry 'data0/loader': loader state is damaged: KeyError: 'dp_world"
    ):
        train_module.train(load_config(None, [*changed, "steps=3"]), CPU)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_train_on_shards_and_log_data_counts(tmp_path, world):
    damaged = _damaged_dataset(tmp_path / "damaged")
    mixed = [
        f"data.datasets=[{{name: world, shards: [{world}]}}, {{name: damaged, shards: [{damaged}]}}]",
        "data.stages={pretrain: {datasets: {world: 1.0, damaged: 1.0}, tasks: {text_to_video: 1.0}}}",
        "data.error_budget.max_error_fraction=0.5",  # half of the damaged set is bad by design
    ]
    train_on_ranks(2, *shard_overrides(tmp_path, world, "two", "steps=4", *mixed))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs(client.get_experiment_by_name("megatron_cosmos3").experiment_id)[0]
    assert run.data.metrics["data/samples_used"] > 0
    # Bad samples are skipped and counted per reason (each time a pass over the data reads them),
    # summed over the data ranks, and training goes on.
    assert run.data.metrics["data/skipped/out_of_range"] > 0
    assert run.data.metrics["data/skipped/bad_metadata"] > 0
    assert run.data.params["data_source"] == "shards"
    assert len(losses(tmp_path, "two")) == 4


def _packs_under_tensor_parallel(rank, world_size, overrides):
    from megatron_cosmos3.parallel.sizes import ParallelSizes
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel

    config = load_config(None, overrides)
    groups = initialize_parallel(ParallelSizes(tensor=2), config.model)
    batches = MicroBatches(
        config, groups.data_rank, groups.data_size, torch.device("cpu"), (groups.same_data, groups.data_reader)
    )
    try:
        packs = [batches.get(step, 0) for step in range(3)]
        return {
            "reads": batches.loader is not None,
            "tokens": [batch.ar_token_ids for batch, _ in packs],
            "targets": [targets for _, targets in packs],
            "state": set(batches.state()),
        }
    finally:
        batches.close()
        destroy_parallel()


@pytest.mark.multiprocess
def test_tensor_parallel_peers_share_one_reader_of_the_shards(tmp_path, world):
    overrides = shard_overrides(tmp_path, world, "shared")
    reports = run_on_ranks(_packs_under_tensor_parallel, 2, overrides)
    assert [r["reads"] for r in reports] == [True, False]  # one loader (and its workers) per data rank
    assert [r["state"] for r in reports] == [{"data0/loader"}, set()]  # the reader checkpoints the position
    alone = MicroBatches(load_config(None, overrides), 0, 1, torch.device("cpu"))
    try:
        for step in range(3):
            batch, targets = alone.get(step, 0)
            for report in reports:  # the same packs, and the same noise drawn from them, as one process
                assert torch.equal(report["tokens"][step], batch.ar_token_ids)
                assert report["targets"][step].keys() == targets.keys()
                assert all(torch.equal(report["targets"][step][k], targets[k]) for k in targets)
    finally:
        alone.close()


# The loader in the rank itself, where a test's promise is the parallel layout: workers forked from
# a forked rank cost ~2 s of CPU each, and the stream is the same with any number of workers
# (tests/data/test_loader_resume.py; here the preempted runs with workers).
IN_THE_RANK = ["data.num_workers=0"]


@pytest.mark.multiprocess
def test_tensor_parallel_training_on_shards_follows_one_process(tmp_path, world):
    """With a held-out loss on shard sets of its own (here the same files, read by a second loader:
    its reader broadcasts the held-out packs to the tensor peer as the training reader does)."""
    held_out = ["eval.every=2", f"eval.datasets=[{{name: held_out, shards: [{world}]}}]", *IN_THE_RANK]
    train_module.train(load_config(None, shard_overrides(tmp_path, world, "one", "steps=3", *held_out)), CPU)
    tp2 = shard_overrides(tmp_path, world, "tp2", "steps=3", "parallel.tensor=2", *held_out)
    train_on_ranks(2, *tp2)
    want, got = losses(tmp_path, "one"), losses(tmp_path, "tp2")
    assert [step for step, _ in got] == [step for step, _ in want] == [1, 2, 3]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], rel=1e-5)
    want, got = (loss_history(tmp_path / "mlflow.db", name, metric="eval/loss") for name in ("one", "tp2"))
    assert [step for step, _ in got] == [step for step, _ in want] == [2, 3]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], rel=1e-5)


@pytest.mark.multiprocess
def test_a_run_on_shards_resumes_mid_epoch_under_another_tensor_parallel_size(tmp_path, world):
    """Saved with TP=2 x DP=2 (readers: global ranks 0 and 2), resumed with DP=2 alone (readers 0
    and 1): each data rank's loader position is found by data rank and the stream goes on exactly."""
    train_on_ranks(2, *shard_overrides(tmp_path, world, "straight", "steps=3", *IN_THE_RANK))
    train_on_ranks(4, *shard_overrides(tmp_path, world, "switch", "steps=2", "parallel.tensor=2", *IN_THE_RANK))
    train_on_ranks(2, *shard_overrides(tmp_path, world, "switch", "steps=3", *IN_THE_RANK))
    want, got = losses(tmp_path, "straight"), losses(tmp_path, "switch")
    assert [step for step, _ in got] == [1, 2, 3]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in want], rel=1e-5)


def test_another_video_patch_size_trains_on_shards_generates_and_evaluates(tmp_path, world):
    """The token patch comes from model.video_patch_size wherever media become tokens: shards
    written at it train, cosmos3-generate makes a clip of the asked size (tokens of 16*patch pixels)
    and cosmos3-eval measures it; shards of another patch are an error naming both sizes. (Patch 4:
    tests/inference/test_generation.py and tests/eval_suite/test_suite.py, without a run.)"""
    from megatron_cosmos3.data.errors import LoaderSetupError
    from megatron_cosmos3.release import eval_cli, generate_cli
    from megatron_cosmos3.testing.media_probe import ffprobe_streams

    patch = 1
    side = 16 * patch  # pixels per video token
    flags = ["--samples", "4", "--shard-size", "4", "--resolution", "64", "--duration", "0.5"]
    shards = write_world(tmp_path / "world", *flags, "--video-patch-size", str(patch))
    overrides = [
        *TINY_MODEL,
        "model.vocab_size=260",  # the byte tokenizer's 256 bytes + EOS + BOG (the commands' tokenizer)
        f"model.video_patch_size={patch}",
        "data_source=shards",
        f"data.datasets=[{{name: world, shards: [{shards}]}}]",
        "data.stages={pretrain: {datasets: {world: 1.0}, tasks: {text_to_video: 1.0}}}",
        "data.encoders.kind=pooled",
        "data.num_workers=0",
        "data.packing.tokens_per_pack=512",
        "steps=1",
        "tracking.enabled=false",
        "tracking.generation_samples=false",
        f"checkpoint.directory={tmp_path / 'run'}",
    ]
    metrics = train_module.train(load_config(None, overrides), CPU)
    assert np.isfinite(metrics["loss"])

    out = tmp_path / "generated"
    argv = ["--checkpoint", str(tmp_path / "run"), "--out", str(out), "--task", "text_to_video", "--prompt", "a ball"]
    assert generate_cli.main([*argv, "--num-frames", "5", "--resolution", f"{3 * side}x{side}", "--steps", "1"]) == 0
    (folder,) = out.iterdir()
    video = ffprobe_streams(folder / "video.mp4")["video"]
    assert (int(video["height"]), int(video["width"]), int(video["nb_read_frames"])) == (3 * side, side, 5)

    suite = ["tasks=[text_to_video]", "cases_per_task=1", "steps=1", "media=false", "duration_s=0.5"]
    assert eval_cli.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "eval"), *suite]) == 0
    report = json.loads((tmp_path / "eval" / eval_cli.REPORT_FILE).read_text())
    assert any(row["name"].startswith("text_to_video/") for row in report["rows"]), report

    # The module's world was written at the default patch (2): this model refuses it, naming both.
    elsewhere = [f"data.datasets=[{{name: world, shards: [{world}]}}]", f"checkpoint.directory={tmp_path / 'other'}"]
    config = load_config(None, [*overrides, *elsewhere])
    with pytest.raises(LoaderSetupError, match=rf"video_patch_size=2 .*but model.video_patch_size={patch}"):
        train_module.train(config, CPU)
