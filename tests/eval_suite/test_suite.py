"""The evaluation suite's parts: its config refuses bad values by name, the held-out cases carry
their truth, the truth scored through the suite is the oracle row while a corrupted prediction
scores worse, the chance model is a seeded fresh init, and the trainer's periodic eval logs the
suite's metrics to MLflow (docs/DESIGN.md, "Evaluation")."""

from __future__ import annotations

import os
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from megatron_cosmos3.encoders.action_normalization import STD_FLOOR, ActionStats, EmbodimentActionStats
from megatron_cosmos3.eval_suite.cases import held_out_cases
from megatron_cosmos3.eval_suite.config import SUITE_TASKS, SuiteConfig, load_suite_config
from megatron_cosmos3.eval_suite.predictions import Prediction, untrained_model
from megatron_cosmos3.eval_suite.scoring import action_scale, task_rows
from megatron_cosmos3.evaluation.actions import spread_of
from megatron_cosmos3.evaluation.video import PSNR_MAX_DB
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.testing.training import TINY_MODEL, loss_history, tiny_mot_config, tracking_store
from megatron_cosmos3.world.environment import TASKS

CASES = SuiteConfig(cases_per_task=2)
EMBODIMENTS = ("single_arm", "humanoid")


@pytest.fixture(scope="module")
def cases():
    return held_out_cases(CASES, SUITE_TASKS, EMBODIMENTS)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"cases_per_task": 0}, "cases_per_task=0"),
        ({"steps": -1}, "steps=-1"),
        ({"tasks": ["policy", "dance"]}, "tasks=['policy', 'dance']"),
        ({"tasks": []}, "tasks=[]"),
        ({"solver": "rk4"}, "solver='rk4'"),
        ({"duration_s": 0.3}, "duration_s=0.3 x fps=16.0"),
        ({"resolution": 48}, "resolution=48"),
        ({"guidance": float("nan")}, "guidance=nan"),
        # Crafted sizes that would allocate without bound are refused as the shards' ranges refuse them.
        ({"resolution": 32 * 10**6}, "above clips.MAX_CLIP_BYTES"),
        ({"duration_s": 1e9}, "duration_s=1000000000.0 at most 86400"),
        ({"fps": 1e9}, "fps=1000000000.0 must be in [0.1, 1000.0]"),
        # An episode's length: 1e300 s was numpy's 'Maximum allowed size exceeded' in the chance
        # policy's actions, after the model's episodes; a day of 2048x2048 frames is 1.2 TB recorded.
        ({"closed_loop_horizon_s": 1e300}, "closed_loop_horizon_s=1e+300 is at most 86400"),
        ({"closed_loop_horizon_s": 86400.0, "resolution": 2048}, "resolution x closed_loop_horizon_s: the clip is"),
        # numpy refuses a negative world seed, torch one past 64 bits, deep inside the suite's run
        ({"world_seed": -3}, "world_seed=-3 must be an integer in [0, 2**63 - 1]"),
        ({"chance_seed": 2**64}, "chance_seed=18446744073709551616 must be an integer"),
        ({"seed": -1}, "seed=-1 must be an integer"),
        # Upper bounds (named constants): each of these ran for days or exhausted memory.
        ({"steps": 10**9}, "steps=1000000000 must be an integer in [1, 1000] (solvers.MAX_STEPS)"),
        ({"guidance": 1e6}, "guidance=1000000.0 must be a finite number in [0, 100]"),
        ({"shift": float("inf")}, "shift=inf must be a finite number > 0"),
        ({"max_new_tokens": 10**9}, "max_new_tokens=1000000000 must be an integer in [1, 32768]"),
        ({"cases_per_task": 401}, "cases_per_task=401 must be an integer in [1, 400] (MAX_SAMPLES_SEARCHED)"),
        ({"closed_loop_episodes": 10**6}, "closed_loop_episodes=1000000 must be an integer in [0, 1000]"),
        ({"closed_loop_episodes": -1}, "closed_loop_episodes=-1 must be an integer in [0, 1000]"),
        ({"fps": True}, "fps=True must be a finite number > 0"),  # was a frame-step message about 0.5 x True
        # A window as long as the clip scored any sound as starting at its collision.
        ({"onset_tolerance_s": 1e9}, "onset_tolerance_s=1000000000.0 must be below duration_s=0.5"),
    ],
)
def test_a_bad_config_value_is_an_error_naming_the_field_and_value(change, message):
    with pytest.raises(ValueError, match="eval suite") as error:
        SuiteConfig(**change)
    assert message in str(error.value)


