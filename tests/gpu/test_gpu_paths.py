"""The GPU fast paths against their references, on a CUDA machine (``bench/gpu_check.sh`` runs these;
skipped without CUDA, and each skips where its library is missing): every GPU attention backend
equals the dense rule, Transformer Engine linears equal torch's, fp8 follows bf16 over 50 training
steps, TE linears under TP=2 follow one process, megatron-core's DDP follows torch's, and the
grouped-GEMM experts follow their loop (docs/DESIGN.md, "GPU fast paths")."""

import dataclasses

import pytest
import torch

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.attention import DenseMaskAttention, PackLayout, attention_backend
from megatron_cosmos3.model.moe import MoEMLP, grouped_mm_takes
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.transformer_engine import transformer_engine_missing
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.objectives.losses import mot_losses
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel
from megatron_cosmos3.testing.reference import relative_difference
from megatron_cosmos3.testing.training import TINY_SYNTHETIC, loss_history, tiny_mot_config, torchrun_trainer
from megatron_cosmos3.training import train as train_module
from megatron_cosmos3.training.config import load_config
from megatron_cosmos3.training.distributed import DistributedContext
from megatron_cosmos3.training.precision import autocast, fp8_unavailable

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")
TE_MISSING = transformer_engine_missing(CUDA) if torch.cuda.is_available() else "no CUDA"
needs_te = pytest.mark.skipif(TE_MISSING is not None, reason=f"Transformer Engine: {TE_MISSING}")
# A small model whose every GEMM dimension is a multiple of 16 (fp8's rule), as trainer overrides.
FP8_MODEL = [
    "model.vocab_size=256",
    "model.hidden_size=128",
    "model.num_layers=2",
    "model.num_attention_heads=4",
    "model.num_kv_heads=2",
    "model.head_dim=32",
    "model.mrope_section=[8,4,4]",
    "model.ffn_hidden_size=256",
    "model.video_latent_channels=4",
    "model.audio_latent_dim=16",
    "model.timestep_embedding_dim=32",
]
FP8_CONFIG = dict(
    vocab_size=256, hidden_size=128, num_attention_heads=4, num_kv_heads=2, head_dim=32, mrope_section=[8, 4, 4]
)


def noised_pack(config, seed=0, samples=6):
    g = torch.Generator().manual_seed(seed)
    batch, targets = add_flow_matching_noise(random_pack(config, g, num_samples=samples), FlowMatchingConfig(), g)
    return batch.to(CUDA), {key: value.to(CUDA) for key, value in targets.items()}


@pytest.mark.parametrize("name", ["flash", "flex", "te"])
def test_gpu_attention_backend_equals_the_dense_rule(name):
    """bf16 outputs and input gradients of each backend against the dense reference in fp32 on the
    same bf16 values, on a pack with empty AR and DM sections and one-token samples."""
    backend = attention_backend(name, CUDA)
    if backend.name != name:
        pytest.skip(f"{name} is not available here (fell back to {backend.name})")
    lengths = [(7, 0), (0, 9), (1, 1), (33, 70), (5, 3), (64, 128)]
    ar_cu = torch.tensor([0] + [a for a, _ in lengths], device=CUDA).cumsum(0)
    dm_cu = torch.tensor([0] + [d for _, d in lengths], device=CUDA).cumsum(0)
    layout = PackLayout.from_cu_seqlens(ar_cu, dm_cu)
    n_ar, n_dm = int(ar_cu[-1]), int(dm_cu[-1])
    g = torch.Generator(device=CUDA).manual_seed(0)
    shapes = [(n_ar, 8), (n_ar, 2), (n_ar, 2), (n_dm, 8), (n_dm, 2), (n_dm, 2)]
    bf16 = [torch.randn(n, h, 64, generator=g, device=CUDA).bfloat16().requires_grad_() for n, h in shapes]
    fp32 = [t.detach().float().requires_grad_() for t in bf16]

    def run(attention, tensors):
        q_ar, k_ar, v_ar, q_dm, k_dm, v_dm = tensors
        ar = attention.ar_attention(q_ar, k_ar, v_ar, layout)
        out = torch.cat([ar, attention.dm_attention(q_dm, k_ar, v_ar, k_dm, v_dm, layout)])
        out.float().pow(2).sum().backward()
        return out

    got, want = run(backend, bf16), run(DenseMaskAttention(), fp32)
    assert relative_difference(got.float(), want) < 2e-2
    for mine, reference in zip(bf16, fp32):
        assert relative_difference(mine.grad.float(), reference.grad) < 3e-2


