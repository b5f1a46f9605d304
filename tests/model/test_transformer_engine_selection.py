"""The Transformer Engine switches on a machine without it: which path each takes and why
(docs/DESIGN.md, "GPU fast paths"), and the THD arguments the ``te`` backend hands TE, checked on CPU
against the dense rule through an independent reading of TE's documented varlen semantics."""

import logging
import math

import pytest
import torch

from megatron_cosmos3.model.attention import (
    DenseMaskAttention,
    PackLayout,
    SdpaVarlenAttention,
    VarlenCall,
    attention_backend,
)
from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.model.transformer_engine import (
    import_transformer_engine,
    select_linear_impl,
    transformer_engine_missing,
    warn_once,
)

# (AR, DM) lengths per sample: empty sections, one-token sections, many samples.
PACKS = {
    "no_dm_section": [(7, 0), (5, 6)],
    "no_text": [(0, 9), (4, 3)],
    "all_sections_of_length_one": [(1, 1), (1, 1), (1, 1)],
    "many_tiny_samples": [(1 + i % 3, i % 2) for i in range(40)],
    "mixed": [(3, 0), (0, 4), (1, 1), (9, 17), (2, 1)],
}


def te_is_importable() -> bool:
    try:
        import_transformer_engine()
    except (ImportError, OSError, RuntimeError):
        return False
    return True


@pytest.fixture(autouse=True)
def fresh_warnings():
    warn_once.cache_clear()  # each test sees its first warning
    yield
    warn_once.cache_clear()


def test_te_is_missing_on_cpu_because_of_the_device():
    assert transformer_engine_missing("cpu") == "it needs CUDA (device is cpu)"


@pytest.mark.skipif(te_is_importable(), reason="transformer_engine imports here")
def test_on_cuda_without_te_the_switches_fall_back_naming_the_failed_import(caplog):
    """The branch a CUDA machine without TE takes (the device string is enough to reach it: nothing
    touches the GPU before TE imports), for both falling-back switches."""
    reason = transformer_engine_missing("cuda")
    assert reason.startswith("transformer_engine does not import (ModuleNotFoundError: ")
    with pytest.raises(ImportError):
        import_transformer_engine()
    with caplog.at_level(logging.WARNING, logger="megatron_cosmos3.model.transformer_engine"):
        assert select_linear_impl("te", "cuda") == "torch"
        assert isinstance(attention_backend("te", "cuda"), SdpaVarlenAttention)
    assert [r.getMessage() for r in caplog.records] == [
        f"model.linear_impl='te': {reason}; using 'torch' linears",
        f"attention backend 'te': {reason}; using 'sdpa'",
    ]


def test_linear_impl_te_falls_back_to_torch_with_one_warning_line(caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_cosmos3.model.transformer_engine"):
        assert select_linear_impl("te", "cpu") == "torch"
        assert select_linear_impl("te", "cpu") == "torch"
        assert select_linear_impl("torch", "cpu") == "torch"
    assert [r.getMessage() for r in caplog.records] == [
        "model.linear_impl='te': it needs CUDA (device is cpu); using 'torch' linears"
    ]


def test_attention_backend_te_falls_back_to_sdpa_with_one_warning_line(caplog):
    with caplog.at_level(logging.WARNING, logger="megatron_cosmos3.model.transformer_engine"):
        assert isinstance(attention_backend("te", "cpu"), SdpaVarlenAttention)
        assert isinstance(attention_backend("te", "cpu"), SdpaVarlenAttention)
    assert [r.getMessage() for r in caplog.records] == [
        "attention backend 'te': it needs CUDA (device is cpu); using 'sdpa'"
    ]


def test_bad_linear_impl_is_an_error_naming_field_and_value():
    with pytest.raises(ValueError, match=r"linear_impl='cublas' is not one of \('torch', 'te'\)"):
        MoTConfig(linear_impl="cublas")
    with pytest.raises(ValueError, match=r"model.linear_impl='cublas'"):
        select_linear_impl("cublas", "cpu")


def thd_attention(q, k, v, call: VarlenCall) -> torch.Tensor:
    """TE's documented THD semantics, read independently of our layout: query segment i (rows
    cu_seqlens_q[i]:cu_seqlens_q[i+1]) attends key segment i only; "padding_causal" adds the top-left
    causal rule inside the segment, "padding" none. Rows of k/v picked by ``kv_index`` first."""
    if call.kv_index is not None:
        k, v = k[call.kv_index], v[call.kv_index]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = torch.zeros_like(q)
    for i in range(len(call.cu_seqlens_q) - 1):
        q0, q1 = int(call.cu_seqlens_q[i]), int(call.cu_seqlens_q[i + 1])
        k0, k1 = int(call.cu_seqlens_kv[i]), int(call.cu_seqlens_kv[i + 1])
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1], k[k0:k1]) / math.sqrt(q.shape[-1])
        if call.mask_type == "padding_causal":
            scores = scores.masked_fill(torch.ones(q1 - q0, k1 - k0, dtype=torch.bool).triu(1), float("-inf"))
        else:
            assert call.mask_type == "padding"
        out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[k0:k1])
    return out


@pytest.mark.parametrize("case", PACKS)
def test_te_thd_arguments_implement_the_asymmetric_rule(case):
    """The exact cu_seqlens, kv gather and mask types TEFusedAttention passes to TE, read the way TE
    documents them, give the dense reference on every edge-case pack (and no empty query segment)."""
    lengths = PACKS[case]
    boundaries = lambda side: torch.tensor([0] + [pair[side] for pair in lengths]).cumsum(0)  # noqa: E731
    layout = PackLayout.from_cu_seqlens(boundaries(0), boundaries(1))
    n_ar, n_dm = int(boundaries(0)[-1]), int(boundaries(1)[-1])
    g = torch.Generator().manual_seed(0)
    q_ar, k_ar, v_ar, q_dm, k_dm, v_dm = (
        torch.randn(n, heads, 8, generator=g, dtype=torch.float64)
        for n, heads in [(n_ar, 4), (n_ar, 2), (n_ar, 2), (n_dm, 4), (n_dm, 2), (n_dm, 2)]
    )
    dense = DenseMaskAttention()
    want_ar = dense.ar_attention(q_ar, k_ar, v_ar, layout)
    want_dm = dense.dm_attention(q_dm, k_ar, v_ar, k_dm, v_dm, layout)
    ar_call, dm_call = VarlenCall.ar_half(layout), VarlenCall.dm_half(layout)
    for call in (ar_call, dm_call):
        assert call.cu_seqlens_q.dtype == call.cu_seqlens_kv.dtype == torch.int32
        assert bool((call.cu_seqlens_q.diff() > 0).all()), "a query segment is empty"
        assert call.max_seqlen_q == max(call.cu_seqlens_q.diff().tolist(), default=0)
        assert call.max_seqlen_kv == max(call.cu_seqlens_kv.diff().tolist(), default=0)
    if n_ar:
        torch.testing.assert_close(thd_attention(q_ar, k_ar, v_ar, ar_call), want_ar)
    if n_dm:
        got_dm = thd_attention(q_dm, torch.cat([k_ar, k_dm]), torch.cat([v_ar, v_dm]), dm_call)
        torch.testing.assert_close(got_dm, want_dm)
        # Control: the causal mask on the DM half (a plausible slip) breaks the equality.
        causal = VarlenCall(**{**dm_call.__dict__, "mask_type": "padding_causal"})
        wrong = thd_attention(q_dm, torch.cat([k_ar, k_dm]), torch.cat([v_ar, v_dm]), causal)
        assert not torch.allclose(wrong, want_dm)