def test_the_config_loads_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text("tasks: [policy, understanding]\nsteps: 3\n")
    config = load_suite_config(str(path), ["cases_per_task=4"])
    assert (config.tasks, config.steps, config.cases_per_task) == (["policy", "understanding"], 3, 4)
    path.write_text("colour: red\n")
    with pytest.raises(ValueError, match="colour"):
        load_suite_config(str(path))
    with pytest.raises(ValueError, match="steps"):
        load_suite_config(None, ["steps=many"])
    os.mkfifo(tmp_path / "fifo.yaml")  # read, it waited for a writer forever
    (tmp_path / "link.yaml").symlink_to("gone.yaml")
    for name, why in (
        ("fifo.yaml", "not a regular file (a FIFO)"),
        ("none.yaml", "missing (no such file)"),
        ("link.yaml", "not a regular file (a dangling symbolic link to 'gone.yaml')"),
        ("", "not a regular file (a folder)"),
    ):
        given = str(tmp_path / name)
        with pytest.raises(ValueError, match="^" + re.escape(f"eval suite --config={given!r}: {why}") + "$"):
            load_suite_config(given)
    with pytest.raises(ValueError, match=r"^eval suite: resolution=<an integer of 4400 digits> is not a number"):
        load_suite_config(None, ["resolution=" + "6" * 4400])
    assert load_suite_config(None, ["steps=1_0"]).steps == 10  # control: YAML's own digit grouping loads
    # A wrong type or a byte that is not UTF-8: one line naming the file and the key.
    for text, key in (
        (b"media: maybe\n", "full_key: media"),
        (b"tasks: policy\n", "full_key: tasks"),
        (b"closed_loop_tasks: {a: 1}\n", "closed_loop_tasks: a mapping where a list belongs"),  # named no key
        (b"- tasks\n", "holds a YAML list, not a mapping of settings"),
        (b"steps: \xff\n", "0xff"),
        # Python's int() refused it with its own text ('Exceeds the limit (4300 digits)'), naming no key.
        (b"steps: 1" + b"0" * 5000 + b"\n", "steps=<an integer of 5001 digits> is not a number any setting takes"),
        (b'resolution: "' + b"1" * 4500 + b'"\n', "resolution=<an integer of 4500 digits>"),  # 5,000 characters
        (
            b"tasks: [policy]\nclosed_loop_tasks:\n  - -" + b"9" * 4400 + b"\n",
            "closed_loop_tasks[0]=<an integer of 4400",
        ),
    ):
        path.write_bytes(text)
        with pytest.raises(ValueError) as error:
            load_suite_config(str(path))
        assert str(path) in str(error.value) and key in str(error.value) and "\n" not in str(error.value)


def test_held_out_cases_carry_their_truth_and_are_deterministic(cases):
    assert list(cases) == list(SUITE_TASKS) and all(len(found) == 2 for found in cases.values())
    again = held_out_cases(CASES, ["policy"], EMBODIMENTS)["policy"]
    assert [c.index for c in again] == [c.index for c in cases["policy"]]
    np.testing.assert_array_equal(again[0].sample.actions, cases["policy"][0].sample.actions)
    for task in ("forward_dynamics", "inverse_dynamics", "policy"):
        assert all(c.sample.embodiment in EMBODIMENTS and c.sample.actions is not None for c in cases[task])
    assert all(len(c.collision_times_s) > 0 for c in cases["video_to_audio"])
    assert all(c.sample.question and c.sample.answer for c in cases["understanding"])
    assert all(c.asked for c in cases["text_to_video"])
    # The frames a model generates: after the past (1 latent frame of 3) or the first frame.
    assert cases["forward_dynamics"][0].first_scored_frame == 1 and cases["text_to_video"][0].first_scored_frame == 0
    request = cases["forward_dynamics"][0].request(CASES)
    assert len(request.video) == 1 and request.num_frames == len(cases["forward_dynamics"][0].frames)
    (demo,) = held_out_cases(SuiteConfig(cases_per_task=1, demonstration_fraction=1.0), ["policy"], EMBODIMENTS)[
        "policy"
    ]
    assert demo.sample.timing["task"]["kind"] in TASKS  # an expert's episode: a task's instruction and actions
    with pytest.raises(ValueError, match="too few cases"):
        held_out_cases(CASES, ["policy"], ["planar_pusher_v2"], search=3)


