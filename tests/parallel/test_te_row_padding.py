"""The fp8 row padding of the TE linears (``parallel/tensor_parallel.py``, ``te_on_rows``), checked on
CPU with the layers it wraps there: TE's fp8 GEMMs take row counts in multiples of 16, packs have any
number, so the rows are padded and the padding cut again. Checked: every call the layer receives obeys
the rule, and the output and input gradient equal the unpadded run's — in one process, and on two
ranks under sequence parallelism (megatron-core's column- then row-parallel linear, as q_proj ->
o_proj), where each rank's block must keep its place through the all-gather and reduce-scatter."""

import pytest
import torch
from torch import nn

from megatron_cosmos3.parallel.tensor_parallel import FP8_ROW_MULTIPLE, te_on_rows
from megatron_cosmos3.testing.distributed import run_on_ranks

ON = lambda: True  # noqa: E731 — padding as under fp8 autocast


def obeying_fp8_rows(layer_class):
    """``layer_class`` that refuses the rows TE 2.9's fp8 GEMMs refuse: its forward asserts a multiple
    of 8 (``assert_dim_for_fp8_exec``), and the weight-gradient GEMM, which reduces over the rows,
    a multiple of 16 (Hopper's fp8 GEMMs are TN: ``cublaslt_gemm.cu``, "Caller must pad")."""

    class Fp8Rows(layer_class):
        def forward(self, x, *args, **kwargs):
            rows = x.numel() // x.shape[-1]
            assert rows % 16 == 0, f"{rows} rows reach the fp8 GEMM"
            return super().forward(x, *args, **kwargs)

    return Fp8Rows


@pytest.mark.parametrize("rows", [0, 1, 13, 16, 33])
def test_padded_rows_give_the_unpadded_output_and_gradient(rows):
    torch.manual_seed(0)
    plain = nn.Linear(32, 48, bias=False)
    padded = te_on_rows(obeying_fp8_rows(nn.Linear), "column", 1, False, padding_on=ON)(32, 48, bias=False)
    padded.load_state_dict(plain.state_dict())
    x = torch.randn(rows, 32, requires_grad=True)
    x_padded = x.detach().clone().requires_grad_()
    want, got = plain(x), padded(x_padded)
    assert got.shape == (rows, 48)
    torch.testing.assert_close(got, want)
    (want * torch.arange(want.numel()).view_as(want)).sum().backward()
    (got * torch.arange(got.numel()).view_as(got)).sum().backward()
    torch.testing.assert_close(x_padded.grad, x.grad)
    torch.testing.assert_close(padded.weight.grad, plain.weight.grad)


def _column_then_row_under_sequence_parallelism(rank, world_size, rows_per_rank):
    import megatron.core.parallel_state as mpu
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_cosmos3.parallel.megatron_on_cpu import install_cpu_memory_buffer

    mpu.initialize_model_parallel(tensor_model_parallel_size=world_size)
    install_cpu_memory_buffer()
    try:
        group = mpu.get_tensor_model_parallel_group()
        config = ModelParallelConfig(
            tensor_model_parallel_size=world_size, sequence_parallel=True, use_cpu_initialization=True
        )
        keep = lambda weight: None  # noqa: E731

        def pair(column_class, row_class):
            column = column_class(
                32, 64, config=config, init_method=keep, bias=False, gather_output=False, tp_group=group
            )
            row = row_class(
                64,
                32,
                config=config,
                init_method=keep,
                bias=False,
                input_is_parallel=True,
                skip_bias_add=False,
                tp_group=group,
            )
            g = torch.Generator().manual_seed(rank)  # each rank its own shard
            with torch.no_grad():
                column.weight.copy_(torch.randn(column.weight.shape, generator=g))
                row.weight.copy_(torch.randn(row.weight.shape, generator=g))
            return column, row

        plain = [
            te_on_rows(c, k, world_size, True, padding_on=lambda: False)
            for c, k in ((ColumnParallelLinear, "column"), (RowParallelLinear, "row"))
        ]
        padded = [
            te_on_rows(obeying_fp8_rows(c), k, world_size, True, padding_on=ON)
            for c, k in ((ColumnParallelLinear, "column"), (RowParallelLinear, "row"))
        ]
        results = []
        for column_class, row_class in (plain, padded):
            column, row = pair(column_class, row_class)
            x = torch.randn(rows_per_rank, 32, generator=torch.Generator().manual_seed(100 + rank)).requires_grad_()
            out = row(column(x))
            (out * torch.arange(out.numel()).view_as(out)).sum().backward()
            results.append((out.detach(), x.grad, column.weight.grad, row.weight.grad))
        return results
    finally:
        mpu.destroy_model_parallel()


@pytest.mark.multiprocess
def test_padded_rows_keep_each_ranks_block_under_sequence_parallelism():
    results = run_on_ranks(_column_then_row_under_sequence_parallelism, 2, 13)
    for plain, padded in results:
        assert plain[0].shape == (13, 32)
        for want, got in zip(plain, padded):
            torch.testing.assert_close(got, want)
    assert FP8_ROW_MULTIPLE % 16 == 0
