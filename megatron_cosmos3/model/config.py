"""Typed configuration of the MoT backbone (one dataclass carries every model knob)."""

from __future__ import annotations

from dataclasses import dataclass, field

# The FPS rule: one second of real time spans TPS_BASE temporal position units in every stream
# (24 fps video, 4x temporally compressed by the VAE -> 6 latent frames per second).
TPS_BASE = 6.0


@dataclass
class EmbodimentConfig:
    """One robot/vehicle/camera embodiment: its pseudo-action width and sampling rate."""

    action_dim: int = 19
    rate_hz: float = 10.0


@dataclass
class MoTConfig:
    """Dimensions of both towers (identical shapes: both start from the same Qwen3-VL weights)."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    ffn_hidden_size: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # Qwen3-VL's interleaved 3-axis rotary split (t, h, w) of the head_dim/2 frequencies.
    mrope_section: list[int] = field(default_factory=lambda: [4, 2, 2])
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    # DM token streams. A video token is a 2x2 patch of VAE latents (32x32 pixels overall).
    video_latent_channels: int = 8
    video_patch_size: int = 2
    audio_latent_dim: int = 16
    embodiments: dict[str, EmbodimentConfig] = field(
        default_factory=lambda: {
            "single_arm": EmbodimentConfig(action_dim=19, rate_hz=10.0),
            "humanoid": EmbodimentConfig(action_dim=57, rate_hz=30.0),
        }
    )
    timestep_embedding_dim: int = 64
    # "sdpa" (varlen via per-sample SDPA, CPU and GPU), "flash" (flash-attn varlen, GPU),
    # "dense" (a dense-mask reference for tests).
    attention_backend: str = "sdpa"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"MoTConfig: {message}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                     "num_kv_heads", "head_dim", "ffn_hidden_size", "timestep_embedding_dim"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, f"{name} must be a positive int, got {value!r}")
        require(
            self.num_attention_heads % self.num_kv_heads == 0,
            f"num_attention_heads={self.num_attention_heads} must be a multiple of "
            f"num_kv_heads={self.num_kv_heads} (grouped-query attention)",
        )
        require(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for rotary embeddings")
        require(
            len(self.mrope_section) == 3 and sum(self.mrope_section) == self.head_dim // 2,
            f"mrope_section={list(self.mrope_section)} must have 3 entries summing to "
            f"head_dim/2={self.head_dim // 2}",
        )
        require(
            3 * max(self.mrope_section[1], self.mrope_section[2]) <= self.head_dim // 2,
            f"mrope_section={list(self.mrope_section)}: the interleaved h/w frequencies "
            f"do not fit in head_dim/2={self.head_dim // 2}",
        )
        require(self.timestep_embedding_dim % 2 == 0,
                f"timestep_embedding_dim={self.timestep_embedding_dim} must be even")
        for name, emb in self.embodiments.items():
            require(emb.action_dim > 0, f"embodiments.{name}.action_dim must be > 0, got {emb.action_dim}")
            require(emb.rate_hz > 0, f"embodiments.{name}.rate_hz must be > 0, got {emb.rate_hz}")

    @property
    def video_token_dim(self) -> int:
        return self.video_latent_channels * self.video_patch_size**2
