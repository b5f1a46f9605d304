"""Generation in every DM mode: requests built through the data path, cached sampling equal to
uncached full-forward sampling, classifier-free guidance, per-sample seeds, named errors, and the
same samples from a model split over two ranks."""

import copy
import json
import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

from megatron_cosmos3.data.schema import Sample
from megatron_cosmos3.encoders.action_normalization import denormalize_actions
from megatron_cosmos3.encoders.audio_vae import HOP, AudioLatents
from megatron_cosmos3.encoders.video_vae import VideoLatents
from megatron_cosmos3.inference.denoising import (
    full_forward_velocity,
    initial_noise,
    prefill,
    sample_dm_tokens,
    velocity,
)
from megatron_cosmos3.inference.generation import generate, packed_sample_streams
from megatron_cosmos3.inference.requests import (
    DEFAULT_FPS,
    GenerationRequest,
    generation_builder,
    prepare_request,
    request_fields,
)
from megatron_cosmos3.inference.solvers import SamplerConfig
from megatron_cosmos3.model.config import EmbodimentConfig
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.packed_batch import PackedBatch
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.tasks.registry import get_task
from megatron_cosmos3.testing.distributed import run_on_ranks
from megatron_cosmos3.testing.generation import (
    EMBODIMENT,
    GENERATION_TASKS,
    action_stats,
    generation_config,
    generation_setup,
    request_for,
)

CONFIG = generation_config()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MoTModel(copy.deepcopy(CONFIG)).eval()


@pytest.fixture(scope="module")
def builder():
    return generation_setup(CONFIG, action_stats())


def streams(result) -> dict[str, torch.Tensor]:
    """The generated values of a result, by stream ("video" also holds a generated image)."""
    sample = result.sample
    pieces = {"video": sample.video, "audio": sample.audio, "actions": sample.actions}
    return {k: v if isinstance(v, torch.Tensor) else v.tokens for k, v in pieces.items() if v is not None}


# The shapes request_for asks for: 64x32 pixels (2x1 tokens), 5 frames at 8 fps (2 latent frames,
# 0.625 s: 16 audio tokens of 30000 samples, 7 single-arm actions at 10 Hz: the seventh starts at 0.6 s).
EXPECTED = {
    "video": lambda x: isinstance(x, VideoLatents) and x.grid_thw == (2, 2, 1) and x.fps == 8.0,
    "image": lambda x: isinstance(x, VideoLatents) and x.grid_thw == (1, 2, 1) and x.fps is None,
    "audio": lambda x: isinstance(x, AudioLatents) and x.tokens.shape == (16, 6) and x.num_samples == 30000,
    "actions": lambda x: isinstance(x, torch.Tensor) and x.shape == (7, 19),
}


def traced(velocity_of, log):
    """``velocity_of`` recording what each evaluation was given and returned."""

    def run(batch):
        out = velocity_of(batch)
        log.append((batch.dm_tokens, batch.dm_timesteps, out))
        return out

    return run


@pytest.mark.parametrize("task", GENERATION_TASKS)
def test_cached_sampling_equals_uncached_full_forward_sampling(task, model, builder):
    # Heun and guidance: both AR caches (prompt and dropped prompt) serve every evaluation; another
    # task shares the pack.
    other = "text_to_audio_video" if task != "text_to_audio_video" else "policy"
    requests = [request_for(task, seed=1, solver="heun"), request_for(other, seed=2, solver="heun")]
    ar_passes = []
    hook = model.layers[0].reasoner.input_layernorm.register_forward_pre_hook(lambda *_: ar_passes.append(1))
    try:
        cached = generate(model, requests, builder)
        assert len(ar_passes) == 2  # one prefill with the prompt, one without: not one per step
        uncached = generate(model, requests, builder, cached=False)
        assert len(ar_passes) == 2 + 2 * SamplerConfig("heun", 3).num_evaluations
    finally:
        hook.remove()

    # Step for step: every evaluation of the cached sampler sees and returns what the full pass does.
    _, conditional, _ = packs(builder, requests)
    cache = prefill(model, conditional)
    with_cache, without = [], []
    sampler, seeds = SamplerConfig("heun", 3), [1, 2]
    sample_dm_tokens(model, conditional, sampler, seeds, traced(lambda b: velocity(model, b, cache), with_cache))
    sample_dm_tokens(model, conditional, sampler, seeds, traced(full_forward_velocity(model), without))
    assert len(with_cache) == len(without) == sampler.num_evaluations
    for (tokens, t, v), (tokens_full, t_full, v_full) in zip(with_cache, without):
        assert torch.equal(t, t_full)
        for key in tokens:
            assert torch.equal(tokens[key], tokens_full[key]) and torch.equal(v[key], v_full[key]), key
    noisy = {role.stream for role in get_task(task).dm if role.noisy}
    sample = cached[0].sample
    for name in noisy:
        piece = {"image": sample.video, "video": sample.video, "audio": sample.audio, "actions": sample.actions}[name]
        assert EXPECTED[name](piece), (name, piece)
    delivered = {"video" if name == "image" else name for name in noisy} | ({"video"} if "audio" in noisy else set())
    assert set(streams(cached[0])) == delivered  # a generated sound comes with its clip
    if "actions" in noisy:
        assert (sample.embodiment, sample.action_rate_hz) == (EMBODIMENT, 10.0)
    for got, want in zip(cached, uncached):
        assert streams(got).keys() == streams(want).keys()
        for name, generated in streams(got).items():
            assert torch.equal(generated, streams(want)[name]), (got.request.task, name)
            assert torch.isfinite(generated).all()
    reseeded = streams(generate(model, [request_for(task, seed=7, solver="heun")], builder)[0])
    assert all(not torch.equal(reseeded[name], streams(cached[0])[name]) for name in reseeded)
    record = cached[0].record("ckpt/step_00000010", 10, {"image": "first.png"})
    assert (record.task, record.prompt, record.seed, record.solver, record.steps, record.guidance) == (
        task,
        requests[0].prompt,
        1,
        "heun",
        3,
        2.0,
    )
    assert (record.checkpoint, record.checkpoint_step) == ("ckpt/step_00000010", 10)
    assert record.conditioning == {"image": "first.png"}
    reads = request_fields(get_task(task))
    assert record.settings["shift"] == 1.0 and record.settings.get("fps") == (8.0 if "fps" in reads else None)
    assert record.settings.get("embodiment") == (EMBODIMENT if "embodiment" in reads else None)


