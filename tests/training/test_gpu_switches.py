"""The GPU-path switches in a training config (docs/DESIGN.md, "GPU fast paths"): combinations that
cannot work are errors naming the fields at load, fp8 without CUDA and Transformer Engine is an
error before the first step, and the TE linears and attention fall back on a CPU to a run equal,
bit for bit, to the torch/sdpa one."""

import dataclasses

import pytest
import torch

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.transformer_engine import transformer_engine_missing, warn_once
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.objectives.losses import mot_losses
from megatron_cosmos3.parallel.plan import ParallelPlan
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.testing.training import TINY_MODEL, TINY_SYNTHETIC
from megatron_cosmos3.training import train as train_module
from megatron_cosmos3.training.config import load_config
from megatron_cosmos3.training.distributed import DistributedContext
from megatron_cosmos3.training.precision import autocast, check_precision

CPU = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(autouse=True)
def fresh_warnings():
    warn_once.cache_clear()  # each test sees its first fallback warning
    yield
    warn_once.cache_clear()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["precision=fp16"], r"precision='fp16' is not one of \('fp32', 'bf16', 'fp8'\)"),
        (["precision=fp8"], r"precision='fp8' quantizes Transformer Engine linears only, but model.linear_impl='torch"),
        (
            ["precision=fp8", "model.linear_impl=te", "recompute=full"],
            r"precision='fp8' with recompute='full'",
        ),
        (["model.attention_backend=te"], r"model.attention_backend='te' runs bf16 .* precision='fp32'"),
        (
            ["model.linear_impl=te", "engine=deepspeed", "precision=bf16"],
            r"model.linear_impl='te' is applied by engine=megatron's parallel plan, got engine='deepspeed'",
        ),
        (["model.linear_impl=cublas"], r"linear_impl='cublas' is not one of \('torch', 'te'\)"),
        (
            ["precision=fp8", "model.linear_impl=te", "model.head_dim=12", "model.mrope_section=[2,2,2]"],
            r"precision='fp8': .* multiples of 16, but with parallel.tensor=1 the TE linears have "
            r"num_kv_heads \* head_dim / tensor = 24$",
        ),
        (
            ["precision=fp8", "model.linear_impl=te", "parallel.tensor=2", "model.ffn_hidden_size=48"],
            r"with parallel.tensor=2 the TE linears have ffn_hidden_size / tensor = 24$",
        ),
    ],
)
def test_impossible_combinations_are_errors_naming_the_fields(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_fp8_widths_count_the_te_linears_only():
    """Experts are no TE linears: a model whose every MLP routes through them keeps an FFN width fp8
    would refuse; a dense tower beside them brings it back (TE 2.9's fp8 GEMMs take no other)."""
    moe = ["precision=fp8", "model.linear_impl=te", "model.num_experts=2", "model.ffn_hidden_size=24"]
    assert load_config(None, moe).model.ffn_hidden_size == 24
    with pytest.raises(ValueError, match=r"ffn_hidden_size / tensor = 24$"):
        load_config(None, [*moe, "model.moe_towers=[generator]"])


def test_selective_recompute_is_allowed_under_fp8():
    """It recomputes the attention only, which TE does not run in fp8."""
    config = load_config(None, ["precision=fp8", "model.linear_impl=te", "recompute=selective"])
    assert config.precision == "fp8"


def test_fp8_without_cuda_is_an_error_before_the_first_step(tmp_path):
    config = load_config(
        None,
        [*TINY_MODEL, *TINY_SYNTHETIC, "precision=fp8", "model.linear_impl=te", f"checkpoint.directory={tmp_path}"],
    )
    with pytest.raises(ValueError, match=r"precision='fp8' runs Transformer Engine's fp8 matmuls, but it needs CUDA"):
        train_module.train(config, CPU)
    assert not list(tmp_path.iterdir()), "nothing may be written before the check"
    with pytest.raises(ValueError, match=r"precision='fp8'.*needs CUDA \(device is cpu\)"):
        autocast("fp8", torch.device("cpu"))
    check_precision("bf16", torch.device("cpu"))  # the others pass anywhere


@pytest.mark.skipif(transformer_engine_missing("cuda") is None, reason="transformer_engine imports here")
def test_fp8_on_cuda_without_te_is_an_error_naming_the_failed_import():
    with pytest.raises(ValueError, match=r"precision='fp8' .* but transformer_engine does not import \(ModuleNotFound"):
        check_precision("fp8", torch.device("cuda"))


def test_te_switches_fall_back_on_cpu_to_the_same_model(tiny_config, caplog):
    """linear_impl=te and attention_backend=te laid out by the parallel plan on a CPU: torch linears
    and sdpa, one warning each, and the loss and gradients of the model that asked for neither, bit
    for bit (the trainer builds through the same ``plan.apply``)."""
    g = torch.Generator().manual_seed(0)
    batch, targets = add_flow_matching_noise(random_pack(tiny_config, g, num_samples=4), FlowMatchingConfig(), g)

    def laid_out(**switches):
        torch.manual_seed(0)
        model = MoTModel(dataclasses.replace(tiny_config, **switches))
        ParallelPlan(ParallelSizes()).apply(model, lambda m: [{"params": list(m.parameters())}])
        with autocast("bf16", torch.device("cpu")):
            mot_losses(model, batch, targets).total.backward()
        return model

    plain = laid_out(linear_impl="torch", attention_backend="sdpa")
    with caplog.at_level("WARNING"):
        asked = laid_out(linear_impl="te", attention_backend="te")
    assert type(asked.layers[0].reasoner.self_attn.q_proj) is torch.nn.Linear
    for (name, want), (_, got) in zip(plain.named_parameters(), asked.named_parameters()):
        if want.grad is None:  # a stream this pack does not have
            assert got.grad is None, name
        else:
            assert torch.equal(got.grad, want.grad), name
    messages = [r.getMessage() for r in caplog.records]
    assert "model.linear_impl='te': it needs CUDA (device is cpu); using 'torch' linears" in messages
    assert "attention backend 'te': it needs CUDA (device is cpu); using 'sdpa'" in messages
