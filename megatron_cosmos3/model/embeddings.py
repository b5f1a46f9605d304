"""DM token embeddings and heads: one input/output projection pair per stream kind, and the
timestep embedding. Actions get one pair per embodiment, registered by name."""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_cosmos3.model.config import EmbodimentConfig, MoTConfig, embodiment_name_problem
from megatron_cosmos3.model.packed_batch import ACTION_STREAM_PREFIX, action_stream_key


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1] (scaled to 1000 steps, as in DiT) through a SiLU MLP."""

    def __init__(self, frequency_dim: int, hidden_size: int):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = (1000.0 * t.float())[:, None] * freqs[None]
        features = torch.cat([angles.cos(), angles.sin()], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class DMStreamProjections(nn.Module):
    """Maps each DM stream's values (n_k, d_k) into the hidden size and predictions back out.

    Keys: ``"video"``, ``"audio"`` and ``"action/<embodiment>"``. Module names avoid "/" (not allowed
    in ``nn.ModuleDict``), so actions live in ``action_in[embodiment]`` / ``action_out[embodiment]``.
    """

    def __init__(self, config: MoTConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.init_std = config.init_std
        widths = {"video": config.video_token_dim, "audio": config.audio_latent_dim}
        self.media_in = nn.ModuleDict({k: nn.Linear(d, config.hidden_size) for k, d in widths.items()})
        self.media_out = nn.ModuleDict({k: nn.Linear(config.hidden_size, d) for k, d in widths.items()})
        self.action_in = nn.ModuleDict()
        self.action_out = nn.ModuleDict()
        self.embodiments: dict[str, EmbodimentConfig] = {}
        for name, embodiment in config.embodiments.items():
            self.add_embodiment(name, embodiment)

    def add_embodiment(self, name: str, embodiment: EmbodimentConfig) -> None:
        """Registers a new embodiment's projection pair; the backbone is left untouched."""
        if name in self.embodiments:
            raise ValueError(f"embodiment {name!r} is already registered")
        problem = embodiment_name_problem(name)
        if problem is not None:
            raise ValueError(problem)
        self.embodiments[name] = embodiment
        device = next(self.media_in.parameters()).device
        self.action_in[name] = nn.Linear(embodiment.action_dim, self.hidden_size, device=device)
        self.action_out[name] = nn.Linear(self.hidden_size, embodiment.action_dim, device=device)
        for layer in (self.action_in[name], self.action_out[name]):
            nn.init.normal_(layer.weight, std=self.init_std)
            nn.init.zeros_(layer.bias)

    def stream_widths(self) -> dict[str, int]:
        """Every stream key this model projects -> its width, in one fixed order (media, then the
        embodiments as registered)."""
        widths = {key: layer.in_features for key, layer in self.media_in.items()}
        widths.update({action_stream_key(name): layer.in_features for name, layer in self.action_in.items()})
        return widths

    def _pair(self, key: str) -> tuple[nn.Linear, nn.Linear]:
        if key.startswith(ACTION_STREAM_PREFIX):
            name = key[len(ACTION_STREAM_PREFIX) :]
            if name not in self.action_in:
                raise KeyError(
                    f"unknown embodiment {name!r} in DM stream {key!r}; registered: {sorted(self.action_in)}"
                )
            return self.action_in[name], self.action_out[name]
        if key not in self.media_in:
            known = sorted(self.media_in) + [action_stream_key(n) for n in sorted(self.action_in)]
            raise KeyError(f"unknown DM stream {key!r}; known streams: {known}")
        return self.media_in[key], self.media_out[key]

    def embed(
        self,
        dm_tokens: dict[str, torch.Tensor],
        dm_token_index: dict[str, torch.Tensor],
        num_dm_tokens: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """(num_dm_tokens, hidden): each stream projected and placed at its rows of the DM stream."""
        hidden = torch.zeros(num_dm_tokens, self.hidden_size, dtype=dtype, device=self._device())
        for key, values in dm_tokens.items():
            projection, _ = self._pair(key)
            hidden = hidden.index_copy(0, dm_token_index[key], projection(values.to(dtype)))
        return hidden

    def predict(self, dm_hidden: torch.Tensor, dm_token_index: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-stream predictions (n_k, d_k) from the final DM hidden states."""
        return {key: self._pair(key)[1](dm_hidden.index_select(0, index)) for key, index in dm_token_index.items()}

    def _device(self) -> torch.device:
        return next(self.media_in.parameters()).device