def test_conditioning_stays_and_generated_actions_are_unnormalised(model, builder):
    request = request_for("image_to_video", seed=3)
    prepared = prepare_request(request, builder)
    out = generate(model, [request], builder)[0].sample.video
    first_frame = prepared.conditional.sample.dm_streams[0][1]  # the clean span: the image's latent frame
    assert torch.equal(out.tokens[: first_frame.shape[0]], first_frame)
    # Policy generates actions from noise alone: with statistics they come out un-normalised.
    plain = generate(model, [request_for("policy", seed=4)], generation_setup(CONFIG))[0].sample.actions
    scaled = generate(model, [request_for("policy", seed=4)], builder)[0].sample.actions
    assert torch.allclose(scaled, denormalize_actions(plain, builder.action_stats[EMBODIMENT]), atol=1e-5)
    assert not torch.allclose(scaled, plain)


@pytest.mark.parametrize(("seconds", "fps"), [(2.0, 24.0), (1.3, 30.0), (0.5, 8.0)])
def test_audio_lasts_as_long_as_the_video_it_is_generated_with(seconds, fps, builder):
    request = request_for("text_to_audio_video", num_frames=None, duration_s=seconds, fps=fps, resolution=(32, 32))
    prepared = prepare_request(request, builder)
    frames = 1 + 4 * (prepared.video_grid[0] - 1)
    assert abs(frames / fps - seconds) <= 2 / fps  # the nearest 1 + 4k frames
    video_s, audio_s = frames / fps, prepared.audio_num_samples / 48_000
    assert abs(audio_s - video_s) < 0.04  # within one audio latent
    audio_tokens = dict(prepared.conditional.sample.dm_streams)["audio"].shape[0]
    assert audio_tokens == -(-prepared.audio_num_samples // 1920)


def test_results_write_as_media_with_their_record(tmp_path, model, builder):
    from megatron_cosmos3.inference.media_outputs import sidecar_path, write_generated_sample

    requests = [request_for("text_to_audio_video", seed=1), request_for("text_to_image", seed=2)]
    wanted = [{"video.mp4", "audio.wav"}, {"image.png"}]
    for i, (result, names) in enumerate(zip(generate(model, requests, builder), wanted)):
        record = result.record("ckpt", 3)
        files = write_generated_sample(tmp_path / str(i), result.sample, record, builder.latent_encoder)
        assert set(files) == names
        meta = json.loads(sidecar_path(files[min(names)]).read_text())
        assert (meta["task"], meta["seed"], meta["checkpoint_step"]) == (result.request.task, i + 1, 3)
    video = json.loads(sidecar_path(tmp_path / "0" / "video.mp4").read_text())["media"]
    assert (video["frame_count"], video["fps"]) == (5, 8.0)
    assert abs(video["audio"]["duration_s"] - video["duration_s"]) < 0.04


def packs(builder, requests):
    prepared = [prepare_request(r, builder) for r in requests]
    conditional = PackedBatch.from_samples([p.conditional.sample for p in prepared])
    unconditional = PackedBatch.from_samples([p.unconditional.sample for p in prepared])
    return prepared, conditional, unconditional


def rows_of(batch, tokens, index):
    owner = torch.repeat_interleave(torch.arange(batch.num_samples), batch.dm_cu_seqlens.diff())
    rows = {k: v[owner[batch.dm_token_index[k]] == index] for k, v in tokens.items()}
    return {k: v for k, v in rows.items() if v.shape[0]}


def test_guidance_one_is_the_conditional_prediction_and_zero_the_unconditional(model, builder):
    prepared, conditional, unconditional = packs(builder, [request_for("text_to_video"), request_for("policy")])
    # The unconditional pass keeps the layout: the same AR section without the prompt, the same DM section.
    for p in prepared:
        with_prompt, without = p.conditional.sample, p.unconditional.sample
        prompt = len(builder.tokenizer.encode(p.request.prompt))
        assert torch.equal(without.ar_token_ids, with_prompt.ar_token_ids[prompt:])
        assert [k for k, _ in without.dm_streams] == [k for k, _ in with_prompt.dm_streams]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(without.dm_streams, with_prompt.dm_streams))
    sampler, seeds = SamplerConfig("heun", 3), [5, 6]
    guided = sample_dm_tokens(model, conditional, sampler, seeds, unconditional=unconditional, guidance=[1.0, 0.0])
    cond_only = sample_dm_tokens(model, conditional, sampler, seeds)
    uncond_only = sample_dm_tokens(model, unconditional, sampler, seeds)
    for key, want in rows_of(conditional, cond_only, 0).items():
        assert torch.equal(rows_of(conditional, guided, 0)[key], want)
    for key, want in rows_of(conditional, uncond_only, 1).items():
        assert torch.equal(rows_of(conditional, guided, 1)[key], want)
    assert not torch.equal(cond_only["video"], uncond_only["video"])  # the prompt matters: not vacuous

    # One Euler step from t = 1 to 0: x0 = noise - (v_u + g (v_c - v_u)).
    noise = initial_noise(conditional, seeds)
    ones = torch.where(conditional.dm_noise_mask, 1.0, 0.0)
    v_c = velocity(model, conditional.replace(dm_tokens=noise, dm_timesteps=ones), prefill(model, conditional))
    v_u = velocity(model, unconditional.replace(dm_tokens=noise, dm_timesteps=ones), prefill(model, unconditional))
    one_step = sample_dm_tokens(model, conditional, SamplerConfig("euler", 1), seeds, None, unconditional, 2.5)
    for key in noise:
        moving = conditional.dm_noise_mask[conditional.dm_token_index[key]][:, None]
        want = torch.where(moving, noise[key] - (v_u[key] + 2.5 * (v_c[key] - v_u[key])), noise[key])
        assert torch.allclose(one_step[key], want, atol=1e-6)


