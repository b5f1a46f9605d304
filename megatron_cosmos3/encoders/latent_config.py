"""Config section for the generation encoders: where DM latents come from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LatentEncoderConfig:
    """Frozen generation encoders (a plain dataclass, usable as an OmegaConf structured config).

    online: True = encode pixels/waveforms inside the training process with the frozen VAEs;
        False = latents were pre-encoded into the shards by data_pipelines and are read as is.
    video_vae_path: local diffusers AutoencoderKLWan folder ("" = no video encoder).
    audio_vae_path: local diffusers AutoencoderOobleck folder ("" = no audio encoder).
    dtype: weights/compute dtype of the frozen VAEs: float32, bfloat16 or float16.
    """

    online: bool = False
    video_vae_path: str = ""
    audio_vae_path: str = ""
    dtype: str = "bfloat16"

    def validate(self) -> None:
        """Raise ValueError naming the field if the section is inconsistent."""
        if self.dtype not in _DTYPES:
            raise ValueError(f"encoders.dtype={self.dtype!r}; expected one of {sorted(_DTYPES)}")
        if self.online and not (self.video_vae_path or self.audio_vae_path):
            raise ValueError("encoders.online=true needs encoders.video_vae_path and/or encoders.audio_vae_path")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]
