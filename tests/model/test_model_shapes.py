"""Model shapes other than the tiny one: each valid shape trains, reloads and generates; a TP=2 run
of an odd shape follows the one-process run; an invalid shape is refused by name when it loads."""

import copy

import numpy as np
import pytest
import torch

from megatron_cosmos3.checkpoint.checkpointer import Checkpointer
from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.inference.generation import generate
from megatron_cosmos3.inference.text_generation import TextPrompt, TextSampling, generate_text
from megatron_cosmos3.model.config import VisionConfig
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.objectives.losses import mot_losses
from megatron_cosmos3.testing import training as tiny_training
from megatron_cosmos3.testing.generation import action_stats, generation_config, generation_setup, request_for
from megatron_cosmos3.testing.training import (
    TINY_MODEL,
    TINY_SYNTHETIC,
    TINY_VISION,
    loss_history,
    tracking_store,
    train_on_ranks,
)
from megatron_cosmos3.training import train as train_module
from megatron_cosmos3.training.config import load_config
from megatron_cosmos3.training.distributed import DistributedContext
from megatron_cosmos3.training.samples import LATENTS_FILE

# Changes to the tiny model (4 heads, 2 KV heads, head_dim 8, hidden 32, 2 layers, vocab 256).
SHAPES = {
    "one-layer": dict(num_layers=1),
    "three-layers": dict(num_layers=3),
    "gqa-1": dict(num_attention_heads=2, num_kv_heads=2),
    "gqa-4": dict(num_attention_heads=4, num_kv_heads=1),
    "head-dim-24": dict(head_dim=24),
    "head-dim-40": dict(head_dim=40),
    "head-dim-80": dict(head_dim=80),
    "head-dim-2": dict(head_dim=2),  # one rotary pair: the default mRoPE split is [1, 0, 0]
    "one-head": dict(num_attention_heads=1, num_kv_heads=1),
    "hidden-40": dict(hidden_size=40),
    "hidden-33": dict(hidden_size=33),
    "vocab-257": dict(vocab_size=257),
    "vocab-257-tied": dict(vocab_size=257, tie_word_embeddings=True),
    "one-expert": dict(num_experts=1, moe_top_k=1),
    "top-k-all-experts": dict(num_experts=3, moe_top_k=3, moe_ffn_hidden_size=8),
    "experts-in-the-generator-only": dict(num_experts=2, moe_top_k=1, moe_towers=["generator"]),
    "mrope-given": dict(mrope_section=[2, 1, 1]),
    "video-patch-1": dict(video_patch_size=1),
    "video-patch-4": dict(video_patch_size=4),
    "odd-stream-widths": dict(video_latent_channels=3, audio_latent_dim=5),
    # MQA with heads x head_dim = 192 over a hidden size of 32; widths of no common factor.
    "mqa-head-dim-48": dict(num_kv_heads=1, head_dim=48),
    "hidden-17-ffn-7": dict(hidden_size=17, ffn_hidden_size=7),
    "eight-experts-in-the-reasoner-only": dict(
        num_experts=8, moe_top_k=2, moe_ffn_hidden_size=4, moe_towers=["reasoner"]
    ),
}
VIT = tiny_training.TINY_VIT  # the tiny model's two-block ViT
# A shards run's data settings (load_config reads no file: the paths are checked at launch).
SHARDS = [
    "data_source=shards",
    "data.stages={pretrain: {datasets: {w: 1.0}, tasks: {understanding: 1.0}}}",
    "data.datasets=[{name: w, shards: [nowhere]}]",
]
# Generated tasks: video from text and actions from video (both DM towers' heads, every stream kind
# but audio, which text_to_video's pack holds too).
TASKS = ("text_to_video", "policy")


def training_batch(config, seed):
    g = torch.Generator().manual_seed(seed)
    return add_flow_matching_noise(random_pack(config, g, 4), FlowMatchingConfig(), g)


@pytest.mark.parametrize("name", SHAPES)
def test_shape_trains_reloads_and_generates(name, tmp_path):
    config = generation_config(**SHAPES[name])
    model = MoTModel(copy.deepcopy(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = mot_losses(model, *training_batch(config, 0))
    losses.total.backward()
    assert torch.isfinite(losses.total)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    optimizer.step()

    Checkpointer(tmp_path, async_save=False).save(1, model, optimizer, {}, {})
    restored = MoTModel(copy.deepcopy(config))
    # Control: a fresh model holds the initial weights, not the trained ones the load must bring.
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), restored.parameters()))
    Checkpointer(tmp_path, async_save=False).load(tmp_path / "step_00000001", restored, None)
    for (key, a), b in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(a, b), key

    # Requests sized for every patch size: 64 pixels is one video token at video_patch_size 4.
    side = 16 * 4
    requests = [
        request_for(
            task,
            resolution=(side, side),
            video=torch.randint(0, 256, (5, side, side, 3), dtype=torch.uint8).numpy(),
            steps=2,
        )
        for task in TASKS
    ]
    builder = generation_setup(config, action_stats())
    cached = generate(restored, requests, builder)
    uncached = generate(restored, requests, builder, cached=False)
    video = [r.sample.video.tokens for r in (cached[0], uncached[0])]
    actions = [torch.as_tensor(r.sample.actions) for r in (cached[1], uncached[1])]
    assert video[0].shape[1] == config.video_token_dim and actions[0].shape[1] == 19
    # The KV cache gives what the whole forward pass gives, at every shape.
    for one, other in (video, actions):
        torch.testing.assert_close(one, other, rtol=1e-4, atol=1e-4)