def test_a_samples_noise_and_result_do_not_depend_on_its_pack_company(model, builder):
    alone = request_for("text_to_audio_video", seed=11)
    company = [request_for("policy", seed=12), alone, request_for("forward_dynamics", seed=13)]
    _, single, _ = packs(builder, [alone])
    _, shared, _ = packs(builder, company)
    noise_alone = rows_of(single, initial_noise(single, [11]), 0)
    noise_shared = rows_of(shared, initial_noise(shared, [12, 11, 13]), 1)
    assert noise_alone.keys() == noise_shared.keys()
    for key in noise_alone:
        assert torch.equal(noise_alone[key], noise_shared[key])
    reseeded = rows_of(single, initial_noise(single, [99]), 0)
    assert not torch.equal(reseeded["video"], noise_alone["video"])
    assert not torch.equal(noise_alone["video"][:2], noise_alone["video"][2:])  # rows draw their own noise

    by_itself = generate(model, [alone], builder)[0]
    together = generate(model, company, builder)[1]
    one_per_pack = generate(model, company, builder, tokens_per_pack=1)[1]
    for name, want in streams(by_itself).items():
        assert torch.allclose(streams(together)[name], want, atol=1e-5)
        assert torch.equal(streams(one_per_pack)[name], want)


_PICTURE = np.zeros((64, 32, 3), np.uint8)
_CLIP = np.zeros((5, 64, 32, 3), np.uint8)


