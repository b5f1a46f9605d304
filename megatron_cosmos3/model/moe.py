"""Mixture-of-experts MLP (Qwen3-VL-MoE style): top-k softmax routing, SwiGLU experts, and the
Switch-Transformer load-balancing loss.

Expert weights are stored as 3-D tensors like Hugging Face's Qwen3-VL-MoE (``gate_up_proj``
(E, 2*ffn, hidden), ``down_proj`` (E, hidden, ffn)) so conversion is a rename. With expert
parallelism the module holds only ``num_local_experts`` of them and an ``ExpertDispatcher`` moves
tokens to the rank that owns their expert and back; without it, dispatch is local.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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


class MoEMLP(nn.Module):
    """Top-k routed SwiGLU experts. Input and output (n, hidden); ``aux_loss`` holds the last
    forward's load-balancing loss (E * sum_i f_i * P_i, computed on this rank's tokens), whose
    gradient, scaled by ``aux_loss_weight``, rides along the output's backward."""

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int,
        normalize_top_k: bool = True,
        aux_loss_weight: float = 0.0,
    ):
        super().__init__()
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
        self.aux_loss: torch.Tensor | None = None

    @property
    def num_local_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def route(self, x: torch.Tensor) -> RoutedTokens:
        probs = F.softmax(self.router(x).float(), dim=-1)
        top_p, top_e = probs.topk(self.top_k, dim=-1)
        if self.normalize_top_k:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        # Load balancing (Switch Transformer eq. 4-6): fraction of routed copies per expert times
        # the mean router probability, scaled so a perfectly uniform router scores 1.
        counts = torch.bincount(top_e.reshape(-1), minlength=self.num_experts).to(probs.dtype)
        fraction = counts / max(1, top_e.numel())
        self.aux_loss = self.num_experts * (fraction * probs.mean(dim=0)).sum() if x.shape[0] else probs.sum() * 0
        experts, order = top_e.reshape(-1).sort(stable=True)
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)[order]
        return RoutedTokens(rows, experts, top_p.reshape(-1)[order].to(x.dtype))

    def _experts(self, features: torch.Tensor, local_experts: torch.Tensor) -> torch.Tensor:
        """SwiGLU of each row through its local expert; rows must be sorted by expert."""
        counts = torch.bincount(local_experts, minlength=self.num_local_experts).tolist()
        outputs = []
        for e, rows in enumerate(features.split(counts)):
            if rows.shape[0]:
                gate, up = F.linear(rows, self.gate_up_proj[e]).chunk(2, dim=-1)
                outputs.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
        return torch.cat(outputs) if outputs else features.new_zeros(0, self.down_proj.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routed = self.route(x)
        features, local_experts, handle = self.dispatcher.dispatch(
            x.index_select(0, routed.token_rows), routed.experts, self.num_experts
        )
        outputs = self.dispatcher.combine(self._experts(features, local_experts - self.expert_offset), handle)
        out = torch.zeros_like(x).index_add(0, routed.token_rows, outputs * routed.weights[:, None])
        if self.aux_loss_weight and torch.is_grad_enabled():
            out = _AttachAuxLoss.apply(out, self.aux_loss, self.aux_loss_weight * self.aux_loss_scale)
        return out


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Tells every MoE layer the factor the loss is scaled by before backward (e.g. 1/micro-batches)."""
    for module in model.modules():
        if isinstance(module, MoEMLP):
            module.aux_loss_scale = scale