def truth(case) -> Prediction:
    s = case.sample
    return Prediction(s.video, float(s.fps), s.audio.astype(np.float32), s.actions, s.answer)


def corrupted(case, rng) -> Prediction:
    """Frames one step late, actions negated, sound 30 ms late, a wrong answer."""
    s = case.sample
    late = np.concatenate([s.video[:1], s.video[:-1]])
    audio = np.concatenate([np.zeros((2, 1440), np.float32), s.audio[:, :-1440].astype(np.float32)], axis=1)
    return Prediction(late, float(s.fps), audio, -s.actions, "seventeen")


def noise(case, rng) -> Prediction:
    s = case.sample
    return Prediction(
        rng.integers(0, 256, s.video.shape, dtype=np.uint8),
        float(s.fps),
        rng.uniform(-0.5, 0.5, s.audio.shape).astype(np.float32),
        rng.normal(size=s.actions.shape).astype(np.float32) if s.actions is not None else None,
        "blue",
    )


def test_the_truth_scores_the_oracle_row_and_a_corrupted_prediction_scores_worse(cases):
    rng = np.random.default_rng(0)
    best = {"psnr_db": PSNR_MAX_DB, "ssim": 1.0, "position_error_m": 0.0, "balls_missed": 0.0, "action_rmse": 0.0}
    best.update(action_rmse_worst_dim=0.0, right_colours=1.0, right_colours_and_counts=1.0, accuracy=1.0)
    for task, found in cases.items():
        chance = [noise(c, rng) for c in found]
        exact = task_rows(task, found, [truth(c) for c in found], chance, CASES)
        worse = task_rows(task, found, [corrupted(c, rng) for c in found], chance, CASES)
        for row, bad in zip(exact, worse):
            metric = row.name.rsplit("/", 1)[1]
            assert row.model == pytest.approx(row.oracle), row.name  # the truth through the metric is the oracle
            if metric in best:
                assert row.oracle == best[metric], row.name
            if metric in ("psnr_db", "ssim", "action_rmse", "accuracy", "onset_error_ms"):
                sign = 1 if row.higher_is_better else -1
                assert sign * bad.model < sign * row.oracle, bad.name


def test_action_errors_are_in_the_unit_training_normalised_with_over_the_dims_that_move(cases):
    true = np.concatenate([c.sample.actions for c in cases["policy"] if c.sample.embodiment == "single_arm"])
    noisy = true + np.random.default_rng(0).normal(0, 0.1, true.shape).astype(np.float32)
    noisy[:, 3] = 0.5  # a dimension that never moves in the data
    stats = EmbodimentActionStats.from_actions("single_arm", noisy)
    scale, moving, note = action_scale(ActionStats({"single_arm": stats}), "single_arm", true)
    assert not moving[3] and moving.sum() == 18 and note.startswith("dataset std")
    np.testing.assert_allclose(scale, np.array(stats.std)[moving])
    scale, moving, note = action_scale(None, "single_arm", true)  # no statistics: the truth's own spread
    np.testing.assert_allclose(scale, spread_of(true)[moving])
    assert (spread_of(true)[~moving] <= STD_FLOOR).all() and note.startswith("true spread")


def test_the_chance_model_is_a_fresh_init_of_the_seed_and_leaves_the_rng_alone():
    model = MoTModel(tiny_mot_config())
    state = torch.get_rng_state()
    a, b, other = untrained_model(model, 7), untrained_model(model, 7), untrained_model(model, 8)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), other.parameters()))
    assert not a.training and not any(p.requires_grad for p in a.parameters())