@pytest.mark.parametrize(
    ("task", "changes", "message"),
    [
        ("nope", {}, "unknown task 'nope'"),
        ("understanding", {}, "task 'understanding': has no DM targets"),
        ("image_to_video", {"image": None, "video": None}, "task 'image_to_video': needs a conditioning image or"),
        (  # the video's first frame was taken and the image dropped silently
            "image_to_video",
            {"image": _PICTURE, "video": _CLIP},
            "task 'image_to_video': gives both image and video, and reads only one as its first frame",
        ),
        ("video_to_audio", {"video": None}, "task 'video_to_audio': needs a conditioning video"),
        ("policy", {"image": None}, "task 'policy': needs an image: the observation"),
        ("policy", {"embodiment": None}, "task 'policy': needs an embodiment"),
        ("inverse_dynamics", {"embodiment": "tripod"}, "unknown embodiment 'tripod'; the model knows \\['single_arm"),
        ("forward_dynamics", {"actions": None}, "task 'forward_dynamics': needs conditioning actions"),
        ("forward_dynamics", {"actions": torch.zeros(6, 5).numpy()}, "actions of shape \\(6, 5\\); embodiment"),
        (  # the actions of another clip than the one asked for (0.625 s: 6 steps at 10 Hz)
            "forward_dynamics",
            {"actions": torch.zeros(20, 19).numpy()},
            "span 2.000 s \\(20 steps at 10 Hz, embodiment 'single_arm'\\) but the clip lasts 0.625 s; give 7",
        ),
        ("forward_dynamics", {"actions": torch.zeros(2, 19).numpy()}, "the actions span 0.200 s \\(2 steps"),
        ("text_to_video", {"resolution": None}, "task 'text_to_video': resolution \\(height, width\\) is needed"),
        (  # floats (NaN too) were encoded as if 0..255; four channels or grey failed inside the encoder
            "image_to_video",
            {"video": None, "image": np.full((64, 32, 3), np.nan, np.float32)},
            "task 'image_to_video': image of dtype float32 and shape \\(64, 32, 3\\); want \\(H, W, 3\\) uint8 RGB",
        ),
        ("image_to_video", {"video": None, "image": np.zeros((64, 32, 4), np.uint8)}, "image of dtype uint8 and shape"),
        (
            "video_to_audio",
            {"video": np.zeros((5, 64, 32), np.uint8)},
            "video of dtype uint8 and shape \\(5, 64, 32\\)",
        ),
        (
            "text_to_image",
            {"resolution": (60, 32)},
            "resolution=\\(60, 32\\) must be positive multiples of 32 pixels \\(one video token",
        ),
        ("text_to_video", {"num_frames": None}, "task 'text_to_video': the clip length is needed"),
        ("text_to_video", {"num_frames": 6}, "task 'text_to_video': num_frames=6: video has 6 frames"),
        ("image_to_video", {"num_frames": 1}, "1 frames make 1 latent frames; the task needs 2"),
        ("text_to_video", {"solver": "rk4"}, "task 'text_to_video': solver='rk4' must be one of"),
        ("text_to_video", {"fps": 0.0}, "task 'text_to_video': fps must be a positive number, got 0.0"),
        ("text_to_video", {"fps": 1e6}, "task 'text_to_video': fps=1000000.0 is outside \\[0.1, 1000.0\\]"),
        ("text_to_video", {"guidance": float("nan")}, "task 'text_to_video': guidance=nan must be a finite number"),
        ("text_to_video", {"guidance": -1.0}, "guidance=-1.0 must be a finite number in \\[0, 100\\]"),
        # Bounds: a billion steps ran for days, a guidance of 1e30 made every token Inf.
        ("text_to_video", {"steps": 10**9}, "steps=1000000000 must be an integer in \\[1, 1000\\]"),
        ("text_to_video", {"steps": 0}, "task 'text_to_video': steps=0 must be an integer in \\[1, 1000\\]"),
        ("text_to_video", {"guidance": 1e30}, "task 'text_to_video': guidance=1e\\+30 must be a finite number in"),
        ("text_to_video", {"seed": -1}, "task 'text_to_video': seed=-1 must be an integer in \\[0, 2\\*\\*63 - 1\\]"),
        ("text_to_video", {"seed": 2**64}, "task 'text_to_video': seed=18446744073709551616 must be an integer"),
        ("text_to_video", {"shift": float("inf")}, "task 'text_to_video': shift=inf must be a finite number > 0"),
        # A shift this far from 1 ran the model at t = 1.0 (or 0.0) for all steps but one: float32's time.
        ("text_to_video", {"shift": 1e300}, "shift=1e\\+300: steps 0 and 1 of num_steps=3 are at the same time"),
        ("text_to_video", {"shift": 1e-300}, "shift=1e-300: steps 1 and 2 of num_steps=3 are at the same time"),
        # 0.01 s was a clip of one frame (1 / fps s) without a word.
        (
            "text_to_video",
            {"num_frames": None, "duration_s": 0.01},
            "duration_s=0.01 is shorter than one frame at fps=8 \\(0.125 s\\)",
        ),
    ],
)
def test_bad_requests_are_named(task, changes, message, model, builder):
    with pytest.raises(ValueError, match=message):
        generate(model, [request_for(task, **changes)], builder)


@pytest.mark.parametrize(
    ("value", "message"), [(float("nan"), "holds 1 NaN/inf values"), (1e30, "holds a value of magnitude 1e\\+30")]
)
def test_conditioning_actions_that_are_not_finite_numbers_are_refused(value, message, model, builder):
    """A NaN or overflowing action step (a damaged .npy) is named, not generated from as NaN tokens."""
    request = request_for("forward_dynamics")
    request.actions = request.actions.astype(np.float64)
    request.actions[2, 3] = value
    with pytest.raises(
        ValueError, match=f"task 'forward_dynamics': (non_finite|out_of_range): conditioning actions {message}"
    ):
        generate(model, [request], builder)


