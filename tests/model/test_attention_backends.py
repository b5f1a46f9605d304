"""Every attention backend computes the same asymmetric attention as the dense-mask reference."""

from importlib.util import find_spec

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.attention import (
    DenseMaskAttention,
    FlashVarlenAttention,
    FlexPackAttention,
    PackLayout,
    SdpaVarlenAttention,
    attention_backend,
    head_dim_problem,
)
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.transformer_engine import warn_once
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.objectives.losses import mot_losses

EDGE_CASE_PACKS = {
    "no_dm_section": [(7, 0), (5, 6)],
    "no_text": [(0, 9), (4, 3)],
    "all_sections_of_length_one": [(1, 1), (1, 1), (1, 1)],
    "one_sample": [(11, 13)],
    "many_tiny_samples": [(1 + i % 3, i % 2) for i in range(40)],
    "mixed": [(3, 0), (0, 4), (1, 1), (9, 17), (2, 1)],
}
# Backends checked in outputs and gradients; flex's backward needs a GPU (torch has none on CPU).
FAST_BACKENDS = ["sdpa"] + (["flash", "flex"] if torch.cuda.is_available() else [])


def random_qkv(layout: PackLayout, n_ar: int, n_dm: int, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda n, h: torch.randn(n, h, dim, generator=g, dtype=torch.float64).requires_grad_()
    return [
        make(n_ar, heads),
        make(n_ar, kv_heads),
        make(n_ar, kv_heads),
        make(n_dm, heads),
        make(n_dm, kv_heads),
        make(n_dm, kv_heads),
    ]


def run_backend(backend, tensors, layout):
    q_ar, k_ar, v_ar, q_dm, k_dm, v_dm = tensors
    return backend.ar_attention(q_ar, k_ar, v_ar, layout), backend.dm_attention(q_dm, k_ar, v_ar, k_dm, v_dm, layout)


def layout_of(lengths):
    ar = torch.tensor([0] + [a for a, _ in lengths]).cumsum(0)
    dm = torch.tensor([0] + [d for _, d in lengths]).cumsum(0)
    return PackLayout.from_cu_seqlens(ar, dm)


def test_dense_reference_matches_a_per_sample_loop_written_out():
    """Pins the reference itself to the rule, spelled out token by token on a 2-sample pack."""
    lengths = [(3, 2), (2, 3)]
    layout = layout_of(lengths)
    tensors = random_qkv(layout, 5, 5, heads=2, kv_heads=2)
    q_ar, k_ar, v_ar, q_dm, k_dm, v_dm = [t.detach() for t in tensors]
    out_ar, out_dm = run_backend(DenseMaskAttention(), [q_ar, k_ar, v_ar, q_dm, k_dm, v_dm], layout)
    scale = 8**-0.5
    for _s, ((a0, a1), (d0, d1)) in enumerate([((0, 3), (0, 2)), ((3, 5), (2, 5))]):
        for i in range(a0, a1):  # AR query i sees AR keys a0..i of its sample
            w = ((q_ar[i] * k_ar[a0 : i + 1]).sum(-1) * scale).softmax(0)
            assert torch.allclose(out_ar[i], (w[..., None] * v_ar[a0 : i + 1]).sum(0))
        keys = torch.cat([k_ar[a0:a1], k_dm[d0:d1]])
        values = torch.cat([v_ar[a0:a1], v_dm[d0:d1]])
        for i in range(d0, d1):  # DM query i sees every AR and DM key of its sample
            w = ((q_dm[i] * keys).sum(-1) * scale).softmax(0)
            assert torch.allclose(out_dm[i], (w[..., None] * values).sum(0))


# (query heads, KV heads, head_dim): GQA 2 at 8, MQA with 6 query heads at 24, MHA at 40.
HEAD_SHAPES = [(4, 2, 8), (6, 1, 24), (3, 3, 40)]


@pytest.mark.parametrize("backend_name", FAST_BACKENDS)
@pytest.mark.parametrize("case", list(EDGE_CASE_PACKS))
@pytest.mark.parametrize("heads", HEAD_SHAPES, ids=lambda h: "x".join(map(str, h)))
def test_backend_matches_dense_reference_outputs_and_gradients(backend_name, case, heads):
    lengths = EDGE_CASE_PACKS[case]
    layout = layout_of(lengths)
    n_ar, n_dm = sum(a for a, _ in lengths), sum(d for _, d in lengths)
    device = "cuda" if backend_name in ("flash", "flex") else "cpu"
    reference_inputs = random_qkv(layout, n_ar, n_dm, *heads)
    reference = run_backend(DenseMaskAttention(), reference_inputs, layout)
    inputs = random_qkv(layout, n_ar, n_dm, *heads)
    if device == "cuda":  # GPU kernels in half precision; compare at bf16 tolerance
        inputs = [t.detach().to(device, torch.bfloat16).requires_grad_() for t in inputs]
        layout = PackLayout.from_cu_seqlens(layout.ar_cu_seqlens.to(device), layout.dm_cu_seqlens.to(device))
    outputs = run_backend(attention_backend(backend_name, device), inputs, layout)
    rtol = 1e-5 if device == "cpu" else 2e-2
    for got, want in zip(outputs, reference):
        torch.testing.assert_close(got.double().cpu(), want, rtol=rtol, atol=rtol)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) for o in reference]
    sum((o * w).sum() for o, w in zip(reference, weights)).backward()
    sum((o.double().cpu() * w).sum() for o, w in zip(outputs, weights)).backward()
    for got, want in zip(inputs, reference_inputs):
        torch.testing.assert_close(got.grad.double().cpu(), want.grad, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("backend_name", FAST_BACKENDS)
@pytest.mark.parametrize("seed", range(4))
def test_model_losses_and_gradients_match_dense_backend_on_random_packs(tiny_config, backend_name, seed):
    g = torch.Generator().manual_seed(seed)
    batch = random_pack(tiny_config, g, num_samples=2 + seed * 2)
    batch, targets = add_flow_matching_noise(batch, FlowMatchingConfig(), g)
    torch.manual_seed(seed)
    model = MoTModel(tiny_config)
    results = {}
    for name in ("dense", backend_name):
        model.config.attention_backend = name
        model.zero_grad()
        loss = mot_losses(model, batch, targets)
        loss.total.backward()
        results[name] = (
            loss.total.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )
    (want_loss, want_grads), (got_loss, got_grads) = results["dense"], results[backend_name]
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend, builds_n_by_n", [(SdpaVarlenAttention(), False), (DenseMaskAttention(), True)])
def test_only_the_dense_reference_builds_an_n_by_n_tensor(backend, builds_n_by_n):
    """Largest intermediate in the sdpa backend is bounded by the longest sample, not the pack."""
    lengths = [(16, 16)] * 32  # pack of 1024 tokens, samples of 32
    layout = layout_of(lengths)
    tensors = [t.detach().float() for t in random_qkv(layout, 512, 512)]
    largest = []

    class LargestTensor(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    largest.append(t.numel())
            return out

    with LargestTensor():
        run_backend(backend, tensors, layout)
    # The dense reference's (heads, 512, 512) scores are the control that the probe sees them.
    assert (max(largest) >= 512 * 512) == builds_n_by_n, f"largest intermediate: {max(largest)} elements"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="attention_backend='nope'"):
        attention_backend("nope")


def test_flash_backend_hands_the_kernel_the_autocast_dtype():
    """Under bf16 autocast the model's q/k are fp32 (per-head RMSNorm): the half-precision-only
    kernel must receive bf16, as autocast gives SDPA. Checked with a stand-in kernel on the CPU."""
    seen = []

    def varlen_kernel(q, k, v, **_):
        seen.append((q.dtype, k.dtype, v.dtype))
        return q

    layout = layout_of([(3, 2), (2, 3)])
    tensors = [t.detach().float() for t in random_qkv(layout, 5, 5)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run_backend(FlashVarlenAttention(varlen_kernel), tensors, layout)
    run_backend(FlashVarlenAttention(varlen_kernel), tensors, layout)  # no autocast: left as they are
    assert seen == [(torch.bfloat16,) * 3] * 2 + [(torch.float32,) * 3] * 2


def test_flash_backend_falls_back_to_sdpa_without_cuda(caplog):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the fallback path is not taken")
    with caplog.at_level("WARNING"):
        backend = attention_backend("flash", "cpu")
    assert isinstance(backend, SdpaVarlenAttention)


# Head dims flash-attention (2 and 3) and TE's THD kernels take: multiples of 8 up to 256 (48 and 80
# run the 64 and 96 kernels); and some they refuse in C++ (FA3 takes no 12: FA2's wrapper pads it).
KERNEL_HEAD_DIMS = [8, 16, 48, 64, 80, 128, 136, 192, 256]
NO_KERNEL_HEAD_DIMS = [2, 4, 12, 20, 100, 250, 264, 300, 512]


@pytest.mark.parametrize("name", ["flash", "te"])
def test_flash_and_te_kernels_take_head_dims_that_are_multiples_of_8_up_to_256(name):
    for head_dim in KERNEL_HEAD_DIMS:
        assert head_dim_problem(name, head_dim) is None, head_dim
    for head_dim in NO_KERNEL_HEAD_DIMS:
        assert "at most 256 and a multiple of 8" in head_dim_problem(name, head_dim), head_dim


def test_flex_takes_head_dims_from_16_and_dense_and_sdpa_any():
    """FlexAttention's Triton kernel (tl.dot) takes no head_dim below 16; it rounds others up itself."""
    assert [d for d in (2, 8, 12, 16, 20, 48, 300) if head_dim_problem("flex", d)] == [2, 8, 12]
    assert all(head_dim_problem(name, d) is None for name in ("dense", "sdpa") for d in (2, 12, 300, 1024))


@pytest.mark.parametrize(("name", "head_dim"), [("flash", 300), ("flash", 12), ("te", 264), ("te", 20), ("flex", 8)])
def test_a_head_dim_the_kernels_refuse_falls_back_to_sdpa_on_cuda_with_one_warning(name, head_dim, caplog):
    """The branch a CUDA machine takes (the device string reaches it: the check comes before any
    kernel import or CUDA call), with the model.head_dim and the backend named once."""
    warn_once.cache_clear()
    with caplog.at_level("WARNING"):
        for _ in range(2):  # a backend is made per forward: one line per run
            assert isinstance(attention_backend(name, "cuda", head_dim), SdpaVarlenAttention)
    problem = head_dim_problem(name, head_dim)
    assert [r.getMessage() for r in caplog.records] == [
        f"attention backend '{name}': model.head_dim={head_dim}, but {problem}; using 'sdpa'"
    ]
    warn_once.cache_clear()


@pytest.mark.skipif(
    torch.cuda.is_available() or any(find_spec(m) for m in ("flash_attn", "flash_attn_interface")),
    reason="CUDA or flash-attention present: the paths checked are not taken",
)
def test_a_head_dim_the_kernels_take_reaches_the_kernels_import(caplog):
    """Control: head_dim 48 passes the check, so the CUDA path goes on to import flash-attention
    (not installed here: its own warning), and on a CPU the head_dim is never the reason."""
    warn_once.cache_clear()
    with caplog.at_level("WARNING"):
        attention_backend("flash", "cuda", 48)
        attention_backend("flash", "cpu", 300)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "attention backend 'flash': flash-attn is not installed; using 'sdpa'",
        "attention backend 'flash' needs CUDA (device is cpu); using 'sdpa'",
    ]
    warn_once.cache_clear()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)).filter(lambda s: sum(s) > 0), min_size=1, max_size=8))
