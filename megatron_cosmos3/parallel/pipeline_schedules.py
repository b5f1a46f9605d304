"""Pipeline schedules for the MoT: 1F1B and interleaved 1F1B, over torch.distributed p2p.

Why not megatron-core's schedules: ``megatron.core.pipeline_parallel.schedules`` cannot run on a
CPU (gloo) at all. ``forward_backward_pipelining_without_interleaving`` (and the interleaved and the
no-pipelining variants) allocate ``total_num_tokens = torch.zeros([], device="cuda")`` before the
first micro-batch, and ``p2p_communication.P2PCommunicator`` allocates every receive buffer (and the
shape tensors of ``variable_seq_lengths``) on ``torch.cuda.current_device()`` and calls
``torch.cuda.synchronize()`` after batched sends; on a CPU build of torch each of these raises
"Torch not compiled with CUDA enabled". Their p2p also moves one ``(seq, micro_batch, hidden)``
tensor shape per message, while a MoT micro-batch carries two streams whose lengths change from pack
to pack. ``torch.distributed.pipelining`` does not fit either: its stages infer fixed shapes once
and feed inputs to the first stage only, while every MoT stage needs the pack's metadata.

So this module implements the two schedules of Megatron (same warm-up, steady state and cool-down,
the same pairing of sends and receives, so the same deadlock freedom on NCCL) in two layers:

* a schedule is a **plan**: a per-rank list of ``Compute`` steps (forward or backward of a model
  chunk on a micro-batch) and ``Exchange`` steps (one ``batch_isend_irecv`` of sends and receives,
  waited together). Plans are plain data, so tests can check that the ranks' exchanges pair up and
  never deadlock for any layout, without processes;
* ``forward_backward`` executes a plan: the same code on gloo (CPU) and NCCL (GPU). Receive shapes
  come from the rank's own copy of the micro-batch, so no shapes are ever sent.

Loss: the global loss of a step is the mean over the ``M`` micro-batches of each micro-batch's
``LossBreakdown.total`` (Megatron's default: each micro-batch's loss is divided by ``M`` before its
backward), i.e. one process doing gradient accumulation of ``total / M``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from megatron_cosmos3.model.attention import attention_backend
from megatron_cosmos3.model.mot import RankRows
from megatron_cosmos3.model.packed_batch import PackedBatch
from megatron_cosmos3.objectives.losses import LossBreakdown, LossFunction, loss_breakdown
from megatron_cosmos3.parallel.context_parallel import ContextShard, SequenceSplit
from megatron_cosmos3.parallel.pipeline import PipelineStages

ACTIVATION, GRADIENT = "activation", "gradient"  # activations flow to the next stage, gradients back

# A micro-batch as every pipeline rank reads it: the noised pack and its velocity targets.
MicroBatch = tuple[PackedBatch, dict[str, torch.Tensor]]
ForwardContext = Callable[[], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class Compute:
    backward: bool
    chunk: int
    microbatch: int


@dataclass(frozen=True)
class Transfer:
    """The two hidden streams (or their gradients) of one chunk and micro-batch, sent or received.

    ``chunk`` is the local chunk that produced them (send) or consumes them (receive). Activations
    are sent to the next pipeline rank and received from the previous one; gradients the other way.
    """

    send: bool
    what: str  # ACTIVATION or GRADIENT
    chunk: int
    microbatch: int

    @property
    def to_next_rank(self) -> bool:
        """Whether the peer is the next pipeline rank (else the previous one), on the ring."""
        return self.send == (self.what == ACTIVATION)


@dataclass(frozen=True)
class Exchange:
    transfers: tuple[Transfer, ...]  # activations first: the order every rank posts them in


Step = Compute | Exchange


class _Plan:
    """Builds one rank's list of steps; numbers the micro-batches of received tensors in order."""

    def __init__(self, virtual_pipeline: int):
        self.steps: list[Step] = []
        self.received = {ACTIVATION: [0] * virtual_pipeline, GRADIENT: [0] * virtual_pipeline}

    def compute(self, backward: bool, chunk: int, microbatch: int) -> None:
        self.steps.append(Compute(backward, chunk, microbatch))

    def exchange(
        self,
        send_activation: tuple[int, int] | None = None,
        send_gradient: tuple[int, int] | None = None,
        receive_activation: int | None = None,
        receive_gradient: int | None = None,
    ) -> None:
        """One batch of p2p ops. Sends name (chunk, micro-batch); receives name the chunk, and get the
        chunk's next micro-batch (every chunk runs forwards, and backwards, in micro-batch order)."""
        transfers = []
        for what, send, receive in (
            (ACTIVATION, send_activation, receive_activation),
            (GRADIENT, send_gradient, receive_gradient),
        ):
            if send is not None:
                transfers.append(Transfer(True, what, *send))
            if receive is not None:
                transfers.append(Transfer(False, what, receive, self.received[what][receive]))
                self.received[what][receive] += 1
        if transfers:
            self.steps.append(Exchange(tuple(transfers)))


