"""The packed micro-batch: the model's one input type.

Several samples share one sequence. Each sample follows the layout
``[text, ViT, EOS, BOG | clean conditioning DM tokens, noisy DM targets]``. In memory the pack is
stored as two token streams, which is what lets every tower matmul run on one contiguous slice:

* the **AR stream** holds the AR sections of all samples, sample after sample
  (``ar_cu_seqlens`` marks where each sample's section starts);
* the **DM stream** holds the DM sections of all samples in the same order (``dm_cu_seqlens``).

Logical positions (RoPE) are carried explicitly in ``ar_positions`` / ``dm_positions`` and are
independent of this memory order.

DM tokens come from several *streams kinds*, each with its own width and projection:
``"video"`` (2x2 patches of video-VAE latents), ``"audio"`` (audio-VAE latents) and
``"action/<embodiment>"`` (pseudo-actions of one embodiment). ``dm_tokens[key]`` holds the values of
all tokens of that kind, and ``dm_token_index[key]`` says where in the DM stream each row sits.

Loss masks: ``ar_labels`` is the next-token target of every AR position (``IGNORE_INDEX`` where no
cross-entropy is taken: prompts, ViT tokens, the last token of a sample); ``dm_noise_mask`` marks the
noisy DM targets, the only DM tokens the flow-matching loss counts. Clean conditioning tokens carry
timestep 0.

ViT tokens: ``ar_is_vision`` marks the AR rows whose embeddings come from the vision encoder
(``ar_vision_embeds``, in row order) instead of the vocabulary. ``ar_deepstack_embeds`` (optional,
Qwen3-VL's DeepStack) holds k more feature sets for the same rows; set i is added to those rows'
hidden states after Reasoner layer i. A pack may instead carry the pictures themselves —
``vision_pixels`` (the ViT's input rows, ``model.vision.image_patches``) and ``vision_grid_thw``
(one patch grid per picture, in row order) — which the model's own ViT turns into those embeddings
(``MoTModel.encode_vision``) inside the training step, so the ViT trains with the rest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100
ACTION_STREAM_PREFIX = "action/"


def action_stream_key(embodiment: str) -> str:
    """The DM stream key of an embodiment's pseudo-actions, e.g. ``"action/single_arm"``."""
    return ACTION_STREAM_PREFIX + embodiment


@dataclass
class PackedSample:
    """One sample's pieces, before packing. Shapes: ``n_ar`` AR tokens, ``n_dm`` DM tokens.

    ``dm_streams`` lists the sample's DM spans in layout order (clean conditioning first); each is
    ``(stream_key, values (n_k, d_k))``. ``dm_noise_mask`` (n_dm,) marks noisy targets, and must be
    False on a prefix and True on the rest.
    """

    task: str
    ar_token_ids: torch.Tensor  # (n_ar,) int64
    ar_labels: torch.Tensor  # (n_ar,) int64, IGNORE_INDEX where no loss
    ar_positions: torch.Tensor  # (3, n_ar) float32: (t, h, w)
    dm_streams: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    dm_positions: torch.Tensor | None = None  # (3, n_dm) float32
    dm_noise_mask: torch.Tensor | None = None  # (n_dm,) bool
    ar_vision_embeds: torch.Tensor | None = None  # (n_vision, hidden) for ViT positions
    ar_is_vision: torch.Tensor | None = None  # (n_ar,) bool
    ar_deepstack_embeds: torch.Tensor | None = None  # (k, n_vision, hidden), DeepStack features
    vision_pixels: torch.Tensor | None = None  # (n_patches, patch_dim) uint8 (or normalised float): ViT input
    vision_grid_thw: torch.Tensor | None = None  # (n_pictures, 3) int64 patch grids of vision_pixels

    @property
    def num_ar_tokens(self) -> int:
        return int(self.ar_token_ids.numel())

    @property
    def num_dm_tokens(self) -> int:
        return sum(int(values.shape[0]) for _, values in self.dm_streams)