def test_tasks_the_model_was_not_trained_for_are_refused(builder):
    with pytest.raises(ValueError, match="task 'policy': the model was not trained for it"):
        generate(MoTModel(copy.deepcopy(CONFIG)), [request_for("policy")], builder, trained_tasks={"text_to_video"})
    headless = MoTModel(generation_config(embodiments={}))
    with pytest.raises(ValueError, match="task 'policy': the model has no action head for embodiment 'single_arm'"):
        generate(headless, [request_for("policy")], builder)


LAYOUTS = {"tp2": ParallelSizes(tensor=2), "pp2": ParallelSizes(pipeline=2)}


def layout_requests():
    """Every kind of stream (image, video, audio, actions; clean and noisy) and a ViT picture."""
    tasks = ("text_to_image", "text_to_audio_video", "forward_dynamics", "policy_with_future")
    return [request_for(task, seed=i, solver="heun", steps=2) for i, task in enumerate(tasks)]


def _generate_under_layouts(rank, world_size):
    from megatron_cosmos3.parallel.plan import ParallelPlan
    from megatron_cosmos3.parallel.state import destroy_parallel

    results = {}
    for name, sizes in LAYOUTS.items():
        plan = ParallelPlan.create(sizes, CONFIG, world_size)
        try:
            torch.manual_seed(0)  # the model's init seed, as the one-process model's
            with torch.device("meta"):
                model = MoTModel(copy.deepcopy(CONFIG))
            plan.allocate(model, torch.device("cpu"))
            plan.apply(model, lambda m: [{"params": list(m.parameters())}])
            out = generate(model, layout_requests(), generation_setup(CONFIG, action_stats()), plan=plan)
            results[name] = [streams(result) for result in out]
        finally:
            plan.close()
            destroy_parallel()
    return results


@pytest.mark.slow
@pytest.mark.multiprocess
def test_generation_under_tensor_and_pipeline_parallelism_equals_one_process(model, builder):
    want = [streams(result) for result in generate(model, layout_requests(), builder)]
    for rank_results in run_on_ranks(_generate_under_layouts, 2):
        for name, samples in rank_results.items():
            for got, expected in zip(samples, want, strict=True):
                for key in expected:
                    assert torch.allclose(got[key], expected[key], atol=1e-4), (name, key)


@pytest.mark.parametrize("fps", [8.0, 29.97, 60.0])
def test_a_packed_samples_streams_read_from_the_pack_are_its_requests(fps, builder):
    """``packed_sample_streams`` (what training's held-out samples use: a pack has no request) reads
    from the pack alone the outputs, grid, frame rate, audio length and embodiment the request made."""
    actions = torch.zeros(round(5 / fps * 10), 19).numpy()  # forward dynamics: actions spanning the 5 frames
    prepared = [prepare_request(request_for(task, fps=fps, actions=actions), builder) for task in GENERATION_TASKS]
    batch = PackedBatch.from_samples([p.conditional.sample for p in prepared])
    for index, p in enumerate(prepared):
        got = packed_sample_streams(batch, index, CONFIG)
        assert got.outputs == p.outputs, p.request.task
        if {"video", "image"} & set(p.outputs):
            assert got.video_grid == p.video_grid, p.request.task
            assert got.fps == (fps if "video" in p.outputs else got.fps), p.request.task
        if "audio" in p.outputs:  # the clip's length, not the pack's whole 40 ms tokens
            assert got.audio_num_samples == p.audio_num_samples, p.request.task
        if "actions" in p.outputs:
            assert (got.embodiment, got.action_rate_hz) == (EMBODIMENT, CONFIG.embodiments[EMBODIMENT].rate_hz)


def test_another_video_patch_size_cuts_requests_into_its_tokens():
    """At model.video_patch_size=4 a token is 64x64 pixels: a clip is asked and decoded in those,
    a conditioning picture is cut to them, and a resolution or picture of fewer is named."""
    config = generation_config(video_patch_size=4)
    torch.manual_seed(0)
    model, builder = MoTModel(config).eval(), generation_setup(config)
    picture = torch.zeros(150, 70, 3, dtype=torch.uint8).numpy()  # cut to 128x64: 2x1 tokens
    asked = request_for("text_to_video", resolution=(128, 64))
    continued = request_for("image_to_video", image=picture, video=None, resolution=None)
    for result in generate(model, [asked, continued], builder):
        video = result.sample.video
        assert video.grid_thw == (2, 2, 1) and video.tokens.shape[1] == config.video_latent_channels * 16
        assert builder.latent_encoder.decode_video(video).shape == (5, 128, 64, 3)
    with pytest.raises(ValueError, match=r"resolution=\(96, 64\) must be positive multiples of 64 pixels"):
        generate(model, [request_for("text_to_video", resolution=(96, 64))], builder)
    with pytest.raises(ValueError, match=r"frames of 32x64 pixels are smaller than one video token \(64x64"):
        generate(model, [request_for("image_to_video", video=None, resolution=None)], builder)  # a 64x32 picture