def test_a_vit_the_data_pictures_do_not_fit_still_generates_what_needs_no_picture():
    """A ViT of 14-pixel patches (28-pixel tokens) trains on synthetic packs, made at its own widths,
    but the data's pictures are cut in 32-pixel tokens: a prompt or request with a picture is refused
    naming the fields, and one without still generates. Building the generation builder or a prompt
    pack refused such a model whole (a text-only prompt, text_to_video)."""
    config = generation_config(vision=VisionConfig(**{**TINY_VISION, "patch_size": 14}))
    model = MoTModel(copy.deepcopy(config))
    model.add_vision_encoder()
    builder = generation_setup(config, action_stats())
    [video] = generate(model, [request_for("text_to_video", steps=2)], builder)
    assert video.sample.video.tokens.shape[1] == config.video_token_dim
    [text] = generate_text(model, [TextPrompt([1, 2, 3])], TextSampling(max_new_tokens=2), eos_ids=())
    assert len(text.token_ids) == 2
    message = r"model.vision: patch_size\*spatial_merge_size=14\*2=28, but the data's ViT tokens are 32x32 pixels"
    picture = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match=message):
        generate_text(model, [TextPrompt([1, 2, 3], picture)], TextSampling(max_new_tokens=2), eos_ids=())
    with pytest.raises(ValueError, match=message):
        generate(model, [request_for("policy", image=picture, steps=2)], builder)


# Odd in every size at once, and splittable by TP=2: vocab 257 (the embedding is not split over
# tensor ranks, so nothing pads it), hidden 40, head_dim 24, three layers, GQA 2, every token to all
# three experts, one-cell video tokens.
ODD_SHAPE = [
    "model.vocab_size=257",
    "model.hidden_size=40",
    "model.head_dim=24",
    "model.num_layers=3",
    "model.num_experts=3",
    "model.moe_top_k=3",
    "model.moe_ffn_hidden_size=8",
    "model.video_patch_size=1",
]


def odd_shape_run(tmp_path, name, *extra, shape=ODD_SHAPE):
    return [
        *TINY_MODEL,
        *shape,
        *TINY_SYNTHETIC,
        "steps=2",
        "log_every=1",
        "optimizer.warmup_steps=1",
        "optimizer.micro_batches_per_step=2",
        "checkpoint.save_every=2",  # a save, with rank 0's generation samples, at step 2
        "data.encoders.kind=pooled",  # the samples' latents decode to media
        "tracking.sample_steps=2",
        f"checkpoint.directory={tmp_path / name}",
        f"tracking.tracking_uri={tracking_store(tmp_path)}",
        f"tracking.run_name={name}",
        "tracking.experiment=shapes",
        *extra,
    ]


def losses_of(tmp_path, name):
    return [v for _, v in loss_history(tmp_path / "mlflow.db", name, "shapes")]


def assert_same_samples(tmp_path, want_run, got_run):
    """The generation samples (every task's latents) of run ``got_run`` at step 2 equal ``want_run``'s."""
    want_root, got_root = (tmp_path / name / "samples" / "step_00000002" for name in (want_run, got_run))
    tasks = sorted(p.name for p in want_root.iterdir())
    assert tasks and sorted(p.name for p in got_root.iterdir()) == tasks
    for task in tasks:
        want, got = (np.load(root / task / LATENTS_FILE) for root in (want_root, got_root))
        assert want.files and sorted(got.files) == sorted(want.files)
        for key in want.files:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-3, atol=1e-4, err_msg=f"{task} {key}")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_odd_shape_under_tensor_parallel_follows_one_process_in_losses_and_samples(tmp_path):
    config = load_config(None, odd_shape_run(tmp_path, "single"))
    train_module.train(config, DistributedContext(0, 1, 0, torch.device("cpu")))
    train_on_ranks(2, *odd_shape_run(tmp_path, "tp2", "parallel.tensor=2"))
    single, split = losses_of(tmp_path, "single"), losses_of(tmp_path, "tp2")
    assert len(single) == 2 and split == pytest.approx(single, rel=1e-4)
    # Generation at the odd shape: the TP=2 run's samples (every task's) equal the one-process run's.
    assert_same_samples(tmp_path, "single", "tp2")