def test_periodic_eval_in_training_logs_the_suite_metrics(tmp_path):
    from megatron_cosmos3.training import train as train_module
    from megatron_cosmos3.training.config import load_config
    from megatron_cosmos3.training.distributed import DistributedContext

    overrides = [
        *TINY_MODEL,
        "model.vocab_size=260",
        "synthetic.samples_per_pack=4",
        "synthetic.scale=1",
        "synthetic.tasks=[understanding,policy]",
        "steps=1",
        "eval.every=1",
        "eval.micro_batches=1",
        "eval.suite.tasks=[policy,inverse_dynamics,understanding]",
        "eval.suite.cases_per_task=1",
        "eval.suite.steps=2",
        "eval.suite.max_new_tokens=3",
        "tracking.generation_samples=false",
        "checkpoint.async_save=false",
        "data.encoders.kind=pooled",
        f"checkpoint.directory={tmp_path / 'ckpt'}",
        f"tracking.tracking_uri={tracking_store(tmp_path)}",
        "tracking.run_name=suite",
    ]
    cpu = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    train_module.train(load_config(None, overrides), cpu)
    db = tmp_path / "mlflow.db"
    for reference in ("model", "oracle", "chance"):
        history = loss_history(db, "suite", metric=f"eval/policy/single_arm/action_rmse/{reference}")
        assert [step for step, _ in history] == [1], reference
    assert loss_history(db, "suite", metric="eval/policy/single_arm/action_rmse/oracle")[0][1] == 0.0
    assert loss_history(db, "suite", metric="eval/understanding/accuracy/oracle") == [(1, 1.0)]
    assert [step for step, _ in loss_history(db, "suite", metric="eval/loss")] == [1]  # beside the held-out loss
    from megatron_cosmos3.evaluation.report import EvalReport

    written = tmp_path / "ckpt" / "eval_suite" / "step_00000001" / "report.json"
    report = EvalReport.from_json(written.read_text(), str(written))
    assert report.meta["skipped_tasks"] == {"inverse_dynamics": "not trained"}
    assert report.meta["step"] == 1


def test_a_world_embodiment_of_another_action_width_is_refused_before_anything_runs():
    """A model whose single_arm is 7-D would be fed the world's 19-D actions: the suite refuses it
    when it is built (it failed inside the first evaluation), and the training config when it loads."""
    from megatron_cosmos3.data.tokenizer import ByteTokenizer
    from megatron_cosmos3.encoders.latent_config import LatentEncoderConfig
    from megatron_cosmos3.eval_suite.suite import EvalSuite
    from megatron_cosmos3.model.config import EmbodimentConfig
    from megatron_cosmos3.training.config import load_config

    message = r"model.embodiments.single_arm.action_dim=7, but the held-out world's 'single_arm' acts with 19-D"
    seven = {"single_arm": EmbodimentConfig(7, 10.0), "gripper": EmbodimentConfig(1, 10.0)}
    model = MoTModel(tiny_mot_config(vocab_size=260, embodiments=seven))
    with pytest.raises(ValueError, match=message):
        EvalSuite.for_run(CASES, model, ByteTokenizer(260), LatentEncoderConfig(kind="pooled"), ["policy"])
    robots = "model.embodiments={single_arm: {action_dim: 7}, gripper: {action_dim: 1}}"
    with pytest.raises(ValueError, match=message):
        load_config(None, [*TINY_MODEL, "model.vocab_size=260", robots, "eval.suite={}"])
    load_config(None, [*TINY_MODEL, "model.vocab_size=260", robots])  # no suite: nothing to refuse


def test_a_vit_the_worlds_pictures_do_not_fit_is_refused_when_the_suite_is_built():
    """The world's cases hold pictures, cut in 32-pixel ViT tokens: a ViT of 28-pixel tokens is
    refused as the suite is built, not at its first picture (generation refuses it only there)."""
    from megatron_cosmos3.data.tokenizer import ByteTokenizer
    from megatron_cosmos3.encoders.latent_config import LatentEncoderConfig
    from megatron_cosmos3.eval_suite.suite import EvalSuite
    from megatron_cosmos3.model.config import VisionConfig
    from megatron_cosmos3.testing.training import TINY_VISION

    model = MoTModel(tiny_mot_config(vocab_size=260, vision=VisionConfig(**{**TINY_VISION, "patch_size": 14})))
    with pytest.raises(
        ValueError, match=r"patch_size\*spatial_merge_size=14\*2=28, but the data's ViT tokens are 32x32"
    ):
        EvalSuite.for_run(CASES, model, ByteTokenizer(260), LatentEncoderConfig(kind="pooled"), ["policy"])