def one_f_one_b(pipeline: int, rank: int, num_microbatches: int, forward_only: bool = False) -> list[Step]:
    """Megatron's non-interleaved 1F1B: ``pipeline - rank - 1`` warm-up forwards, then one forward
    and one backward alternately, then the remaining backwards. Any number of micro-batches works."""
    first, last = rank == 0, rank == pipeline - 1
    warmup = num_microbatches if forward_only else min(pipeline - rank - 1, num_microbatches)
    remaining = num_microbatches - warmup
    plan = _Plan(1)
    receive_activation = None if first else 0
    receive_gradient = None if last else 0

    def sent(microbatch: int, to_next: bool) -> tuple[int, int] | None:
        return None if (last if to_next else first) else (0, microbatch)

    for i in range(warmup):
        plan.exchange(receive_activation=receive_activation)
        plan.compute(False, 0, i)
        plan.exchange(send_activation=sent(i, to_next=True))
    if remaining:
        plan.exchange(receive_activation=receive_activation)
    for i in range(remaining):
        plan.compute(False, 0, warmup + i)
        plan.exchange(send_activation=sent(warmup + i, to_next=True), receive_gradient=receive_gradient)
        plan.compute(True, 0, i)
        more = i < remaining - 1
        plan.exchange(send_gradient=sent(i, to_next=False), receive_activation=receive_activation if more else None)
    if not forward_only:
        for i in range(remaining, num_microbatches):
            plan.exchange(receive_gradient=receive_gradient)
            plan.compute(True, 0, i)
            plan.exchange(send_gradient=sent(i, to_next=False))
    return plan.steps


