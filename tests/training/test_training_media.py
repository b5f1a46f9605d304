"""Generated media during training: the fixed held-out samples, decoded and logged to MLflow at
every checkpoint save (docs/DESIGN.md, "Generated media during training")."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_cosmos3.testing.media_probe import ffprobe_streams
from megatron_cosmos3.testing.training import TINY_MODEL, tracking_store
from megatron_cosmos3.training import train as train_module
from megatron_cosmos3.training.config import load_config
from megatron_cosmos3.training.distributed import DistributedContext
from megatron_cosmos3.training.samples import (
    LATENTS_FILE,
    choose_held_out_samples,
    held_out_sample_packs,
    trained_dm_tasks,
)

CPU = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY = [
    *TINY_MODEL,
    "synthetic.samples_per_pack=4",
    "synthetic.scale=1",
    "synthetic.tasks=[text_to_video,video_to_audio,policy]",
    "eval.micro_batches=1",
    "optimizer.warmup_steps=1",
    "checkpoint.save_every=1",
    "checkpoint.async_save=false",
    "data.encoders.kind=pooled",
]


def config_for(tmp_path, *overrides):
    return load_config(
        None,
        TINY
        + [
            f"checkpoint.directory={tmp_path / 'ckpt'}",
            f"tracking.tracking_uri={tracking_store(tmp_path)}",
            "tracking.run_name=media",
            *overrides,
        ],
    )


def artifact_root(tmp_path) -> Path:
    """The local folder of the one MLflow run's artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("megatron_cosmos3").experiment_id])
    return Path(run.info.artifact_uri.removeprefix("file://"))


def test_training_logs_decoded_media_of_a_fixed_held_out_set_that_survives_resume(tmp_path):
    train_module.train(config_for(tmp_path, "steps=1"), CPU)
    train_module.train(config_for(tmp_path, "steps=2"), CPU)  # resumes from step 1, same MLflow run
    # The set, chosen independently here: the first sample of each DM task in the held-out packs.
    want = {}
    for p, pack in enumerate(held_out_sample_packs(config_for(tmp_path, "steps=2"), torch.device("cpu"), limit=8)):
        for i in range(pack.num_samples):
            want.setdefault(pack.task_names[int(pack.sample_task[i])], (p, i))
    assert set(want) == {"text_to_video", "video_to_audio", "policy"}, "the seed's held-out packs lack a task"

    root = artifact_root(tmp_path)
    steps = ["step_00000001", "step_00000002"]
    assert sorted(p.name for p in (root / "samples").iterdir()) == steps
    records = {}
    for step in steps:
        folder = root / "samples" / step
        assert sorted(p.name for p in folder.iterdir()) == sorted(want), step
        for task, (pack, index) in want.items():
            meta = json.loads(next((folder / task).glob("*.meta.json")).read_text())
            assert meta["task"] == task and meta["checkpoint_step"] == int(step[5:])
            assert meta["conditioning"] == {"held_out": f"pack {pack}, sample {index}"}
            records.setdefault(task, []).append((meta["prompt"], meta["seed"]))
        # The clip decodes with an independent decoder to the frames and rate its latents hold.
        latents = np.load(folder / "text_to_video" / LATENTS_FILE)["video"]
        facts = json.loads((folder / "text_to_video" / "video.meta.json").read_text())["media"]
        video = ffprobe_streams(folder / "text_to_video" / "video.mp4")["video"]
        latent_frames = latents.shape[0] // ((facts["height"] // 32) * (facts["width"] // 32))
        assert int(video["nb_read_frames"]) == facts["frame_count"] == 1 + 4 * (latent_frames - 1)
        assert video["r_frame_rate"] == facts["fps_fraction"] and facts["fps"] in (16.0, 24.0, 30.0)
        assert {"audio.wav", "audio.meta.json", LATENTS_FILE} <= {p.name for p in (folder / "video_to_audio").iterdir()}
        assert {"actions.npy", "poses_plot.png"} <= {p.name for p in (folder / "policy").iterdir()}
    # The same samples (prompt, seed, source) at every save, before and after the resume.
    assert all(len(set(r)) == 1 for r in records.values()), records
    # The generated latents change with the weights.
    first, last = (np.load(root / "samples" / s / "text_to_video" / LATENTS_FILE)["video"] for s in steps)
    assert first.shape == last.shape and not np.allclose(first, last)