def test_the_held_out_world_acts_at_the_model_embodiments_rates():
    """A model whose single arm acts at 20 Hz (the world's default is 10) is measured on truth
    sampled at 20 Hz, in the open-loop cases and the closed-loop world alike; a rate the clip cannot
    hold whole is refused naming it."""
    from megatron_cosmos3.data.tokenizer import ByteTokenizer
    from megatron_cosmos3.encoders.latent_config import LatentEncoderConfig
    from megatron_cosmos3.eval_suite.suite import EvalSuite
    from megatron_cosmos3.model.config import EmbodimentConfig

    config = SuiteConfig(cases_per_task=1, tasks=["policy"], closed_loop_episodes=1)
    model = MoTModel(tiny_mot_config(vocab_size=260, embodiments={"single_arm": EmbodimentConfig(19, 20.0)}))
    suite = EvalSuite.for_run(config, model, ByteTokenizer(260), LatentEncoderConfig(kind="pooled"), ["policy"])
    (case,) = suite.cases["policy"]
    assert case.sample.action_rate_hz == 20.0 and len(case.sample.actions) == round(config.duration_s * 20)
    assert suite.world.action_rates["single_arm"] == 20.0
    model = MoTModel(tiny_mot_config(vocab_size=260, embodiments={"humanoid": EmbodimentConfig(57, 15.0)}))
    with pytest.raises(
        ValueError,
        match=r"duration_s=0.5 must hold a whole number of frames/poses at 15.0/s "
        r"\(model.embodiments' rate_hz: \{'humanoid': 15.0\}\)",
    ):
        EvalSuite.for_run(config, model, ByteTokenizer(260), LatentEncoderConfig(kind="pooled"), ["policy"])
    # 0.4 s holds 25 Hz whole, but the closed-loop world steps its physics at 960 Hz, which 25 Hz
    # does not divide: refused before any model runs, naming the embodiment (open loop alone runs).
    model = MoTModel(tiny_mot_config(vocab_size=260, embodiments={"humanoid": EmbodimentConfig(57, 25.0)}))
    config = SuiteConfig(cases_per_task=1, tasks=["policy"], fps=20.0, duration_s=0.4, closed_loop_episodes=1)
    with pytest.raises(ValueError, match=r"closed loop of 'humanoid': action rate=25 must divide the physics rate"):
        EvalSuite.for_run(config, model, ByteTokenizer(260), LatentEncoderConfig(kind="pooled"), ["policy"])
    config.closed_loop_episodes = 0
    EvalSuite.for_run(config, model, ByteTokenizer(260), LatentEncoderConfig(kind="pooled"), ["policy"])


def test_clips_shorter_than_an_executed_chunk_are_refused_before_any_model_runs():
    """Closed loop executes EXECUTE_S of each chunk the policy generates for a clip of duration_s:
    0.4 s at 20 fps (9 actions at 20 Hz) is fewer than the 10 executed per 0.5 s chunk. The episode
    failed on that after every open-loop task had run; it is refused when the suite is made,
    naming the embodiment and the numbers, and runs with closed_loop_episodes=0."""
    from megatron_cosmos3.data.tokenizer import ByteTokenizer
    from megatron_cosmos3.encoders.latent_config import LatentEncoderConfig
    from megatron_cosmos3.eval_suite.suite import EvalSuite
    from megatron_cosmos3.model.config import EmbodimentConfig

    model = MoTModel(tiny_mot_config(vocab_size=260, embodiments={"single_arm": EmbodimentConfig(19, 20.0)}))
    config = SuiteConfig(cases_per_task=1, tasks=["policy"], fps=20.0, duration_s=0.4, closed_loop_episodes=1)
    with pytest.raises(
        ValueError,
        match=r"closed loop of 'single_arm': duration_s=0.4 gives the policy clips of 9 actions at 20 Hz, "
        r"fewer than the 10 executed per chunk \(0.5 s\); use duration_s >= 0.5",
    ):
        EvalSuite.for_run(config, model, ByteTokenizer(260), LatentEncoderConfig(kind="pooled"), ["policy"])
    config.closed_loop_episodes = 0
    EvalSuite.for_run(config, model, ByteTokenizer(260), LatentEncoderConfig(kind="pooled"), ["policy"])
    config.closed_loop_episodes, config.duration_s = 1, 0.6  # 13 frames: 13 actions
    EvalSuite.for_run(config, model, ByteTokenizer(260), LatentEncoderConfig(kind="pooled"), ["policy"])


