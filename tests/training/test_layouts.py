"""The trainer under every parallel layout follows the single-process run, and resumes across layouts."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_cosmos3.testing.shared_cache import shared_folder
from megatron_cosmos3.testing.training import (
    TINY_MODEL,
    TINY_SYNTHETIC,
    TINY_VIT,
    loss_history,
    tracking_store,
    train_on_ranks,
)
from megatron_cosmos3.training import train as train_module
from megatron_cosmos3.training.config import load_config
from megatron_cosmos3.training.distributed import DistributedContext
from megatron_cosmos3.training.samples import LATENTS_FILE

REPO = Path(__file__).resolve().parents[2]
# Every run's length: step 2's loss follows step 1's update; the held-out loss and the generation
# samples at the last step follow step 2's, the first that AdamW scales by the gradients' sizes
# (its first moves each weight by about the learning rate, whatever the gradient's size).
STEPS = 2
LAST_STEP = f"step_{STEPS:08d}"
TINY = [
    *TINY_MODEL,
    "model.num_layers=4",
    # 8 query / 4 KV heads: TP=2 x CP=2 still splits KV heads (Ulysses needs kv_heads/tp % cp == 0).
    "model.num_attention_heads=8",
    "model.num_kv_heads=4",
    *TINY_SYNTHETIC,
    "log_every=1",
    "optimizer.warmup_steps=1",
    f"checkpoint.save_every={STEPS}",  # one save, with its generation samples, at the last step
    "data.encoders.kind=pooled",  # the samples' latents decode to media
    "tracking.experiment=layouts",
    "tracking.sample_steps=2",  # the samples of every layout compared: two Euler steps show it
    f"eval.every={STEPS}",  # the held-out loss at the last step, through each layout's forward-only driver
]


def overrides(tmp_path, name, *extra):
    return TINY + [
        f"checkpoint.directory={tmp_path / name}",
        f"tracking.tracking_uri={tracking_store(tmp_path)}",
        f"tracking.run_name={name}",
        *extra,
    ]


def train(tmp_path, name, *extra, nproc=2):
    train_on_ranks(nproc, *overrides(tmp_path, name, *extra))


def history_with_steps(tmp_path, name):
    return loss_history(tmp_path / "mlflow.db", name, experiment="layouts")


def history(tmp_path, name, metric="loss"):
    return [value for _, value in loss_history(tmp_path / "mlflow.db", name, "layouts", metric)]


# A mixture-of-experts model (both towers, 4 experts, top-2, balancing loss on) for the expert layouts.
MOE = ["model.num_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden_size=16", "model.moe_aux_loss_weight=0.1"]


def single_process_history(tmp_path, name, *extra):
    """One process, two micro-batches per step: the global batch every layout below shares."""
    config = load_config(
        None, overrides(tmp_path, name, f"steps={STEPS}", "optimizer.micro_batches_per_step=2", *extra)
    )
    train_module.train(config, DistributedContext(0, 1, 0, torch.device("cpu")))
    return history(tmp_path, name)


def shared_reference(name: str, *extra: str) -> tuple[Path, list[float]]:
    """The single-process run ``name`` (its folder and losses), made once per test session and
    read by every worker's layout runs."""
    root = shared_folder(f"layouts-{name}", lambda folder: single_process_history(folder, name, *extra))
    return root, history(root, name)


@pytest.fixture(scope="module")
def reference():
    return shared_reference("single")


@pytest.fixture(scope="module")
def vit_reference():
    return shared_reference("single-vit", *TINY_VIT)


@pytest.fixture(scope="module")
def moe_reference():
    return shared_reference("single-moe", *MOE)