@pytest.mark.parametrize("name", ["flash", "flex", "te"])
def test_a_head_dim_no_kernel_of_the_backend_takes_runs_on_sdpa(name):
    """head_dim 12: flash-attention 3 and TE's THD kernels refuse it (no multiple of 8), flex's
    Triton kernel too (below 16). The model falls back to sdpa and gives the sdpa model's loss and
    gradients, bit for bit, where the kernel failed inside the first step."""
    config = tiny_mot_config(head_dim=12)
    batch, targets = noised_pack(config)
    models = {}
    for backend in ("sdpa", name):
        torch.manual_seed(0)
        models[backend] = MoTModel(dataclasses.replace(config, attention_backend=backend)).to(CUDA)
        with autocast("bf16", CUDA):
            mot_losses(models[backend], batch, targets).total.backward()
    assert models[name]._attention().name == "sdpa"
    grads = dict(models["sdpa"].named_parameters())
    for param_name, param in models[name].named_parameters():
        want = grads[param_name].grad
        assert (param.grad is None) == (want is None) and (want is None or torch.equal(param.grad, want)), param_name


@needs_te
def test_te_linears_equal_torch_linears():
    """The same weights through TE linears and nn.Linear: the same parameter names, and loss and
    gradients equal to bf16 tolerance; a perturbed weight changes the loss (the comparison is live)."""
    config = tiny_mot_config(**FP8_CONFIG)
    torch.manual_seed(0)
    reference = MoTModel(config).to(CUDA)
    te_model = MoTModel(dataclasses.replace(config, linear_impl="te")).to(CUDA)
    te_model.load_state_dict(reference.state_dict())
    apply_tensor_parallel(te_model, None, "te")
    assert type(te_model.layers[0].generator.self_attn.q_proj).__module__ != "torch.nn.modules.linear"
    assert [n for n, _ in te_model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    batch, targets = noised_pack(config)
    losses = {}
    for name, model in (("torch", reference), ("te", te_model)):
        with autocast("bf16", CUDA):
            losses[name] = mot_losses(model, batch, targets).total
        losses[name].backward()
    assert float(losses["te"]) == pytest.approx(float(losses["torch"]), rel=1e-2)
    grads = dict(reference.named_parameters())
    for name, param in te_model.named_parameters():
        if param.grad is not None:
            assert relative_difference(param.grad, grads[name].grad) < 5e-2, name
    with torch.no_grad():
        te_model.layers[0].reasoner.mlp.down_proj.weight.mul_(1.5)
        with autocast("bf16", CUDA):
            assert float(mot_losses(te_model, batch, targets).total) != pytest.approx(float(losses["torch"]), rel=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_grouped_experts_equal_the_loop_on_cuda(precision):
    """torch's grouped GEMM on CUDA against the per-expert loop, output and every gradient: bf16 runs
    its sm90+ kernel, fp32 the per-group fallback that torch 2.9+ gives other dtypes (read in
    torch's pull requests, not yet run: this checks it on the image's torch)."""
    if not grouped_mm_takes(torch.float32, 64, 128):
        pytest.skip("this torch has no grouped_mm (the experts loop)")
    torch.manual_seed(0)
    grouped = MoEMLP(64, 128, num_experts=4, top_k=2).to(CUDA)
    looped = MoEMLP(64, 128, num_experts=4, top_k=2, expert_impl="loop").to(CUDA)
    looped.load_state_dict(grouped.state_dict())
    x = torch.randn(37, 64, device=CUDA)
    results = []
    for moe in (grouped, looped):
        inputs = x.clone().requires_grad_()
        with autocast(precision, CUDA):
            out = moe(inputs)
        out.float().pow(2).sum().backward()
        results.append([out.float(), inputs.grad, *(p.grad for p in moe.parameters())])
    for got, want in zip(*results):
        assert relative_difference(got, want) < (2e-2 if precision == "bf16" else 1e-4)


def run_overrides(tmp_path, name, *extra, steps=50):
    """The trainer's settings for run ``name`` of the fp8-friendly model on synthetic packs."""
    return [
        *FP8_MODEL,
        *TINY_SYNTHETIC,
        f"steps={steps}",
        "log_every=1",
        "optimizer.warmup_steps=5",
        "tracking.generation_samples=false",
        f"checkpoint.directory={tmp_path / name}",
        "checkpoint.save_every=1000",
        f"tracking.tracking_uri={tmp_path / 'mlflow.db'}",
        f"tracking.run_name={name}",
        *extra,
    ]


def losses_of(tmp_path, name):
    return [value for _, value in loss_history(tmp_path / "mlflow.db", name)]


def train_here(tmp_path, name, *extra, steps=50):
    """The trainer in this process on the GPU; its loss per step."""
    config = load_config(None, run_overrides(tmp_path, name, *extra, steps=steps))
    train_module.train(config, DistributedContext(rank=0, world_size=1, local_rank=0, device=CUDA))
    return losses_of(tmp_path, name)


def train_on_gpus(tmp_path, name, nproc, *extra, steps):
    """The trainer under torchrun, one rank per GPU (NCCL takes no two ranks on one GPU)."""
    result = torchrun_trainer(tmp_path, nproc, *run_overrides(tmp_path, name, *extra, steps=steps))
    assert result.returncode == 0, result.stderr[-3000:]
    return losses_of(tmp_path, name)


def steps_of_training(precision: str, steps: int = 50) -> list[float]:
    """Loss per step of the fp8-friendly model with TE linears and TE attention, AdamW, on four
    packs in turn (with odd row counts: the fp8 row padding is exercised), from one seed."""
    config = tiny_mot_config(**FP8_CONFIG, linear_impl="te", attention_backend="te")
    torch.manual_seed(0)
    model = MoTModel(config).to(CUDA)
    apply_tensor_parallel(model, None, "te")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    packs = [noised_pack(config, seed=i, samples=5) for i in range(4)]
    losses = []
    for step in range(steps):
        batch, targets = packs[step % len(packs)]
        with autocast(precision, CUDA):
            loss = mot_losses(model, batch, targets).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


@needs_te
def test_fp8_follows_bf16_over_50_steps():
    """TE linears in fp8 (delayed scaling) against bf16 on the same packs from the same weights: both
    learn, and the fp8 curve stays within a few percent of bf16's (mean of the last 10 steps)."""
    missing = fp8_unavailable(CUDA)
    if missing is not None:
        pytest.skip(missing)
    bf16, fp8 = steps_of_training("bf16"), steps_of_training("fp8")
    assert all(torch.isfinite(torch.tensor(bf16 + fp8)))
    tail = lambda losses: sum(losses[-10:]) / 10  # noqa: E731
    assert tail(bf16) < 0.8 * sum(bf16[:4]) / 4 and tail(fp8) < 0.8 * sum(fp8[:4]) / 4
    assert tail(fp8) == pytest.approx(tail(bf16), rel=0.05)


@needs_te
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="TP=2 needs two GPUs")
def test_te_linears_under_tensor_parallel_follow_one_process(tmp_path):
    """Two ranks, TP=2 with sequence parallelism, TE linears: the loss curve of one process. (The
    keywords megatron-core's TE linears take are checked without a GPU: tests/parallel/
    test_te_linear_arguments.py and launch/gpu_imports.py.)"""
    te = ["precision=bf16", "model.linear_impl=te"]
    one = train_here(tmp_path, "one", *te, steps=3)
    tp2 = train_on_gpus(tmp_path, "tp2", 2, *te, "parallel.tensor=2", "parallel.sequence_parallel=true", steps=3)
    assert tp2 == pytest.approx(one, rel=2e-2)


@pytest.mark.skipif(
    "ddp_impl" not in {f.name for f in dataclasses.fields(ParallelSizes)}, reason="parallel.ddp_impl is not built"
)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="data parallelism over NCCL needs two GPUs")
def test_megatron_ddp_follows_torch_native(tmp_path):
    """megatron-core's DistributedDataParallel (``parallel.ddp_impl=megatron``; the optimizer state is
    sharded by ``build_optimizer``'s ZeRO-1, megatron's DistributedOptimizer is not used) against the
    torch-native path, two data ranks each: the same loss curve to bf16 tolerance."""
    torch_native = train_on_gpus(tmp_path, "torch_native", 2, "precision=bf16", steps=5)
    megatron = train_on_gpus(tmp_path, "megatron", 2, "precision=bf16", "parallel.ddp_impl=megatron", steps=5)
    assert megatron == pytest.approx(torch_native, rel=2e-2)