def test_held_out_clips_must_be_whole_video_tokens_of_the_models_patch():
    from megatron_cosmos3.data.tokenizer import ByteTokenizer
    from megatron_cosmos3.encoders.latent_config import LatentEncoderConfig
    from megatron_cosmos3.eval_suite.suite import EvalSuite

    model = MoTModel(tiny_mot_config(vocab_size=260, video_patch_size=4))
    encoders, config = LatentEncoderConfig(kind="pooled"), SuiteConfig(cases_per_task=1, tasks=["text_to_video"])
    with pytest.raises(ValueError, match=r"resolution=96 is not a multiple of the model's video token \(64 pixels"):
        EvalSuite.for_run(replace(config, resolution=96), model, ByteTokenizer(260), encoders, ["text_to_video"])
    suite = EvalSuite.for_run(replace(config, resolution=128), model, ByteTokenizer(260), encoders, ["text_to_video"])
    assert suite.decoder.video_patch_size == 4 and suite.builder.config.video_patch_size == 4


def test_captions_are_cut_where_the_run_cut_its_texts():
    """The suite's requests cut captions at the run's data.packing.max_text_tokens, as training did."""
    from megatron_cosmos3.data.tokenizer import ByteTokenizer
    from megatron_cosmos3.encoders.latent_config import LatentEncoderConfig
    from megatron_cosmos3.eval_suite.suite import EvalSuite
    from megatron_cosmos3.inference.requests import prepare_request

    model, config = MoTModel(tiny_mot_config(vocab_size=260)), SuiteConfig(cases_per_task=1, tasks=["text_to_video"])
    for cut in (4, 256):
        suite = EvalSuite.for_run(
            config, model, ByteTokenizer(260), LatentEncoderConfig(kind="pooled"), ["text_to_video"], None, cut
        )
        (case,) = suite.cases["text_to_video"]
        built = prepare_request(case.request(config), suite.builder).conditional.sample
        assert built.num_ar_tokens == min(cut, len(case.sample.caption.encode())) + 2  # + EOS, BOG


def test_a_prediction_holding_nan_is_an_error_naming_the_case_never_a_score(cases):
    """A diverged model's NaN latents decoded to black frames, scored as a poor video (PSNR and all);
    its NaN sound or actions failed with a bare "must be finite". The case, the model and the piece
    are named instead, before anything is scored."""
    from megatron_cosmos3.data.tokenizer import ByteTokenizer
    from megatron_cosmos3.encoders.latent_config import LatentEncoderConfig
    from megatron_cosmos3.eval_suite.predictions import predict
    from megatron_cosmos3.eval_suite.suite import EvalSuite

    model = MoTModel(tiny_mot_config(vocab_size=260)).eval()
    config = SuiteConfig(cases_per_task=1, tasks=["image_to_video"], steps=1)
    suite = EvalSuite.for_run(config, model, ByteTokenizer(260), LatentEncoderConfig(kind="pooled"), config.tasks)
    run = lambda: predict(model, suite.cases, config, suite.builder, suite.decoder, suite.tokenizer)  # noqa: E731
    (finite,) = run()["image_to_video"]  # control: the same model and case, finite, predict frames
    assert finite.frames.shape[0] == len(suite.cases["image_to_video"][0].frames)
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if "generator" in name).fill_(float("nan"))
    (case,) = suite.cases["image_to_video"]
    with pytest.raises(ValueError, match=rf"eval suite: case {case.name}, the model's prediction: the generated video"):
        run()
    with pytest.raises(ValueError, match=rf"case {case.name}, the chance model's prediction: .* hold NaN or Inf"):
        predict(model, suite.cases, config, suite.builder, suite.decoder, suite.tokenizer, who="the chance model")