@pytest.mark.parametrize(
    ("fps", "frames", "action_rate_hz"),
    [(24, 13, 15), (24, 17, 15), (29.97, 9, 7.5), (30000 / 1001, 21, 10), (23.976, 5, 30), (59.94, 33, 7.5),
     (8, 5, 10), (10, 1, 15), (25, 5, 10), (12.5, 9, 12.5)],
)  # fmt: skip
def test_generated_actions_are_as_many_steps_as_training_keeps_of_the_clip(fps, frames, action_rate_hz):
    """A request for ``frames`` frames generates the action steps that start while they show,
    ceil(frames / fps x rate) exactly, the number training keeps of a clip of those frames whose
    actions run on past its last frame (one rule: ``tasks.layout.steps_before``); at rates whose
    product is no integer (24 fps / 15 Hz: 8.125 steps), round() made one fewer. Audio alike."""
    config = generation_config(embodiments={EMBODIMENT: EmbodimentConfig(19, float(action_rate_hz))})
    builder = generation_setup(config, action_stats())
    seconds = Fraction(frames) / Fraction(str(fps))
    want = math.ceil(seconds * Fraction(str(action_rate_hz)))
    latent_frames = (frames - 1) // 4 + 1
    clip = Sample(  # a training clip of these frames; actions and sound run a second past them
        key="clip",
        instruction="act",
        video_latents=torch.zeros(latent_frames, config.video_token_dim).numpy(),
        video_latent_grid=(latent_frames, 1, 1),
        fps=float(fps),
        audio_latents=torch.zeros(math.ceil((seconds + 1) * 25), config.audio_latent_dim).numpy(),
        audio_num_samples=math.ceil((seconds + 1) * 25) * HOP,
        actions=torch.zeros(want + math.ceil(action_rate_hz), 19).numpy(),
        embodiment=EMBODIMENT,
        action_rate_hz=float(action_rate_hz),
    )
    key = f"action/{EMBODIMENT}"
    trained = dict(builder.build(clip, get_task("inverse_dynamics")).sample.dm_streams)[key].shape[0]
    trained_audio = dict(builder.build(clip, get_task("video_to_audio")).sample.dm_streams)["audio"].shape[0]
    for length in ({"num_frames": frames}, {"num_frames": None, "duration_s": float(seconds)}):
        request = request_for("policy", fps=float(fps), **length)
        generated = dict(prepare_request(request, builder).conditional.sample.dm_streams)[key].shape[0]
        sound = request_for("text_to_audio_video", fps=float(fps), **length)
        audio = dict(prepare_request(sound, builder).conditional.sample.dm_streams)["audio"].shape[0]
        assert generated == trained == want, length
        assert audio == trained_audio == math.ceil(seconds * 25), length


@pytest.mark.parametrize("fps", [Fraction(30000, 1001), "24000/1001"])
def test_a_frame_rate_given_as_a_fraction_is_generated_and_written_as_that_rate(fps, model, builder, tmp_path):
    """30000/1001 given as a Fraction or as ffprobe writes it: the request generates what its float
    does, and the mp4 and its sidecar state the exact rate (the sidecar's JSON could not hold a Fraction)."""
    from megatron_cosmos3.inference.media_outputs import sidecar_path, write_generated_sample

    rate = float(Fraction(fps))
    result = generate(model, [request_for("text_to_audio_video", fps=fps, steps=1)], builder)[0]
    same = generate(model, [request_for("text_to_audio_video", fps=rate, steps=1)], builder)[0]
    assert result.sample.video.fps == rate and torch.equal(result.sample.video.tokens, same.sample.video.tokens)
    write_generated_sample(tmp_path, result.sample, result.record("ckpt", 1), builder.latent_encoder)
    media = json.loads(sidecar_path(tmp_path / "video.mp4").read_text())["media"]
    assert media["fps_fraction"] == str(Fraction(fps)) and media["frame_count"] == 5


@pytest.mark.parametrize(
    "task, reads, extra",
    [
        ("text_to_image", {"resolution": (64, 32)}, {"fps": 30.0}),
        # fps=24 equals DEFAULT_FPS: compared with the default, an explicit 24 read as unset and passed
        ("text_to_image", {"resolution": (64, 32)}, {"fps": DEFAULT_FPS}),
        ("text_to_image", {"resolution": (64, 32)}, {"num_frames": 9, "duration_s": 1.0}),
        ("text_to_video", {"num_frames": 5, "resolution": (64, 32)}, {"image": _PICTURE}),
        ("text_to_video", {"num_frames": 5, "resolution": (64, 32)}, {"embodiment": EMBODIMENT}),
        ("video_to_audio", {"video": _CLIP}, {"actions": np.zeros((6, 19), np.float32), "embodiment": EMBODIMENT}),
        ("inverse_dynamics", {"video": _CLIP, "embodiment": EMBODIMENT}, {"audio": np.zeros((2, 480), np.float32)}),
        ("policy", {"image": _PICTURE, "embodiment": EMBODIMENT, "num_frames": 5}, {"audio_sample_rate": 48000}),
    ],
)
def test_a_field_the_task_does_not_read_is_refused_naming_it_and_the_task(task, reads, extra, builder):
    """A text->image request given a frame rate or a length, or a text->video request given a picture,
    was generated as if they were not there: the user believed they shaped the sample."""
    with pytest.raises(ValueError, match=re.escape(f"task {task!r}: does not read {sorted(extra)}; it reads [")):
        prepare_request(GenerationRequest(task, "a prompt", **reads, **extra), builder)
    assert prepare_request(GenerationRequest(task, "a prompt", **reads), builder).outputs  # control: without them