# The shapes TP cannot split, for the other layouts: one KV head (MQA; CP repeats it to its ranks),
# head_dim 48 x 4 heads = 192 wide over a hidden size of 32, three layers (two pipeline stages
# only unevenly), an odd vocabulary tied to the LM head (the embedding on stage 0, the head on
# stage 1), experts in the Generator alone.
MQA_SHAPE = [
    "model.vocab_size=257",
    "model.tie_word_embeddings=true",
    "model.num_kv_heads=1",
    "model.head_dim=48",
    "model.num_layers=3",
    "model.num_experts=2",
    "model.moe_top_k=1",
    "model.moe_towers=[generator]",
]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_mqa_shape_under_pipeline_then_context_parallel_follows_one_process(tmp_path):
    """Steps 1-2 under PP=2 (uneven stages), saved, resumed for step 3 under CP=2: the losses of
    every step and the step-2 samples are the one-process run's."""
    config = load_config(None, odd_shape_run(tmp_path, "single", "steps=3", shape=MQA_SHAPE))
    train_module.train(config, DistributedContext(0, 1, 0, torch.device("cpu")))
    pipeline = ["parallel.pipeline=2", "parallel.num_layers_in_first_pipeline_stage=1"]
    train_on_ranks(2, *odd_shape_run(tmp_path, "split", *pipeline, shape=MQA_SHAPE))
    assert_same_samples(tmp_path, "single", "split")
    train_on_ranks(2, *odd_shape_run(tmp_path, "split", "steps=3", "parallel.context=2", shape=MQA_SHAPE))
    # The CP=2 run went on from the PP=2 run's checkpoint: it logged step 3 alone, not steps 1-3 again.
    assert [step for step, _ in loss_history(tmp_path / "mlflow.db", "split", "shapes")] == [1, 2, 3]
    single, split = losses_of(tmp_path, "single"), losses_of(tmp_path, "split")
    assert len(single) == 3 and split == pytest.approx(single, rel=1e-4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.head_dim=7"], "head_dim=7 must be even"),
        (["model.mrope_section=[1,1,1]"], r"mrope_section=\[1, 1, 1\] must have 3 entries summing to head_dim/2=4"),
        (["model.num_attention_heads=2", "model.num_kv_heads=4"], "num_attention_heads=2 must be a multiple of"),
        (["model.num_experts=2", "model.moe_top_k=3"], r"moe_top_k=3 must be in \[1, num_experts=2\]"),
        (["model.video_patch_size=0"], "video_patch_size must be a positive int, got 0"),
        (["parallel.tensor=2", "model.num_kv_heads=1"], "num_kv_heads=1 is not divisible by tensor=2"),
        (["parallel.pipeline=2", "model.num_layers=3"], "num_layers=3 is not divisible by pipeline"),
        (["parallel.tensor=2", "model.ffn_hidden_size=63"], "ffn_hidden_size=63 .* is not divisible by tensor=2"),
        (["parallel.expert=2", "model.num_experts=3"], "num_experts=3 is not divisible by expert=2"),
        # Each of these loaded, and failed only once the run had started: the ViT's activation
        # (a KeyError building the ViT), an embodiment name that cannot key its projections (the
        # model's build), the byte tokenizer of the shards or the suite (after the first steps),
        # synthetic text drawn from an empty range (the first step).
        (
            [*VIT, "model.vision.hidden_act=gelu_tanh"],
            "hidden_act='gelu_tanh' is not one of transformers'",
        ),
        (["model.embodiments={arm.v2: {action_dim: 3}}"], "embodiments: embodiment name 'arm.v2' must be"),
        (["stage.new_embodiments={arm/v2: {action_dim: 3}}"], "stage.new_embodiments: .* name 'arm/v2' must be"),
        (["eval.suite={}"], "model.vocab_size=64 is below the byte tokenizer's 256 ids, which eval.suite reads"),
        ([*SHARDS], "model.vocab_size=64 is below the byte tokenizer's 256 ids, which data_source=shards reads"),
        (["model.vocab_size=2"], "model.vocab_size=2: synthetic packs take EOS and BOG as the last two ids"),
    ],
)
def test_invalid_shape_is_refused_by_name_when_the_config_loads(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [*TINY_MODEL, *overrides])


@pytest.mark.parametrize(
    "overrides",
    [
        [*VIT, "model.vision.hidden_act=quick_gelu"],  # another of transformers' activations
        ["model.embodiments={arm_v2: {action_dim: 3}}", "synthetic.tasks=[policy]"],
        ["model.vocab_size=256", "eval.suite={}"],
        ["model.vocab_size=256", *SHARDS],
        ["model.vocab_size=3"],
    ],
)
def test_the_valid_neighbours_of_the_refused_shapes_load(overrides):
    load_config(None, [*TINY_MODEL, *overrides])
