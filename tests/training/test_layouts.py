"""The trainer under every parallel layout follows the single-process run, and resumes across layouts."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_cosmos3.testing.training import TINY_MODEL, TINY_SYNTHETIC, loss_history
from megatron_cosmos3.training import train as train_module
from megatron_cosmos3.training.config import load_config
from megatron_cosmos3.training.distributed import DistributedContext

REPO = Path(__file__).resolve().parents[2]
TINY = [
    *TINY_MODEL,
    "model.num_layers=4",
    *TINY_SYNTHETIC,
    "log_every=1",
    "optimizer.warmup_steps=1",
    "checkpoint.save_every=2",
    "tracking.experiment=layouts",
]


def overrides(tmp_path, name, *extra):
    return TINY + [
        f"checkpoint.directory={tmp_path / name}",
        f"tracking.tracking_uri={tmp_path / 'mlflow.db'}",
        f"tracking.run_name={name}",
        *extra,
    ]


def torchrun(tmp_path, name, *extra, nproc=2):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "megatron_cosmos3.training.train",
        *overrides(tmp_path, name, *extra),
    ]
    result = subprocess.run(
        command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def history_with_steps(tmp_path, name):
    return loss_history(tmp_path / "mlflow.db", name, experiment="layouts")


def history(tmp_path, name):
    return [value for _, value in history_with_steps(tmp_path, name)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, two micro-batches per step: the global batch every layout below shares."""
    tmp_path = tmp_path_factory.mktemp("layouts")
    config = load_config(None, overrides(tmp_path, "single", "steps=3", "optimizer.micro_batches_per_step=2"))
    train_module.train(config, DistributedContext(0, 1, 0, torch.device("cpu")))
    return tmp_path, history(tmp_path, "single")


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.tensor=2", "optimizer.micro_batches_per_step=2"],
        ["parallel.tensor=2", "parallel.sequence_parallel=true", "optimizer.micro_batches_per_step=2"],
        ["parallel.pipeline=2", "optimizer.micro_batches_per_step=2"],
        ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "optimizer.micro_batches_per_step=2"],
        ["parallel.context=2", "optimizer.micro_batches_per_step=2"],
        ["optimizer.micro_batches_per_step=1"],  # DP=2: one micro-batch per data-parallel rank
        ["parallel.tensor=2", "parallel.pipeline=2", "optimizer.micro_batches_per_step=2"],  # 4 ranks
    ],
    ids=["tp2", "tp2-sp", "pp2", "pp2-interleaved", "cp2", "dp2-zero", "tp2xpp2"],
)
def test_each_layout_trains_like_one_process(reference, layout):
    tmp_path, want = reference
    name = "-".join(part.split("=")[0].split(".")[-1] + part.split("=")[1] for part in layout)
    nproc = 4 if "parallel.pipeline=2" in layout and "parallel.tensor=2" in layout else 2
    torchrun(tmp_path, name, "steps=3", *layout, nproc=nproc)
    assert history(tmp_path, name) == pytest.approx(want, rel=1e-5)


@pytest.mark.multiprocess
def test_saved_with_tp2_resumes_with_dp2_and_with_one_process(reference):
    tmp_path, want = reference
    torchrun(tmp_path, "tp2-then", "steps=2", "parallel.tensor=2", "optimizer.micro_batches_per_step=2")
    for name in ("dp2-resumed", "single-resumed"):
        shutil.copytree(tmp_path / "tp2-then", tmp_path / name)
    torchrun(tmp_path, "dp2-resumed", "steps=3", "optimizer.micro_batches_per_step=1")
    config = load_config(None, overrides(tmp_path, "single-resumed", "steps=3", "optimizer.micro_batches_per_step=2"))
    train_module.train(config, DistributedContext(0, 1, 0, torch.device("cpu")))
    # Both resumed runs continue the MLflow run of the checkpoint they resumed: steps 1-2 under
    # TP=2, then step 3 once under DP=2 with ZeRO and once in one process.
    losses = {}
    for step, value in history_with_steps(tmp_path, "tp2-then"):
        losses.setdefault(step, []).append(value)
    assert losses[1] == pytest.approx([want[0]], rel=1e-5) and losses[2] == pytest.approx([want[1]], rel=1e-5)
    assert losses[3] == pytest.approx([want[2], want[2]], rel=1e-5)


MOE = ["model.num_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden_size=16", "model.moe_aux_loss_weight=0.1"]


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory):
    """The single-process run of a model with MoE MLPs in both towers (balancing loss on)."""
    tmp_path = tmp_path_factory.mktemp("moe_layouts")
    config = load_config(None, overrides(tmp_path, "moe-single", "steps=3", "optimizer.micro_batches_per_step=2", *MOE))
    train_module.train(config, DistributedContext(0, 1, 0, torch.device("cpu")))
    return tmp_path, history(tmp_path, "moe-single")


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.tensor=2"],
        ["parallel.tensor=2", "parallel.sequence_parallel=true"],
        ["parallel.context=2"],
    ],
    ids=["tp2", "tp2-sp", "cp2"],
)
def test_mixture_of_experts_trains_like_one_process(moe_reference, layout):
    tmp_path, want = moe_reference
    name = "moe-" + "-".join(part.split("=")[0].split(".")[-1] + part.split("=")[1] for part in layout)
    torchrun(tmp_path, name, "steps=3", "optimizer.micro_batches_per_step=2", *MOE, *layout)
    assert history(tmp_path, name) == pytest.approx(want, rel=1e-5)
