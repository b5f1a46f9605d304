"""Mixture-of-experts MLP (Qwen3-VL-MoE style): top-k softmax routing, SwiGLU experts, and the
Switch-Transformer load-balancing loss.

Expert weights are stored as 3-D tensors like Hugging Face's Qwen3-VL-MoE (``gate_up_proj``
(E, 2*ffn, hidden), ``down_proj`` (E, hidden, ffn)) so conversion is a rename. With expert
parallelism the module holds only ``num_local_experts`` of them and an ``ExpertDispatcher`` moves
tokens to the rank that owns their expert and back; without it, dispatch is local. With tensor
parallelism each rank holds a slice of every expert's FFN units, and a ``tensor_parallel`` region
(``parallel/tensor_parallel.py``) gives the router every token and sums the partial outputs.

Runners that split one micro-batch's tokens over ranks (context parallelism) or pad them pass a
``TokenBalance`` so that the load-balancing loss is that of the whole micro-batch.

The experts run as two grouped GEMMs over the rows sorted by expert (``expert_impl="grouped"``,
torch's ``grouped_mm`` with per-expert offsets computed on the device: no host synchronisation), or
as a Python loop over experts (``"loop"``, the reference; it reads the per-expert counts back to the
host in every layer). docs/DESIGN.md, "Mixture of experts".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

EXPERT_IMPLS = ("grouped", "loop")
# What torch's grouped GEMM accepts (it refuses float64; those experts loop). On CUDA only bf16 on
# sm90+ takes its sync-free kernel: other dtypes/GPUs go through torch's own per-group fallback.
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HAS_GROUPED_MM = hasattr(F, "grouped_mm")  # public since torch 2.9; an older GPU image loops


@dataclass
class RoutedTokens:
    """Token copies grouped by expert: rows of the input, their expert, and routing weights."""

    token_rows: torch.Tensor  # (n * top_k,) which input row each copy comes from
    experts: torch.Tensor  # (n * top_k,) global expert id, sorted ascending
    weights: torch.Tensor  # (n * top_k,) normalised routing probability of that choice


class LocalDispatcher:
    """No expert parallelism: every expert is on this rank."""

    num_ranks = 1
    rank = 0

    def dispatch(self, features: torch.Tensor, experts: torch.Tensor, num_experts: int):
        """Returns (features, local expert ids) for the experts held here, plus a handle to combine."""
        return features, experts, None

    def combine(self, outputs: torch.Tensor, handle) -> torch.Tensor:
        return outputs


@dataclass(frozen=True)
class TokenBalance:
    """Which tokens one MoE call's balancing loss averages over.

    ``rows``: only the first ``rows`` rows of the input are real tokens (None: all; the rest is a
    runner's padding). ``group``: the micro-batch is split over these ranks (None: all of it is
    here); counts, probability sums and token counts are then summed over it, so every rank gets
    the whole micro-batch's loss, with group-size x this rank's share as its gradient (the
    convention of ``loss_breakdown(group=...)``). Passed with each call, not kept on the module, so
    activation recomputation and interleaved pipeline micro-batches see their own.
    """

    group: dist.ProcessGroup | None = None
    rows: int | None = None


WHOLE_INPUT = TokenBalance()


class WholeExperts:
    """No tensor parallelism: this rank routes its own tokens through whole experts."""

    aux_gradient_share = 1.0  # of the balancing gradient this rank injects (the rest comes from its peers)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def leave(self, out: torch.Tensor) -> torch.Tensor:
        return out


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the MLP output whose backward also sends ``weight`` into the auxiliary loss.

    The balancing loss then trains the router whenever the main loss is backpropagated through
    this layer — on any pipeline stage, with no extra term to carry to the last stage (Megatron's
    MoEAuxLossAutoScaler does the same).
    """

    @staticmethod
    def forward(ctx, output, aux_loss, weight):
        ctx.save_for_backward(aux_loss)
        ctx.weight = weight
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.weight), None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's where it is on (what ``F.linear`` would use)."""
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def looped_experts(
    features: torch.Tensor, ends: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> torch.Tensor:
    """SwiGLU of each row through its expert, one expert at a time. ``features`` (n, hidden) sorted
    by expert, ``ends`` (E,) where each expert's rows end, weights (E, 2*ffn, hidden) and (E, hidden, ffn)."""
    counts = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()  # read on the host
    outputs = []
    for e, rows in enumerate(features.split(counts)):
        if rows.shape[0]:
            gate, up = F.linear(rows, gate_up_proj[e]).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, down_proj[e]))
    return torch.cat(outputs) if outputs else features.new_zeros(0, down_proj.shape[1])