def interleaved_one_f_one_b(
    pipeline: int, virtual_pipeline: int, rank: int, num_microbatches: int, forward_only: bool = False
) -> list[Step]:
    """Megatron's interleaved 1F1B: each rank runs ``virtual_pipeline`` chunks, cycling through them
    in groups of ``pipeline`` micro-batches (smaller bubble, more communication).

    Training needs ``num_microbatches`` to be a multiple of ``pipeline`` (as Megatron's schedule
    does); forward-only passes (evaluation, sampling) take any number: the last group is smaller.
    """
    if num_microbatches % pipeline and not forward_only:
        raise ValueError(
            f"interleaved pipeline schedule: num_microbatches={num_microbatches} is not a multiple "
            f"of pipeline={pipeline}"
        )
    p, v = pipeline, virtual_pipeline
    total = num_microbatches * v
    full = (num_microbatches // p) * p * v  # steps in whole groups of p micro-batches
    tail = num_microbatches % p  # micro-batches of the last, smaller group (forward-only)
    first_rank, last_rank = rank == 0, rank == p - 1
    all_warmup = not forward_only and num_microbatches == p
    if forward_only or all_warmup:
        warmup = total
    else:
        warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
    remaining = total - warmup

    def chunk_of(k: int, forward: bool) -> int:
        chunk = (k % (p * v)) // p if k < full or not tail else (k - full) // tail
        return chunk if forward else v - 1 - chunk

    def microbatch_of(k: int) -> int:
        return (k // (p * v)) * p + k % p if k < full or not tail else num_microbatches - tail + (k - full) % tail

    def sent_activation(k: int) -> tuple[int, int] | None:
        chunk = chunk_of(k, True)
        return None if last_rank and chunk == v - 1 else (chunk, microbatch_of(k))  # the loss is not sent

    def sent_gradient(k: int) -> tuple[int, int] | None:
        chunk = chunk_of(k, False)
        return None if first_rank and chunk == 0 else (chunk, microbatch_of(k))  # virtual stage 0: no input

    plan = _Plan(v)
    plan.exchange(receive_activation=None if first_rank else 0)
    for k in range(warmup):
        plan.compute(False, chunk_of(k, True), microbatch_of(k))
        next_chunk = chunk_of(k + 1, True)
        receive = not (first_rank and next_chunk == 0) and k != total - 1
        if k == warmup - 1 and not forward_only and not all_warmup:
            plan.exchange(
                send_activation=sent_activation(k),
                receive_activation=next_chunk if receive else None,
                receive_gradient=None if last_rank else v - 1,
            )
        else:
            plan.exchange(send_activation=sent_activation(k), receive_activation=next_chunk if receive else None)
    for k in range(remaining):
        forward_k, backward_k = k + warmup, k
        plan.compute(False, chunk_of(forward_k, True), microbatch_of(forward_k))
        plan.compute(True, chunk_of(backward_k, False), microbatch_of(backward_k))
        receive_activation = True
        if first_rank:  # receives from the last rank, which is pipeline - 1 steps behind
            next_forward_chunk = chunk_of(forward_k - (p - 1), True)
            receive_activation = next_forward_chunk != v - 1
            next_forward_chunk += 1
        else:
            next_forward_chunk = chunk_of(forward_k + 1, True)
        receive_gradient = True
        if last_rank:
            next_backward_chunk = chunk_of(backward_k - (p - 1), False)
            receive_gradient = next_backward_chunk != 0
            next_backward_chunk -= 1
        else:
            next_backward_chunk = chunk_of(backward_k + 1, False)
        if k == remaining - 1:
            receive_activation = False
        plan.exchange(
            send_activation=sent_activation(forward_k),
            send_gradient=sent_gradient(backward_k),
            receive_activation=next_forward_chunk if receive_activation else None,
            receive_gradient=next_backward_chunk if receive_gradient else None,
        )
    if not forward_only:
        if all_warmup:
            plan.exchange(receive_gradient=None if last_rank else v - 1)
        for k in range(remaining, total):
            plan.compute(True, chunk_of(k, False), microbatch_of(k))
            next_chunk = chunk_of(k + 1, False)
            receive = not (last_rank and next_chunk == v - 1) and k != total - 1
            plan.exchange(send_gradient=sent_gradient(k), receive_gradient=next_chunk if receive else None)
    return plan.steps


def schedule(
    pipeline: int, virtual_pipeline: int, rank: int, num_microbatches: int, forward_only: bool = False
) -> list[Step]:
    """The plan of ``rank``: interleaved 1F1B when ``virtual_pipeline > 1``, else 1F1B."""
    if num_microbatches < 1:
        raise ValueError(f"pipeline schedule: num_microbatches={num_microbatches} must be >= 1")
    if virtual_pipeline > 1:
        return interleaved_one_f_one_b(pipeline, virtual_pipeline, rank, num_microbatches, forward_only)
    return one_f_one_b(pipeline, rank, num_microbatches, forward_only)


class _Executor:
    """Runs one rank's plan; tensors are keyed by (chunk, micro-batch) and dropped once used."""

    STREAMS = ("ar", "dm")

    def __init__(
        self,
        stages: PipelineStages,
        microbatches: Sequence[MicroBatch],
        loss_fn: LossFunction,
        forward_only: bool,
        forward_context: ForwardContext,
        split: SequenceSplit | None,
        before_last_backward: Callable[[int], None] | None,
    ):
        self.stages, self.microbatches, self.loss_fn, self.forward_only = stages, microbatches, loss_fn, forward_only
        self.forward_context, self.split = forward_context, split
        self.before_last_backward = before_last_backward
        config = stages.chunks[0].config
        self.attention = attention_backend(config.attention_backend, stages.device, config.head_dim)
        group, p, r = stages.groups.pipeline, stages.pipeline, stages.pipeline_rank
        self.group = group
        self.next_rank = dist.get_global_rank(group, (r + 1) % p) if p > 1 else None
        self.previous_rank = dist.get_global_rank(group, (r - 1) % p) if p > 1 else None
        self._rows: dict[int, tuple[RankRows, ContextShard | None]] = {}
        self.inputs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}  # received activations
        self.outputs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}  # sent activations, or (loss,)
        self.output_grads: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self.input_grads: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self.reports: dict[int, LossBreakdown] = {}

    def run(self, step: Step) -> None:
        if isinstance(step, Exchange):
            self.exchange(step)
        elif step.backward:
            self.backward(step.chunk, step.microbatch)
        else:
            with torch.set_grad_enabled(not self.forward_only), self.forward_context():
                self.forward(step.chunk, step.microbatch)

    def rows(self, microbatch: int, batch: PackedBatch | None = None) -> tuple[RankRows, ContextShard | None]:
        """What this rank runs of ``microbatch`` (all of it, or its share under ``split``); ``batch``
        replaces the micro-batch's pack (the first stage's, with its pictures encoded)."""
        if microbatch not in self._rows or batch is not None:
            batch = batch if batch is not None else self.microbatches[microbatch][0]
            if self.split is None:
                self._rows[microbatch] = RankRows.whole(batch, self.attention), None
            else:
                self._rows[microbatch] = self.split.rows(batch, self.attention)
        return self._rows[microbatch]

    def forward(self, chunk: int, microbatch: int) -> None:
        stage = self.stages.chunks[chunk]
        batch, targets = self.microbatches[microbatch]
        hidden = None if stage.is_first else self.inputs[chunk, microbatch]
        if self.forward_only:
            self.inputs.pop((chunk, microbatch), None)
        # The first stage's ViT encodes the pack's pictures in this forward, so they train; later
        # stages only read the pack's layout and positions.
        encoded = stage.encode_vision(batch) if stage.is_first and batch.vision_pixels is not None else None
        rows, shard = self.rows(microbatch, encoded)
        output = stage(rows, hidden)
        if not stage.is_last:
            self.outputs[chunk, microbatch] = output
            return
        if self.split is None:
            report = self.loss_fn(output, batch, targets)
        else:
            report = self.split.losses(self.loss_fn, output, shard, targets)
        self.reports[microbatch] = dataclasses.replace(report, total=report.total.detach())
        if not self.forward_only:
            self.outputs[chunk, microbatch] = (report.total / len(self.microbatches),)

    def backward(self, chunk: int, microbatch: int) -> None:
        stage = self.stages.chunks[chunk]
        if microbatch == len(self.microbatches) - 1 and self.before_last_backward is not None:
            self.before_last_backward(chunk)  # e.g. let the gradient reduction of this chunk start
        outputs = self.outputs.pop((chunk, microbatch))
        grads = None if stage.is_last else self.output_grads.pop((chunk, microbatch))
        with torch.profiler.record_function("backward"):  # a profiling region (docs/DESIGN.md, "Profiling")
            torch.autograd.backward(outputs, grad_tensors=grads)
        if not stage.is_first:
            inputs = self.inputs.pop((chunk, microbatch))
            self.input_grads[chunk, microbatch] = tuple(
                x.grad if x.grad is not None else torch.zeros_like(x) for x in inputs
            )

    def exchange(self, step: Exchange) -> None:
        ops, received = [], []
        for transfer in step.transfers:
            key = (transfer.chunk, transfer.microbatch)
            if transfer.send:
                store = self.outputs if transfer.what == ACTIVATION else self.input_grads
                tensors = store[key] if transfer.what == ACTIVATION and not self.forward_only else store.pop(key)
                self._check_sendable(transfer, tensors)
            else:
                tensors = self._receive_buffers(transfer.microbatch)
                received.append((transfer, tensors))
            peer = self.next_rank if transfer.to_next_rank else self.previous_rank
            op = dist.isend if transfer.send else dist.irecv
            for stream, tensor in enumerate(tensors):
                if tensor.numel():  # both sides know the shapes, so both skip an empty stream
                    tag = 2 * (transfer.what == GRADIENT) + stream
                    ops.append(dist.P2POp(op, tensor.contiguous() if transfer.send else tensor, peer, self.group, tag))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        for transfer, tensors in received:
            key = (transfer.chunk, transfer.microbatch)
            if transfer.what == ACTIVATION:
                self.inputs[key] = tuple(t.requires_grad_(not self.forward_only) for t in tensors)
            else:
                self.output_grads[key] = tensors

    def _receive_buffers(self, microbatch: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, _ = self.rows(microbatch)
        return tuple(
            torch.empty(n, self.stages.hidden_size, dtype=self.stages.dtype, device=self.stages.device)
            for n in (rows.num_ar_rows, rows.num_dm_rows)
        )

    def _check_sendable(self, transfer: Transfer, tensors: tuple[torch.Tensor, ...]) -> None:
        for name, tensor in zip(self.STREAMS, tensors):
            if tensor.dtype != self.stages.dtype:
                raise TypeError(
                    f"pipeline: {transfer.what} of {name}_hidden (chunk {transfer.chunk}, micro-batch "
                    f"{transfer.microbatch}) is {tensor.dtype}, but stages exchange {self.stages.dtype}"
                )


def forward_backward(
    stages: PipelineStages,
    microbatches: Sequence[MicroBatch],
    loss_fn: LossFunction | None = None,
    forward_only: bool = False,
    forward_context: ForwardContext = contextlib.nullcontext,
    split: SequenceSplit | None = None,
    before_last_backward: Callable[[int], None] | None = None,
) -> list[LossBreakdown]:
    """One step's forward and backward passes of ``microbatches`` through the pipeline.

    Every pipeline rank must pass the same micro-batches (same packs; the first stage reads the token
    values, the last the labels and targets, every stage the layout and positions). ``loss_fn``
    (default: ``loss_breakdown`` with flow-matching weight 1) turns the last stage's ``MoTOutput``
    into a ``LossBreakdown``; each micro-batch's ``total / len(microbatches)`` is backpropagated, so the
    gradients are those of the mean of the micro-batch losses. Gradients accumulate into ``.grad``
    and the shared first/last-stage parameters are summed at the end (``finalize_grads``): call once
    per optimizer step. ``forward_context`` wraps each forward (and loss), never a backward: e.g.
    ``lambda: precision.autocast("bf16", device)``; the hidden streams stay in the parameters' dtype
    (fp32 under bf16 autocast). ``split``: each micro-batch's rows are spread over a context-parallel
    group, or over the tensor group under sequence parallelism; stages then exchange this rank's rows
    only, and the losses are ``SequenceSplit.losses``. ``before_last_backward(chunk)`` is called before
    each chunk's last backward of the step (``GradientReducer.arm``). Returns the per-micro-batch breakdowns
    (totals detached) on the last pipeline rank, an empty list elsewhere.
    """
    loss_fn = loss_fn or partial(loss_breakdown, flow_matching_weight=1.0)
    plan = schedule(stages.pipeline, stages.virtual_pipeline, stages.pipeline_rank, len(microbatches), forward_only)
    executor = _Executor(stages, microbatches, loss_fn, forward_only, forward_context, split, before_last_backward)
    for step in plan:
        executor.run(step)
    if not forward_only:
        stages.finalize_grads()
    return [executor.reports[m] for m in sorted(executor.reports)]