@dataclass
class PackedBatch:
    """A packed micro-batch of ``num_samples`` samples (see the module docstring for the layout)."""

    task_names: tuple[str, ...]
    sample_task: torch.Tensor  # (S,) int64 index into task_names
    ar_token_ids: torch.Tensor  # (n_ar,) int64
    ar_labels: torch.Tensor  # (n_ar,) int64
    ar_positions: torch.Tensor  # (3, n_ar) float32
    ar_cu_seqlens: torch.Tensor  # (S+1,) int64
    dm_cu_seqlens: torch.Tensor  # (S+1,) int64
    dm_positions: torch.Tensor  # (3, n_dm) float32
    dm_noise_mask: torch.Tensor  # (n_dm,) bool
    dm_timesteps: torch.Tensor  # (n_dm,) float32 in [0, 1]; 0 = clean, 1 = pure noise
    dm_tokens: dict[str, torch.Tensor]  # key -> (n_k, d_k) values fed to the model
    dm_token_index: dict[str, torch.Tensor]  # key -> (n_k,) int64 rows of the DM stream
    ar_vision_embeds: torch.Tensor | None = None  # (n_vision, hidden)
    ar_is_vision: torch.Tensor | None = None  # (n_ar,) bool
    ar_deepstack_embeds: torch.Tensor | None = None  # (k, n_vision, hidden)
    vision_pixels: torch.Tensor | None = None  # (n_patches, patch_dim) uint8 or float, until the ViT encodes them
    vision_grid_thw: torch.Tensor | None = None  # (n_pictures, 3) int64

    @property
    def num_samples(self) -> int:
        return int(self.sample_task.numel())

    @property
    def num_ar_tokens(self) -> int:
        return int(self.ar_token_ids.numel())

    @property
    def num_dm_tokens(self) -> int:
        return int(self.dm_noise_mask.numel())

    def to(self, device: torch.device | str) -> PackedBatch:
        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device, non_blocking=True)
            if isinstance(value, dict):
                return {k: v.to(device, non_blocking=True) for k, v in value.items()}
            return value

        return dataclasses.replace(self, **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def replace(self, **changes) -> PackedBatch:
        return dataclasses.replace(self, **changes)

    def with_every_stream(self, stream_widths: dict[str, int], patch_dim: int | None = None) -> PackedBatch:
        """The same pack holding every stream of ``stream_widths`` (key -> width), in that order,
        with zero rows where it has none of them, and with ``patch_dim`` an (empty) picture set where
        it carries no pictures: a model run on it calls every stream projection (and its ViT) whatever
        the pack holds (``MoTModel.with_every_module``). The tokens, their rows and the losses are
        unchanged; only the order of the stream keys may differ."""
        unknown = sorted(set(self.dm_tokens) - set(stream_widths))
        if unknown:
            raise ValueError(
                f"PackedBatch.with_every_stream: the pack's streams {unknown} are not in {list(stream_widths)}"
            )
        like, rows = self.dm_timesteps, self.dm_noise_mask.new_zeros(0, dtype=torch.long)
        tokens = {key: self.dm_tokens.get(key, like.new_zeros(0, width)) for key, width in stream_widths.items()}
        index = {key: self.dm_token_index.get(key, rows) for key in stream_widths}
        changes = dict(dm_tokens=tokens, dm_token_index=index)
        if patch_dim is not None and self.vision_pixels is None and self.ar_vision_embeds is None:
            changes.update(
                vision_pixels=torch.zeros(0, patch_dim, dtype=torch.uint8, device=like.device),
                vision_grid_thw=torch.zeros(0, 3, dtype=torch.long, device=like.device),
                ar_is_vision=torch.zeros_like(self.ar_token_ids, dtype=torch.bool),
            )
        return self.replace(**changes)

    @classmethod
    def from_samples(cls, samples: list[PackedSample]) -> PackedBatch:
        """Concatenates samples into the two-stream packed form, validating each one."""
        if not samples:
            raise ValueError("PackedBatch.from_samples: got no samples")
        task_names = tuple(dict.fromkeys(s.task for s in samples))
        ar_lengths, dm_lengths = [], []
        token_values: dict[str, list[torch.Tensor]] = {}
        token_index: dict[str, list[torch.Tensor]] = {}
        dm_positions, dm_noise, vision_embeds, is_vision, deepstack = [], [], [], [], []
        pixels, grids = [], []
        dm_offset = 0
        for i, sample in enumerate(samples):
            _validate_sample(i, sample)
            ar_lengths.append(sample.num_ar_tokens)
            dm_lengths.append(sample.num_dm_tokens)
            cursor = dm_offset
            for key, values in sample.dm_streams:
                n = int(values.shape[0])
                token_values.setdefault(key, []).append(values.float())
                token_index.setdefault(key, []).append(torch.arange(cursor, cursor + n))
                cursor += n
            dm_offset = cursor
            if sample.num_dm_tokens:
                dm_positions.append(sample.dm_positions.float())
                dm_noise.append(sample.dm_noise_mask.bool())
            flags = (
                sample.ar_is_vision
                if sample.ar_is_vision is not None
                else torch.zeros(sample.num_ar_tokens, dtype=torch.bool)
            )
            is_vision.append(flags)
            if sample.ar_vision_embeds is not None:
                vision_embeds.append(sample.ar_vision_embeds)
                deepstack.append(sample.ar_deepstack_embeds)
            if sample.vision_pixels is not None:
                pixels.append(sample.vision_pixels)
                grids.append(sample.vision_grid_thw.long().reshape(-1, 3))

        n_dm = dm_offset
        ar_is_vision = torch.cat(is_vision)
        if len({p.dtype for p in pixels}) > 1:  # raw uint8 and processor floats must not mix
            raise ValueError(
                f"PackedBatch.from_samples: vision_pixels of dtypes {sorted({str(p.dtype) for p in pixels})}"
            )
        if vision_embeds and pixels:
            raise ValueError("PackedBatch.from_samples: samples carry ViT embeddings and pixels: one kind per pack")
        if any(d is None for d in deepstack) and any(d is not None for d in deepstack):
            raise ValueError(
                "PackedBatch.from_samples: either every sample with ViT tokens carries ar_deepstack_embeds or none does"
            )
        batch = cls(
            task_names=task_names,
            sample_task=torch.tensor([task_names.index(s.task) for s in samples], dtype=torch.long),
            ar_token_ids=torch.cat([s.ar_token_ids.long() for s in samples]),
            ar_labels=torch.cat([s.ar_labels.long() for s in samples]),
            ar_positions=torch.cat([s.ar_positions.float() for s in samples], dim=1),
            ar_cu_seqlens=_cumulative(ar_lengths),
            dm_cu_seqlens=_cumulative(dm_lengths),
            dm_positions=torch.cat(dm_positions, dim=1) if dm_positions else torch.zeros(3, 0),
            dm_noise_mask=torch.cat(dm_noise) if dm_noise else torch.zeros(0, dtype=torch.bool),
            dm_timesteps=torch.zeros(n_dm),
            dm_tokens={k: torch.cat(v) for k, v in token_values.items()},
            dm_token_index={k: torch.cat(v) for k, v in token_index.items()},
            ar_vision_embeds=torch.cat(vision_embeds) if vision_embeds else None,
            ar_is_vision=ar_is_vision if bool(ar_is_vision.any()) else None,
            ar_deepstack_embeds=torch.cat(deepstack, dim=1) if deepstack and deepstack[0] is not None else None,
            vision_pixels=torch.cat(pixels) if pixels else None,
            vision_grid_thw=torch.cat(grids) if grids else None,
        )
        batch.validate()
        return batch

    def validate(self) -> None:
        """Checks shapes and the layout invariants; raises ValueError naming the field."""
        n_ar, n_dm, s = self.num_ar_tokens, self.num_dm_tokens, self.num_samples

        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"PackedBatch: {message}")

        require(s > 0, "a pack needs at least one sample")
        require(
            self.ar_labels.shape == (n_ar,), f"ar_labels has shape {tuple(self.ar_labels.shape)}, expected ({n_ar},)"
        )
        require(
            self.ar_positions.shape == (3, n_ar),
            f"ar_positions has shape {tuple(self.ar_positions.shape)}, expected (3, {n_ar})",
        )
        require(
            self.dm_positions.shape == (3, n_dm),
            f"dm_positions has shape {tuple(self.dm_positions.shape)}, expected (3, {n_dm})",
        )
        require(
            self.dm_timesteps.shape == (n_dm,),
            f"dm_timesteps has shape {tuple(self.dm_timesteps.shape)}, expected ({n_dm},)",
        )
        for name, cu, total in (
            ("ar_cu_seqlens", self.ar_cu_seqlens, n_ar),
            ("dm_cu_seqlens", self.dm_cu_seqlens, n_dm),
        ):
            require(cu.shape == (s + 1,), f"{name} has shape {tuple(cu.shape)}, expected ({s + 1},)")
            require(int(cu[0]) == 0 and int(cu[-1]) == total, f"{name} must run from 0 to {total}, got {cu.tolist()}")
            require(bool((cu[1:] >= cu[:-1]).all()), f"{name} must be non-decreasing, got {cu.tolist()}")
        require(
            self.dm_tokens.keys() == self.dm_token_index.keys(),
            f"dm_tokens keys {sorted(self.dm_tokens)} differ from dm_token_index keys {sorted(self.dm_token_index)}",
        )
        covered = torch.zeros(n_dm, dtype=torch.long)
        for key, values in self.dm_tokens.items():
            index = self.dm_token_index[key]
            require(
                values.dim() == 2 and values.shape[0] == index.numel(),
                f"dm_tokens[{key!r}] has shape {tuple(values.shape)} but {index.numel()} indices",
            )
            require(bool(torch.isfinite(values).all()), f"dm_tokens[{key!r}] holds NaN or inf")
            covered.index_add_(0, index.cpu(), torch.ones_like(index.cpu()))
        require(bool((covered == 1).all()), "every DM token must belong to exactly one dm_tokens stream")
        t = self.dm_timesteps
        require(bool(((t >= 0) & (t <= 1)).all()), "dm_timesteps must lie in [0, 1]")
        require(bool((t[~self.dm_noise_mask] == 0).all()), "clean conditioning DM tokens must have timestep 0")
        # Within each sample: clean conditioning first, noisy targets after. A noisy -> clean step
        # between two neighbours of the same sample breaks the layout.
        dm_lengths = (self.dm_cu_seqlens[1:] - self.dm_cu_seqlens[:-1]).cpu()
        sample = torch.repeat_interleave(torch.arange(s), dm_lengths)
        noisy = self.dm_noise_mask.cpu()
        broken = (sample[1:] == sample[:-1]) & noisy[:-1] & ~noisy[1:]
        if bool(broken.any()):
            first = int(sample[1:][broken][0])
            require(False, f"sample {first}: clean conditioning DM tokens must precede noisy targets")
        if self.ar_is_vision is not None:
            require(
                self.ar_is_vision.shape == (n_ar,),
                f"ar_is_vision has shape {tuple(self.ar_is_vision.shape)}, expected ({n_ar},)",
            )
            n_vision = int(self.ar_is_vision.sum())
            if self.vision_pixels is None:
                require(
                    self.ar_vision_embeds is not None and self.ar_vision_embeds.shape[0] == n_vision,
                    f"ar_is_vision marks {n_vision} tokens but ar_vision_embeds has "
                    f"{None if self.ar_vision_embeds is None else self.ar_vision_embeds.shape[0]} rows",
                )
        if self.vision_pixels is not None:
            require(self.ar_is_vision is not None, "vision_pixels needs ar_is_vision (the rows the ViT fills)")
            require(self.ar_vision_embeds is None, "a pack carries vision_pixels or ar_vision_embeds, not both")
            grid = self.vision_grid_thw
            require(
                grid is not None and grid.dim() == 2 and grid.shape[1] == 3,
                f"vision_grid_thw must have shape (n_pictures, 3), got {None if grid is None else tuple(grid.shape)}",
            )
            patches = int(grid.prod(-1).sum())
            require(
                self.vision_pixels.dim() == 2 and self.vision_pixels.shape[0] == patches,
                f"vision_grid_thw covers {patches} patches, vision_pixels has shape {tuple(self.vision_pixels.shape)}",
            )
            require(
                patches == 0 if n_vision == 0 else patches % n_vision == 0,
                f"vision_pixels has {patches} patches for the {n_vision} ViT tokens of ar_is_vision (not a whole "
                "number of patches per token)",
            )
        if self.ar_deepstack_embeds is not None:
            require(self.ar_is_vision is not None, "ar_deepstack_embeds needs ar_is_vision and ar_vision_embeds")
            want = (int(self.ar_is_vision.sum()), self.ar_vision_embeds.shape[1])
            shape = tuple(self.ar_deepstack_embeds.shape)
            require(
                len(shape) == 3 and shape[1:] == want,
                f"ar_deepstack_embeds has shape {shape}, expected (k, {want[0]}, {want[1]})",
            )


def _cumulative(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.long).cumsum(0)


def _validate_sample(i: int, sample: PackedSample) -> None:
    n_ar, n_dm = sample.num_ar_tokens, sample.num_dm_tokens
    if sample.ar_labels.shape != (n_ar,) or sample.ar_positions.shape != (3, n_ar):
        raise ValueError(
            f"sample {i} ({sample.task}): ar_labels {tuple(sample.ar_labels.shape)} / ar_positions "
            f"{tuple(sample.ar_positions.shape)} do not match {n_ar} AR tokens"
        )
    if n_dm and (sample.dm_positions is None or sample.dm_positions.shape != (3, n_dm)):
        raise ValueError(f"sample {i} ({sample.task}): dm_positions must have shape (3, {n_dm})")
    if n_dm and (sample.dm_noise_mask is None or sample.dm_noise_mask.shape != (n_dm,)):
        raise ValueError(f"sample {i} ({sample.task}): dm_noise_mask must have shape ({n_dm},)")
    if n_ar + n_dm == 0:
        raise ValueError(f"sample {i} ({sample.task}): a sample needs at least one token")
