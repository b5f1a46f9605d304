"""The adaptations megatron-core's tensor-parallel layers and DistributedDataParallel need to run on
CPU (gloo).

Sequence parallelism all-gathers into megatron's global memory buffer, and its reduce-scatter and
gather mappings allocate their outputs, on ``torch.cuda.current_device()``; so does megatron's
DistributedDataParallel for its contiguous gradient buffers (``param_and_grad_buffer``). On a host
without CUDA this module installs a buffer that allocates on the CPU, and gives those megatron
modules a ``torch`` whose ``cuda.current_device()`` names the CPU; on GPUs it changes nothing.
Everything else in megatron's TP linears, its DDP without the distributed optimizer (gradient
hooks, buckets, reduction) and the process groups of ``parallel_state`` runs on gloo as is.

Not usable on CPU at all, and therefore replaced by PyTorch-native pieces (see ``data_parallel.py``):
megatron's DistributedOptimizer (CUDA streams, ``torch.cuda.*Tensor`` checks); and megatron's
pipeline schedules and p2p communication (they allocate on ``"cuda"`` /
``torch.cuda.current_device()`` unconditionally; see ``pipeline_schedules.py``).
"""

from __future__ import annotations

import operator
from functools import reduce

import torch


def install_cpu_memory_buffer() -> None:
    """Makes sequence-parallel all-gathers allocate on CPU when there is no CUDA device."""
    if torch.cuda.is_available():
        return
    from megatron.core import parallel_state
    from megatron.core.utils import GlobalMemoryBuffer

    class CpuMemoryBuffer(GlobalMemoryBuffer):
        def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
            required = reduce(operator.mul, tensor_shape, 1)
            buffer = self.buffer.get((name, dtype))
            if buffer is None or buffer.numel() < required:
                buffer = self.buffer[(name, dtype)] = torch.empty(required, dtype=dtype)
            return buffer[:required].view(*tensor_shape)

    parallel_state._GLOBAL_MEMORY_BUFFER = CpuMemoryBuffer()

    from megatron.core.tensor_parallel import layers, mappings

    mappings.torch = layers.torch = _TorchOnCpu()


def install_cpu_data_parallel() -> None:
    """Makes megatron's DistributedDataParallel keep its gradient buffers on CPU when there is no CUDA device."""
    if torch.cuda.is_available():
        return
    from megatron.core.distributed import param_and_grad_buffer

    param_and_grad_buffer.torch = _TorchOnCpu()


class _CpuCuda:
    @staticmethod
    def current_device() -> str:
        return "cpu"

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCpu:
    """``torch`` for a megatron module, with allocations "on the current CUDA device" landing on the CPU."""

    cuda = _CpuCuda()

    def __getattr__(self, name):
        return getattr(torch, name)