def test_the_set_reads_held_out_packs_until_every_trained_task_has_a_sample(tmp_path):
    """One sample per pack and three tasks: the first held-out pack (all ``eval.micro_batches`` reads
    for the loss) holds one task, yet every trained DM task gets its first sample; reading stops once
    all are found, and a task the packs never hold ends the search at its bound without one."""
    config = config_for(tmp_path, "steps=1", "synthetic.samples_per_pack=1")
    assert trained_dm_tasks(config) == ["text_to_video", "video_to_audio", "policy"]
    packs = list(held_out_sample_packs(config, torch.device("cpu"), limit=12))
    first = {}
    for p, pack in enumerate(packs):
        first.setdefault(pack.task_names[int(pack.sample_task[0])], p)
    assert set(first) == set(trained_dm_tasks(config)) and max(first.values()) > 0, first

    read = []
    counted = (read.append(p) or pack for p, pack in enumerate(packs))
    chosen = choose_held_out_samples(counted, config.model, 5, trained_dm_tasks(config))
    assert {s.task: s.pack for s in chosen.samples} == first
    assert [s.task for s in chosen.samples] == sorted(first)
    assert len(read) == max(first.values()) + 1, "reading goes on past the last missing task"
    assert sorted(chosen.packs) == sorted(set(first.values())), "a pack with no chosen sample is kept"

    never = choose_held_out_samples(iter(packs), config.model, 5, [*trained_dm_tasks(config), "forward_dynamics"])
    assert [s.task for s in never.samples] == sorted(first)


def test_a_save_stopped_while_writing_samples_leaves_no_step_folder(
    tmp_path, monkeypatch, caplog, ended_run_partial_folder
):
    """Samples were written straight into ``samples/step_<N>/``: a run stopped after the first task
    left a step folder that looked like the set. The set is written into a partial folder renamed
    into place, and one a killed run left beside it is removed by the next save (with a warning)."""
    from types import SimpleNamespace

    from megatron_cosmos3.training import samples

    written = []

    def write(folder, media, record, decoder):
        if written:
            raise KeyboardInterrupt  # Ctrl-C (or SIGTERM's SystemExit) at the second task
        written.append(folder.name)
        (folder / "video.mp4").write_bytes(b"a clip")

    monkeypatch.setattr(samples, "write_generated_sample", write)
    monkeypatch.setattr(
        samples, "decodable", lambda sample, decoder: SimpleNamespace(video=1, audio=None, actions=None)
    )
    streams = SimpleNamespace(fps=24.0, embodiment=None)
    chosen = [samples.HeldOutSample(task, 0, i, 7 + i, "a prompt", streams) for i, task in enumerate(["t2v", "v2a"])]
    held_out = samples.HeldOutSet(packs={}, samples=chosen, seed=7)
    generated = [(None, {"video": np.zeros(3)})] * 2
    out = tmp_path / "samples" / "step_00000002"
    left = ended_run_partial_folder(tmp_path / "samples" / "step_00000001")
    with pytest.raises(KeyboardInterrupt):
        samples.write_held_out(out, held_out, generated, None, "ckpt", 2, 8)
    assert written == ["t2v"] and list((tmp_path / "samples").iterdir()) == []  # nor a partial folder
    assert str(left) in caplog.text
    written.clear()
    monkeypatch.setattr(samples, "write_generated_sample", lambda folder, *args: (folder / "video.mp4").touch())
    assert samples.write_held_out(out, held_out, generated, None, "ckpt", 2, 8) == {
        "t2v": out / "t2v",
        "v2a": out / "v2a",
    }
    assert sorted(p.name for p in out.iterdir()) == ["t2v", "v2a"]
    assert (out / "v2a" / LATENTS_FILE).is_file()


def test_a_held_out_sample_holding_nan_writes_its_latents_and_a_warning_not_black_media(tmp_path, caplog):
    """A diverged model's NaN video latents were decoded to black frames and logged as the step's
    sample. Its media are not written; the warning names the step, the task and the piece, and
    latents.npz keeps what was generated. The other task's sample is written as before (control)."""
    from types import SimpleNamespace

    from megatron_cosmos3.data.latent_encoders import PooledLatentEncoder
    from megatron_cosmos3.inference.media_outputs import GeneratedSample
    from megatron_cosmos3.training import samples

    decoder = PooledLatentEncoder(8, 16)
    clip = decoder.encode_video(np.zeros((5, 32, 32, 3), np.uint8), 24.0)
    tokens = clip.tokens.clone()
    tokens[1, 2] = float("nan")
    diverged = GeneratedSample(video=type(clip)(tokens, clip.grid_thw, 24.0))
    streams = SimpleNamespace(fps=24.0, embodiment=None)
    chosen = [samples.HeldOutSample(task, 0, i, i, "a prompt", streams) for i, task in enumerate(["t2v", "i2v"])]
    held_out = samples.HeldOutSet(packs={}, samples=chosen, seed=0)
    generated = [(diverged, {"video": tokens.numpy()}), (GeneratedSample(video=clip), {"video": clip.tokens.numpy()})]
    out = tmp_path / "samples" / "step_00000002"
    samples.write_held_out(out, held_out, generated, decoder, "ckpt", 2, 8)
    assert sorted(p.name for p in (out / "t2v").iterdir()) == [LATENTS_FILE]
    assert np.isnan(np.load(out / "t2v" / LATENTS_FILE)["video"]).sum() == 1
    assert "step 2: held-out sample t2v (pack 0, sample 0): the generated video (1 of" in caplog.text
    assert {"video.mp4", LATENTS_FILE} <= {p.name for p in (out / "i2v").iterdir()}