def test_answers_from_nan_logits_are_an_error_naming_the_cases_never_scored():
    """Greedy decoding of NaN logits gave token 0 again and again: an answer scored as merely wrong."""
    from megatron_cosmos3.data.tokenizer import ByteTokenizer
    from megatron_cosmos3.encoders.latent_config import LatentEncoderConfig
    from megatron_cosmos3.eval_suite.predictions import predict
    from megatron_cosmos3.eval_suite.suite import EvalSuite

    model = MoTModel(tiny_mot_config(vocab_size=260)).eval()
    config = SuiteConfig(cases_per_task=1, tasks=["understanding"], max_new_tokens=2)
    suite = EvalSuite.for_run(config, model, ByteTokenizer(260), LatentEncoderConfig(kind="pooled"), config.tasks)
    run = lambda: predict(model, suite.cases, config, suite.builder, suite.decoder, suite.tokenizer)  # noqa: E731
    assert isinstance(run()["understanding"][0].text, str)  # control
    with torch.no_grad():
        model.embed_tokens.weight.fill_(float("nan"))
    (case,) = suite.cases["understanding"]
    with pytest.raises(ValueError, match=rf"eval suite: the model's answers to \['{case.name}'\] .*logits .* NaN"):
        run()


def test_a_prediction_at_another_rate_than_the_truth_is_refused_naming_the_rate(cases):
    """Frames at half the rate, sound at 16 kHz, actions at twice the rate were scored index by index
    against the truth's, as if at its rates: out of step, without a word."""
    from scipy.signal import resample_poly

    def halved_fps(case):  # every other frame: the same clip at half the rate
        return replace(truth(case), frames=case.sample.video[::2], fps=case.sample.fps / 2)

    def sound_at_16k(case):
        return replace(truth(case), audio=resample_poly(truth(case).audio, 1, 3, axis=1), sample_rate=16_000)

    def actions_twice_as_often(case):
        return replace(
            truth(case),
            actions=np.repeat(case.sample.actions, 2, axis=0),
            action_rate_hz=2 * case.sample.action_rate_hz,
        )

    for task, changed, name in (
        ("image_to_video", halved_fps, "fps"),
        ("video_to_audio", sound_at_16k, "sample_rate"),
        ("policy", actions_twice_as_often, "action_rate_hz"),
    ):
        found = cases[task]
        true = [truth(c) for c in found]
        given = getattr(changed(found[0]), name)
        want = rf"{found[0].name}: the model's prediction has {name}={given:g} but the truth's is "
        with pytest.raises(ValueError, match=want):
            task_rows(task, found, [changed(c) for c in found], true, CASES)
        with pytest.raises(ValueError, match=rf"{found[0].name}: the chance model's prediction has {name}="):
            task_rows(task, found, true, [changed(c) for c in found], CASES)
        # Control: the truth with every rate stated is scored.
        stated = [replace(p, sample_rate=48_000, action_rate_hz=c.sample.action_rate_hz) for p, c in zip(true, found)]
        assert task_rows(task, found, stated, true, CASES)


def test_predictions_state_the_rates_they_were_made_at_which_are_the_truths():
    """At 24 fps (not the suite's default 16): the frames, sound and actions the model predicts carry
    their rates, equal to the held-out truth's, and are scored."""
    from megatron_cosmos3.data.tokenizer import ByteTokenizer
    from megatron_cosmos3.encoders.latent_config import LatentEncoderConfig
    from megatron_cosmos3.eval_suite.predictions import predict
    from megatron_cosmos3.eval_suite.suite import EvalSuite

    model = MoTModel(tiny_mot_config(vocab_size=260)).eval()
    config = SuiteConfig(cases_per_task=1, tasks=["video_to_audio", "policy"], steps=1, fps=24.0)
    suite = EvalSuite.for_run(config, model, ByteTokenizer(260), LatentEncoderConfig(kind="pooled"), config.tasks)
    predictions = predict(model, suite.cases, config, suite.builder, suite.decoder, suite.tokenizer)
    (sound,), (policy,) = predictions["video_to_audio"], predictions["policy"]
    (sound_case,), (policy_case,) = suite.cases["video_to_audio"], suite.cases["policy"]
    assert (
        (sound.fps, sound.sample_rate) == (24.0, 48_000) == (sound_case.sample.fps, sound_case.sample.audio_sample_rate)
    )
    assert len(sound.frames) == len(sound_case.frames) == 13 and sound.audio.shape[1] == 13 / 24 * 48_000
    assert (
        policy.action_rate_hz
        == policy_case.sample.action_rate_hz
        == model.config.embodiments[policy_case.sample.embodiment].rate_hz
    )
    for task, found in predictions.items():
        assert task_rows(task, suite.cases[task], found, found, config, suite.builder.action_stats)