def test_sdpa_matches_dense_reference_on_any_pack_shape(lengths):
    layout = layout_of(lengths)
    n_ar, n_dm = sum(a for a, _ in lengths), sum(d for _, d in lengths)
    tensors = [t.detach() for t in random_qkv(layout, n_ar, n_dm)]
    for got, want in zip(
        run_backend(SdpaVarlenAttention(), tensors, layout), run_backend(DenseMaskAttention(), tensors, layout)
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", list(EDGE_CASE_PACKS))
def test_flex_forward_matches_dense_reference_on_cpu(case):
    """FlexAttention's block masks encode the same rule (its backward is checked on GPU only)."""
    lengths = EDGE_CASE_PACKS[case]
    layout = layout_of(lengths)
    n_ar, n_dm = sum(a for a, _ in lengths), sum(d for _, d in lengths)
    tensors = [t.detach() for t in random_qkv(layout, n_ar, n_dm)]
    for got, want in zip(
        run_backend(FlexPackAttention("cpu"), tensors, layout), run_backend(DenseMaskAttention(), tensors, layout)
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_flex_builds_its_masks_once_per_pack(monkeypatch):
    backend = FlexPackAttention("cpu")
    built = []
    real = backend._create_block_mask
    backend._create_block_mask = lambda *args, **kwargs: built.append(kwargs["Q_LEN"]) or real(*args, **kwargs)
    first, second = layout_of([(3, 2), (2, 3)]), layout_of([(4, 1)])
    with torch.no_grad():
        for layout, (n_ar, n_dm) in ((first, (5, 5)), (first, (5, 5)), (second, (4, 1))):
            tensors = [t.detach() for t in random_qkv(layout, n_ar, n_dm)]
            run_backend(backend, tensors, layout)  # a second layer's call on ``first`` reuses its masks
    assert built == [5, 5, 4, 1]


def test_model_with_flex_backend_matches_dense_forward(tiny_config):
    g = torch.Generator().manual_seed(3)
    batch, targets = add_flow_matching_noise(random_pack(tiny_config, g, num_samples=4), FlowMatchingConfig(), g)
    torch.manual_seed(0)
    model = MoTModel(tiny_config)
    losses = {}
    with torch.no_grad():
        for name in ("dense", "flex"):
            model.config.attention_backend = name
            losses[name] = mot_losses(model, batch, targets).total
    torch.testing.assert_close(losses["flex"], losses["dense"], rtol=1e-5, atol=1e-6)