PP2_UNEVEN = ["parallel.pipeline=2", "parallel.num_layers_in_first_pipeline_stage=1"]
# (ranks, overrides): every layout's global batch is two micro-batches, as the reference's.
LAYOUTS = {
    "tp2": (2, ["parallel.tensor=2", "optimizer.micro_batches_per_step=2"]),
    "tp2-sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true", "optimizer.micro_batches_per_step=2"]),
    "pp2": (2, ["parallel.pipeline=2", "optimizer.micro_batches_per_step=2"]),
    "pp2-interleaved": (
        2,
        ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "optimizer.micro_batches_per_step=2"],
    ),
    # Uneven stages (megatron-core's num_layers_in_first_pipeline_stage): one layer, then three.
    "pp2-uneven": (2, [*PP2_UNEVEN, "optimizer.micro_batches_per_step=2"]),
    "cp2": (2, ["parallel.context=2", "optimizer.micro_batches_per_step=2"]),
    "dp2-zero": (2, ["optimizer.micro_batches_per_step=1"]),  # one micro-batch per data-parallel rank
    # megatron-core's DistributedDataParallel averaging the gradients (on gloo through megatron_on_cpu).
    "dp2-megatron": (2, ["parallel.ddp_impl=megatron", "optimizer.micro_batches_per_step=1"]),
    "tp2xpp2": (4, ["parallel.tensor=2", "parallel.pipeline=2", "optimizer.micro_batches_per_step=2"]),
    "tp2xcp2": (4, ["parallel.tensor=2", "parallel.context=2", "optimizer.micro_batches_per_step=2"]),
    "pp2xcp2": (4, ["parallel.pipeline=2", "parallel.context=2", "optimizer.micro_batches_per_step=2"]),
    "tp2-spxcp2": (
        4,
        [
            "parallel.tensor=2",
            "parallel.sequence_parallel=true",
            "parallel.context=2",
            "optimizer.micro_batches_per_step=2",
        ],
    ),
    "tp2-spxpp2": (
        4,
        [
            "parallel.tensor=2",
            "parallel.sequence_parallel=true",
            "parallel.pipeline=2",
            "optimizer.micro_batches_per_step=2",
        ],
    ),
}
MOE_LAYOUTS = {
    "ep2": (2, ["parallel.expert=2", "optimizer.micro_batches_per_step=1"]),  # EP over the 2 DP ranks
    "ep2xpp2": (4, ["parallel.expert=2", "parallel.pipeline=2", "optimizer.micro_batches_per_step=1"]),
    # Experts split over tensor ranks (FFN units), with and without sequence parallelism.
    "moe-tp2": (2, ["parallel.tensor=2", "optimizer.micro_batches_per_step=2"]),
    "moe-tp2-sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true", "optimizer.micro_batches_per_step=2"]),
    "moe-tp2xep2": (4, ["parallel.tensor=2", "parallel.expert=2", "optimizer.micro_batches_per_step=1"]),
    # The balancing loss summed over the CP group, in the plain runner and between pipeline stages.
    "moe-cp2": (2, ["parallel.context=2", "optimizer.micro_batches_per_step=2"]),
    "moe-cp2xpp2": (4, ["parallel.context=2", "parallel.pipeline=2", "optimizer.micro_batches_per_step=2"]),
}

# The model's own ViT (model.vision set): replicated over data, tensor and context ranks, on the first
# pipeline stage only; every pack's pictures encoded in the step.
VIT_LAYOUTS = {
    "vit-dp2-zero": (2, ["optimizer.micro_batches_per_step=1"]),
    "vit-tp2-sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true", "optimizer.micro_batches_per_step=2"]),
    "vit-cp2": (2, ["parallel.context=2", "optimizer.micro_batches_per_step=2"]),
    "vit-pp2-interleaved": (
        2,
        ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "optimizer.micro_batches_per_step=2"],
    ),
}


def check_generation_samples(tmp_path, name, reference_root, reference_name):
    """Every layout logs rank 0's generation samples (the fixed held-out set, one per task) at each
    checkpoint, equal to the single-process ones (the same held-out packs and seeds): cached sampling
    where each rank runs the whole forward (DP, TP, EP), a full pass through the layout's driver per
    step where the layers or the rows are split (PP, CP, SP)."""
    got_root, want_root = tmp_path / name / "samples", reference_root / reference_name / "samples"
    assert sorted(p.name for p in got_root.iterdir()) == [LAST_STEP]
    tasks = sorted(p.name for p in (want_root / LAST_STEP).iterdir())
    assert tasks and sorted(p.name for p in (got_root / LAST_STEP).iterdir()) == tasks
    for task in tasks:
        got, want = (np.load(root / LAST_STEP / task / LATENTS_FILE) for root in (got_root, want_root))
        assert sorted(got.files) == sorted(want.files)
        for key in want.files:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-3, atol=1e-4, err_msg=f"{name} {task} {key}")
        records = sorted((got_root / LAST_STEP / task).glob("*.meta.json"))
        assert records, f"{name} {task}: no media written"
        assert json.loads(records[0].read_text())["steps"] == 2  # tracking.sample_steps


