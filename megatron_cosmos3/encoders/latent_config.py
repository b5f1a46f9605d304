"""Config section for the generation encoders: where DM latents come from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KINDS = ("vae", "pooled")


@dataclass
class LatentEncoderConfig:
    """Frozen generation encoders (a plain dataclass, usable as an OmegaConf structured config).

    online: True = encode pixels/waveforms inside the training process with the frozen VAEs;
        False = latents were pre-encoded into the shards by data_pipelines and are read as is.
    video_vae_path: local diffusers AutoencoderKLWan folder ("" = no video encoder).
    audio_vae_path: local diffusers AutoencoderOobleck folder ("" = no audio encoder).
    dtype: weights/compute dtype of the frozen VAEs: float32, bfloat16 or float16.
    kind: which encoder made the run's latents, and so which decoder turns generated latents into
        media: "vae" = the frozen VAEs below; "pooled" = the weight-free analytic stand-in of the CPU
        demo (``data/latent_encoders.py``, ``PooledLatentEncoder``, seed ``pooled_seed``), always
        encoded offline by ``data_pipelines``.
    pooled_seed: seed of the pooled encoder's projections (the data pipelines use 0).
    """

    online: bool = False
    video_vae_path: str = ""
    audio_vae_path: str = ""
    dtype: str = "bfloat16"
    kind: str = "vae"
    pooled_seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the field if the section is inconsistent."""
        if self.dtype not in _DTYPES:
            raise ValueError(f"encoders.dtype={self.dtype!r}; expected one of {sorted(_DTYPES)}")
        if self.kind not in KINDS:
            raise ValueError(f"encoders.kind={self.kind!r}; expected one of {list(KINDS)}")
        if self.kind == "pooled" and self.online:
            raise ValueError(
                "encoders.kind='pooled' with encoders.online=true: pooled latents are written offline "
                "(data_pipelines/generate_world.py --latents pooled); online encoding uses kind='vae'"
            )
        if self.online and not (self.video_vae_path or self.audio_vae_path):
            raise ValueError("encoders.online=true needs encoders.video_vae_path and/or encoders.audio_vae_path")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]