def test_an_unset_fps_makes_and_records_the_clip_an_explicit_default_does(model, builder):
    """fps=None is "not given" (so an explicit 24 counts as given, above) and is read as DEFAULT_FPS."""
    unset, explicit = request_for("text_to_video", fps=None), request_for("text_to_video", fps=DEFAULT_FPS)
    made = generate(model, [unset, explicit], builder)
    assert torch.equal(made[0].sample.video.tokens, made[1].sample.video.tokens)
    assert made[0].sample.video.fps == made[1].sample.video.fps == DEFAULT_FPS
    assert made[0].record("ckpt").settings["fps"] == made[1].record("ckpt").settings["fps"] == DEFAULT_FPS


@pytest.mark.parametrize("tokens_per_pack", [0, -5, True, 2.5, "64"])
def test_a_pack_budget_that_is_no_positive_integer_is_refused(tokens_per_pack, model, builder):
    with pytest.raises(ValueError, match=re.escape(f"tokens_per_pack={tokens_per_pack!r} must be None or an integer")):
        generate(model, [request_for("text_to_image")], builder, tokens_per_pack=tokens_per_pack)
    with pytest.raises(ValueError, match=re.escape(f"max_text_tokens={tokens_per_pack!r} must be an integer >= 1")):
        generation_builder(CONFIG, builder.tokenizer, builder.latent_encoder, max_text_tokens=tokens_per_pack)


@pytest.mark.parametrize(
    ("fps", "length", "frames"),
    [
        ("24000/1001", {"duration_s": 0.77}, 17),  # 18.5 frames: the nearest 1 + 4k is 17
        (25.0, {"num_frames": 13}, 13),
        (30.0, {"duration_s": 0.77}, 25),  # 23.1 frames -> 25
        (60.0, {"duration_s": 0.31}, 17),  # 18.6 frames -> 17
        (12.0, {"num_frames": 9}, 9),
        (1.0, {"duration_s": 3.3}, 5),  # 3.3 frames -> 5 (1 is 2.3 frames off, 5 is 1.7)
    ],
)
def test_a_clip_with_sound_is_written_at_the_rate_and_length_asked_for(fps, length, frames, model, builder, tmp_path):
    """Read back by tools that are not ours (ffprobe, ``wave``): the mp4 holds the frames the model
    generated at the exact rate asked for and lasts frames / fps; its muxed sound and audio.wav last
    as long (within one frame), at 48 kHz."""
    import wave

    from megatron_cosmos3.encoders.video_vae import encoded_frame_count
    from megatron_cosmos3.inference.media_outputs import write_generated_sample
    from megatron_cosmos3.testing.media_probe import ffprobe_streams

    request = request_for("text_to_audio_video", fps=fps, steps=1, **({"num_frames": None} | length))
    (result,) = generate(model, [request], builder)
    assert encoded_frame_count(result.sample.video.grid_thw[0]) == frames  # what the model generated
    files = write_generated_sample(tmp_path, result.sample, result.record("ckpt"), builder.latent_encoder)
    rate, seconds = Fraction(fps), Fraction(frames) / Fraction(fps)
    video, sound = (ffprobe_streams(files["video.mp4"])[kind] for kind in ("video", "audio"))
    assert int(video["nb_read_frames"]) == frames and Fraction(video["r_frame_rate"]) == rate
    assert float(video["duration"]) == pytest.approx(float(seconds), abs=1e-3)
    assert int(sound["sample_rate"]) == 48_000 and abs(float(sound["duration"]) - float(seconds)) <= 1 / float(rate)
    with wave.open(str(files["audio.wav"])) as wav:
        assert wav.getframerate() == 48_000 and abs(wav.getnframes() - float(seconds) * 48_000) <= 1