# Each layout family against its own single-process run: (reference fixture, its run, model overrides).
FAMILIES = {
    "dense": ("reference", "single", [], LAYOUTS),
    "moe": ("moe_reference", "single-moe", MOE, MOE_LAYOUTS),
    "vit": ("vit_reference", "single-vit", TINY_VIT, VIT_LAYOUTS),
}
CASES = [(family, name) for family, (*_, layouts) in FAMILIES.items() for name in layouts]


@pytest.mark.multiprocess
@pytest.mark.parametrize("family, name", CASES, ids=[name for _, name in CASES])
def test_each_layout_trains_like_one_process(request, tmp_path, family, name):
    fixture, reference_run, model, layouts = FAMILIES[family]
    reference_root, want = request.getfixturevalue(fixture)
    nproc, layout = layouts[name]
    train(tmp_path, name, f"steps={STEPS}", *model, *layout, nproc=nproc)
    assert history(tmp_path, name) == pytest.approx(want, rel=1e-5)
    held_out = history(tmp_path, name, "eval/loss")
    want_held_out = history(reference_root, reference_run, "eval/loss")
    assert len(held_out) == 1 and held_out == pytest.approx(want_held_out, rel=1e-5)
    check_generation_samples(tmp_path, name, reference_root, reference_run)


# (saved under, resumed under): checkpoints name parameters as the full model does, whatever the layout.
RESUMES = {
    "tp2-then-dp2": (
        ["parallel.tensor=2", "optimizer.micro_batches_per_step=2"],
        ["optimizer.micro_batches_per_step=1"],
    ),
    # Uneven stages (layers 0 | 1..3) saved, even ones (0..1 | 2..3) resumed.
    "pp2-uneven-then-pp2": (
        [*PP2_UNEVEN, "optimizer.micro_batches_per_step=2"],
        ["parallel.pipeline=2", "optimizer.micro_batches_per_step=2"],
    ),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(RESUMES))
def test_saved_under_one_layout_resumes_under_another_and_with_one_process(reference, tmp_path, case):
    _, want = reference
    saved_layout, resumed_layout = RESUMES[case]
    # The losses alone are compared here: no generation samples at the saves, no held-out loss
    # (each layout's: test_each_layout_trains_like_one_process).
    losses_only = ("tracking.generation_samples=false", "eval.every=0")
    resumed_at = STEPS - 1  # saved by the first layout at its last step, inside the reference's run
    train(tmp_path, "saved", f"steps={resumed_at}", *saved_layout, *losses_only)
    for name in ("resumed", "single-resumed"):
        shutil.copytree(tmp_path / "saved", tmp_path / name)
    train(tmp_path, "resumed", f"steps={STEPS}", *resumed_layout, *losses_only)
    single = overrides(tmp_path, "single-resumed", f"steps={STEPS}", "optimizer.micro_batches_per_step=2", *losses_only)
    config = load_config(None, single)
    train_module.train(config, DistributedContext(0, 1, 0, torch.device("cpu")))
    # Both resumed runs continue the MLflow run of the checkpoint they resumed: steps 1 to
    # ``resumed_at`` under the saving layout, then the rest once under the resuming layout and once
    # in one process.
    losses = {}
    for step, value in history_with_steps(tmp_path, "saved"):
        losses.setdefault(step, []).append(value)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(1, resumed_at + 1):
        assert losses[step] == pytest.approx([want[step - 1]], rel=1e-5), step
    for step in range(resumed_at + 1, STEPS + 1):
        assert losses[step] == pytest.approx([want[step - 1], want[step - 1]], rel=1e-5), step