def grouped_experts(
    features: torch.Tensor, ends: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor
) -> torch.Tensor:
    """``looped_experts`` as two grouped GEMMs: every expert's rows in one call, the group ends
    stay on the device. Only where ``grouped_mm_takes`` the dtype and widths."""
    dtype = compute_dtype(features)  # grouped_mm ignores autocast: cast as F.linear would
    hidden = F.grouped_mm(features.to(dtype), gate_up_proj.to(dtype).transpose(1, 2), offs=ends)
    gate, up = hidden.chunk(2, dim=-1)
    # Its CPU backward refuses an expanded (stride-0) gradient; the product's is a real tensor.
    return F.grouped_mm(F.silu(gate) * up, down_proj.to(dtype).transpose(1, 2), offs=ends)


def grouped_mm_takes(dtype: torch.dtype, hidden_size: int, ffn_size: int) -> bool:
    """Whether torch's grouped GEMM runs these experts: a dtype it has a kernel for, and rows whose
    strides are multiples of 16 bytes (it refuses others, on CPU too)."""
    aligned = all(size * dtype.itemsize % 16 == 0 for size in (hidden_size, ffn_size))
    return HAS_GROUPED_MM and dtype in GROUPED_MM_DTYPES and aligned


def expert_ends(sorted_experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(num_experts,) int32: where each expert's rows end in ``sorted_experts`` (ascending ids in
    [0, num_experts)), found on the device (``bincount`` would read the largest id back on CUDA)."""
    bounds = torch.arange(1, num_experts + 1, device=sorted_experts.device, dtype=sorted_experts.dtype)
    return torch.searchsorted(sorted_experts, bounds, out_int32=True)


class MoEMLP(nn.Module):
    """Top-k routed SwiGLU experts. Input and output (n, hidden); ``aux_loss`` holds the last
    forward's load-balancing loss (E * sum_i f_i * P_i over the micro-batch, see ``TokenBalance``),
    whose gradient, scaled by ``aux_loss_weight``, rides along the output's backward."""

    # Where each expert weight keeps its FFN units (dim) and how many blocks are stacked along it:
    # gate_up_proj is [gate; up], so a split over FFN units takes a slice of each half (megatron's
    # partition_stride), and checkpoints describe it as (E, 2, ffn, hidden) so any split can load it.
    FFN_LAYOUT = {"gate_up_proj": (1, 2), "down_proj": (2, 1)}

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int,
        normalize_top_k: bool = True,
        aux_loss_weight: float = 0.0,
        expert_impl: str = "grouped",
    ):
        super().__init__()
        if expert_impl not in EXPERT_IMPLS:
            raise ValueError(f"moe_expert_impl={expert_impl!r} is not one of {EXPERT_IMPLS}")
        # "grouped" loops anyway where grouped_mm refuses (float64, unaligned widths: grouped_mm_takes).
        self.expert_impl = expert_impl
        self.aux_loss_weight = aux_loss_weight
        # The factor the main loss is scaled by before backward (1 / accumulation steps), which
        # the injected balancing gradient must follow; see set_aux_loss_scale.
        self.aux_loss_scale = 1.0
        if not 0 < top_k <= num_experts:
            raise ValueError(f"moe_top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts, self.top_k, self.normalize_top_k = num_experts, top_k, normalize_top_k
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.expert_offset = 0  # first global expert id held here (expert parallelism changes it)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn_hidden_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        for weight in (self.gate_up_proj, self.down_proj):
            nn.init.normal_(weight, std=0.02)
        self.dispatcher = LocalDispatcher()
        self.tensor_parallel = WholeExperts()
        self.aux_loss: torch.Tensor | None = None

    @property
    def num_local_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def route(self, x: torch.Tensor, balance: TokenBalance = WHOLE_INPUT) -> RoutedTokens:
        # Routing in fp32 at least (bf16 logits tie and flip top-k choices); fp64 stays fp64.
        probs = F.softmax(self.router(x).to(torch.promote_types(x.dtype, torch.float32)), dim=-1)
        top_p, top_e = probs.topk(self.top_k, dim=-1)
        if self.normalize_top_k:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        self.aux_loss = self._balancing_loss(probs, top_e, balance)
        experts, order = top_e.reshape(-1).sort(stable=True)
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)[order]
        return RoutedTokens(rows, experts, top_p.reshape(-1)[order].to(x.dtype))

    def _balancing_loss(self, probs: torch.Tensor, top_e: torch.Tensor, balance: TokenBalance) -> torch.Tensor:
        """Switch Transformer eq. 4-6: fraction of routed copies per expert times the mean router
        probability, scaled so a perfectly uniform router scores 1."""
        rows = probs.shape[0] if balance.rows is None else balance.rows
        probs, top_e = probs[:rows], top_e[:rows]
        chosen = top_e.reshape(-1)  # counted on the device: no host read (unlike bincount on CUDA)
        counts = probs.new_zeros(self.num_experts).index_add_(0, chosen, probs.new_ones(chosen.shape))
        prob_sums = probs.sum(dim=0)
        if balance.group is None:
            return self._switch_loss(counts, prob_sums, rows)
        stats = torch.cat([counts, prob_sums.detach(), prob_sums.new_tensor([rows])])
        dist.all_reduce(stats, group=balance.group)
        counts, tokens = stats[: self.num_experts], int(stats[-1])
        whole = self._switch_loss(counts, stats[self.num_experts : -1], tokens)
        share = self._switch_loss(counts, prob_sums, tokens) * dist.get_world_size(balance.group)
        return share + (whole - share).detach()

    def _switch_loss(self, counts: torch.Tensor, prob_sums: torch.Tensor, tokens: int) -> torch.Tensor:
        """E * sum_i (counts_i / (tokens * k)) * (prob_sums_i / tokens); 0 (still in the graph) for no tokens."""
        if tokens == 0:
            return prob_sums.sum() * 0
        return self.num_experts * (counts * prob_sums).sum() / (tokens * tokens * self.top_k)

    def _experts(self, features: torch.Tensor, local_experts: torch.Tensor) -> torch.Tensor:
        """SwiGLU of each row through its local expert; rows must be sorted by expert."""
        ends = expert_ends(local_experts, self.num_local_experts)
        hidden_size, ffn_size = self.down_proj.shape[1:]
        grouped = self.expert_impl == "grouped" and grouped_mm_takes(compute_dtype(features), hidden_size, ffn_size)
        run = grouped_experts if grouped else looped_experts
        return run(features, ends, self.gate_up_proj, self.down_proj)

    def forward(self, x: torch.Tensor, balance: TokenBalance = WHOLE_INPUT) -> torch.Tensor:
        x = self.tensor_parallel.enter(x)  # under tensor parallelism: every token of the group
        routed = self.route(x, balance)
        features, local_experts, handle = self.dispatcher.dispatch(
            x.index_select(0, routed.token_rows), routed.experts, self.num_experts
        )
        outputs = self.dispatcher.combine(self._experts(features, local_experts - self.expert_offset), handle)
        out = torch.zeros_like(x).index_add(0, routed.token_rows, outputs * routed.weights[:, None])
        if self.aux_loss_weight and torch.is_grad_enabled():
            weight = self.aux_loss_weight * self.aux_loss_scale * self.tensor_parallel.aux_gradient_share
            out = _AttachAuxLoss.apply(out, self.aux_loss, weight)
        return self.tensor_parallel.leave(out)  # partial sums of the experts' FFN slices, added up


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Tells every MoE layer the factor the loss is scaled by before backward (e.g. 1/micro-batches)."""
    for module in model.modules():
        if isinstance(module, MoEMLP):
            module.aux_loss_scale = scale