@pytest.mark.parametrize(
    ("embodiment", "dim", "rate_hz", "fps", "frames"),
    [
        ("so100", 6, 30.0, 30.0, 17),  # a raw robot: its dataset's 6 columns
        ("humanoid", 57, 20.0, 24000 / 1001, 9),
        ("single_arm", 19, 7.5, 60.0, 33),
    ],
)
def test_written_actions_are_the_horizon_asked_for_un_normalised_with_the_saved_statistics(
    embodiment, dim, rate_hz, fps, frames, tmp_path
):
    """Other robots, rates and horizons: actions.npy holds ceil(frames / fps x rate) steps of the
    embodiment's width, each the model's normalised output x std + mean of action_stats.json (read
    here with ``json``, not with the loader), and pseudo-actions give steps + 1 poses."""
    import json as json_module

    from megatron_cosmos3.encoders.action_normalization import ActionStats, EmbodimentActionStats
    from megatron_cosmos3.encoders.pseudo_actions import get_layout
    from megatron_cosmos3.inference.media_outputs import sidecar_path, write_generated_sample

    config = generation_config(embodiments={embodiment: EmbodimentConfig(dim, rate_hz)})
    torch.manual_seed(0)
    model = MoTModel(config).eval()
    rng = np.random.default_rng(dim)
    measured = rng.normal(rng.uniform(-5, 5, dim), rng.uniform(0.01, 20, dim), (400, dim))
    raw = embodiment == "so100"
    ActionStats({embodiment: EmbodimentActionStats.from_actions(embodiment, measured, raw=raw)}).save(tmp_path)
    saved = json_module.loads((tmp_path / "action_stats.json").read_text())["embodiments"][embodiment]
    request = request_for("policy", fps=fps, num_frames=frames, embodiment=embodiment, steps=1)
    (plain,) = generate(model, [request], generation_setup(config))  # no statistics: the model's own units
    (result,) = generate(model, [request], generation_setup(config, ActionStats.load(tmp_path)))
    files = write_generated_sample(
        tmp_path / "out", result.sample, result.record("ckpt"), generation_setup(config).latent_encoder
    )
    written = np.load(files["actions.npy"])
    steps = math.ceil(Fraction(frames) / Fraction(fps).limit_denominator(1001) * Fraction(rate_hz))
    assert written.shape == (steps, dim) and written.dtype == np.float32
    expected = plain.sample.actions.double().numpy() * np.array(saved["std"]) + np.array(saved["mean"])
    np.testing.assert_allclose(written, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    media = json_module.loads(sidecar_path(files["actions.npy"]).read_text())["media"]
    assert (media["steps"], media["dim"], media["rate_hz"], media["embodiment"]) == (steps, dim, rate_hz, embodiment)
    if not raw:  # DESIGN.md, "Generated media": (steps + 1, parts, 4, 4) float64 poses, (steps + 1, width) joints
        layout = get_layout(embodiment)
        poses, joints = np.load(files["poses.npy"]), np.load(files["joints.npy"])
        assert poses.shape == (steps + 1, len(layout.pose_parts), 4, 4) and poses.dtype == np.float64
        assert joints.shape == (steps + 1, sum(width for _, width in layout.joint_parts))
        np.testing.assert_allclose(poses[:, :, 3], np.broadcast_to([0.0, 0.0, 0.0, 1.0], poses[:, :, 3].shape))


@pytest.mark.parametrize(
    ("fps", "frames"), [(60.0, 17), (30.0, 13), (24000 / 1001, 9), (30000 / 1001, 21), (60000 / 1001, 17)]
)
def test_a_held_out_packs_clip_and_its_sound_are_written_in_sync(fps, frames, builder, tmp_path):
    """Training's held-out samples come from packs: their sound was as long as its whole 40 ms
    tokens, up to 40 ms past the last frame (37 ms at 60 fps: more than two frames). Read back by
    ffprobe, the muxed sound now lasts the clip's frames / fps within one frame, as a request's, and
    the clip's rate is the pack's own: 24000/1001, not 2997/125 (23.976, 1 ppm off). (30000/1001 at
    13 frames after this prompt has the positions of 29.97 fps, bit for bit: written 2997/100.)"""
    from megatron_cosmos3.inference.generation import generated_sample
    from megatron_cosmos3.inference.media_outputs import write_generated_sample
    from megatron_cosmos3.testing.media_probe import ffprobe_streams

    request = request_for("text_to_audio_video", fps=fps, num_frames=frames, steps=1)
    batch = PackedBatch.from_samples([prepare_request(request, builder).conditional.sample])
    streams = packed_sample_streams(batch, 0, CONFIG)
    sample = generated_sample(streams, batch, batch.dm_tokens, 0)
    files = write_generated_sample(tmp_path, sample, request_record(request), builder.latent_encoder)
    video, sound = (ffprobe_streams(files["video.mp4"])[kind] for kind in ("video", "audio"))
    seconds = frames / fps
    assert int(video["nb_read_frames"]) == frames and float(video["duration"]) == pytest.approx(seconds, abs=1e-3)
    rate = Fraction(fps).limit_denominator(1001)
    assert video["r_frame_rate"] == f"{rate.numerator}/{rate.denominator}"
    assert abs(float(sound["duration"]) - seconds) <= 1 / fps
    assert sample.audio.num_samples == round(seconds * 48_000)


def request_record(request):
    from megatron_cosmos3.inference.media_outputs import GenerationRecord

    return GenerationRecord(request.task, request.prompt, request.seed, request.solver, request.steps, 1.0, "held-out")
