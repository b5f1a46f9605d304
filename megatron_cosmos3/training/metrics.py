"""Training metrics over a logging window, reduced over all ranks at log time only."""

from __future__ import annotations

import math
import time

import torch

from megatron_cosmos3.objectives.losses import LossBreakdown
from megatron_cosmos3.training.distributed import all_reduce_sum

_PARTS = ("ce_sum", "ce_count", "fm_sum", "fm_count")
# Where a step's wall time goes (``MetricsWindow.timed``), logged as time/<phase>_s per step.
PHASES = ("data_wait", "forward_backward", "optimizer", "checkpoint")


class MetricsWindow:
    """Accumulates loss sums/counts, tokens and FLOPs of the steps since the last log line.

    Per-task slots follow the stage's fixed task table, so every rank reduces a vector of the same
    length even when its packs hold different tasks.
    """

    def __init__(
        self, tasks: list[str], data_parallel_size: int, flow_matching_weight: float, peak_flops_per_device: float
    ):
        self.tasks = list(tasks)
        self.data_parallel_size = data_parallel_size
        self.flow_matching_weight = flow_matching_weight
        self.peak_flops_per_device = peak_flops_per_device
        self.reset()

    def reset(self) -> None:
        self._sums = torch.zeros(4 + 4 * len(self.tasks), dtype=torch.float64)
        self._tokens, self._flops, self.steps = 0, 0.0, 0
        self.skipped_steps = 0
        self._phase_seconds, self._optimizer_steps = dict.fromkeys(PHASES, 0.0), 0
        self._start = time.perf_counter()

    def timed(self, phase: str, seconds: float) -> None:
        """Adds ``seconds`` of this rank's wall time to ``phase`` (one of ``PHASES``)."""
        self._phase_seconds[phase] += seconds
        self._optimizer_steps += phase == "optimizer"  # timed once per step

    def add(self, losses: LossBreakdown | None, tokens: int, flops: float) -> None:
        """One micro-batch; ``losses`` is None on ranks that compute none (early pipeline stages)."""
        if losses is not None:
            zero = torch.zeros(())
            local = [losses.ce_sum, losses.ce_count, losses.fm_sum, losses.fm_count]
            local += [losses.per_task.get(task, {}).get(part, zero) for task in self.tasks for part in _PARTS]
            self._sums += torch.stack([v.detach().double().cpu() for v in local])
        self._tokens += tokens
        self._flops += flops
        self.steps += 1

    def seconds_per_step(self) -> float:
        return (time.perf_counter() - self._start) / max(1, self.steps)

    def reduce(self, extra: dict[str, float]) -> dict[str, float]:
        """Collective: global means over the window, throughput, and ``extra`` (grad norm, lr ...)."""
        seconds = time.perf_counter() - self._start
        totals = all_reduce_sum(self._sums)

        def mean(total, count) -> float:
            return float(total / count) if count else float("nan")

        ce, fm = mean(totals[0], totals[1]), mean(totals[2], totals[3])
        metrics = {
            "loss": _or_zero(ce) + self.flow_matching_weight * _or_zero(fm),
            "loss/ce": ce,
            "loss/fm": fm,
            "throughput/tokens_per_s": self._tokens * self.data_parallel_size / seconds,
            "throughput/tflops_per_device": self._flops / seconds / 1e12,
            "skipped_steps": float(self.skipped_steps),
            **extra,
        }
        for i, task in enumerate(self.tasks):
            ce_sum, ce_count, fm_sum, fm_count = totals[4 + 4 * i : 8 + 4 * i]
            metrics[f"loss/{task}/ce"] = mean(ce_sum, ce_count)
            metrics[f"loss/{task}/fm"] = mean(fm_sum, fm_count)
        metrics["memory/peak_mb"] = peak_memory_mb()
        steps = max(1, self._optimizer_steps)
        for phase, spent in self._phase_seconds.items():  # this rank's, per optimizer step (rank 0 logs)
            metrics[f"time/{phase}_s"] = spent / steps
        metrics["time/data_wait_share"] = self._phase_seconds["data_wait"] / seconds
        if self.peak_flops_per_device > 0:
            metrics["throughput/mfu"] = self._flops / seconds / self.peak_flops_per_device
        return {k: v for k, v in metrics.items() if not math.isnan(v)}


def _or_zero(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def peak_memory_mb() -> float:
    """This process's peak memory: allocated GPU memory on CUDA, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
