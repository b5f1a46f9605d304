"""Text generation from the Reasoner (understanding, captioning): prefill once, then one token per step.

A batch of prompts — token ids, optionally followed by a picture's ViT tokens, laid out as the
``understanding`` task lays out its question (``data/sample_builder.py``) — is one pack of AR-only
samples. ``generate_text`` runs it once through the Reasoner (``MoTModel.forward_ar``), keeps every
layer's keys/values in a ``ReasonerCache``, then feeds each sequence's chosen token back, one per
step (``MoTModel.decode_ar``). A new token's (t, h, w) position is one past the largest of its
sequence so far on every axis (Qwen3-VL's rule for text after a picture, ``positions.next_start``).
Prompts may differ in length; each sequence stops on its own at an EOS id or after
``max_new_tokens``, and a finished one leaves the batch. Tokens are chosen greedily
(``temperature=0``) or drawn from softmax(logits / temperature) restricted to the top-p nucleus,
each sequence from its own seeded generator, so a sequence's tokens do not depend on its batch
(docs/DESIGN.md, "Text generation").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch

from megatron_cosmos3.data.tokenizer import Tokenizer
from megatron_cosmos3.data.vision_features import VisionFeaturizer, vision_featurizer
from megatron_cosmos3.model import positions as pos
from megatron_cosmos3.model.config import MoTConfig
from megatron_cosmos3.model.kv_cache import ReasonerCache
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.packed_batch import IGNORE_INDEX, PackedBatch, PackedSample

# Tokens of room the cache starts with past the longest prompt (it doubles when full).
_FIRST_ROOM = 256
# The most tokens one answer may take: past any answer or caption the model is trained for, short
# of a request (10**9) whose cache and decode loop would grow until the memory or the job ran out.
MAX_NEW_TOKENS = 32768
# The sampling temperatures besides 0 (greedy): below 1e-3 a draw is the argmax in effect and a tiny
# one overflows logits / temperature to inf (1e-40: every probability NaN); above 100 softmax is
# uniform over the vocabulary for the logit gaps a model has (tens), and 1e308 is noise alone.
TEMPERATURE_RANGE = (1e-3, 100.0)


@dataclass(frozen=True)
class TextSampling:
    """How tokens are chosen. ``temperature`` 0: greedy (argmax); > 0: drawn from
    softmax(logits / temperature) restricted to the smallest set of most likely tokens whose
    probability reaches ``top_p`` (the nucleus; 1 = the whole vocabulary); a temperature > 0 lies in
    ``TEMPERATURE_RANGE``. ``max_new_tokens``: 1 .. ``MAX_NEW_TOKENS``."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        tokens = self.max_new_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, Integral) or not 1 <= tokens <= MAX_NEW_TOKENS:
            raise ValueError(
                f"TextSampling.max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}] "
                f"(text_generation.MAX_NEW_TOKENS), got {tokens!r}"
            )
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"TextSampling.temperature must be a finite number >= 0, got {self.temperature!r}")
        low, high = TEMPERATURE_RANGE
        if self.temperature != 0 and not low <= self.temperature <= high:
            raise ValueError(
                f"TextSampling.temperature must be 0 (greedy) or in [{low:g}, {high:g}] "
                f"(text_generation.TEMPERATURE_RANGE), got {self.temperature!r}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"TextSampling.top_p must lie in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class TextPrompt:
    """One prompt: its token ids, then optionally a picture ((H, W, 3) uint8) whose ViT tokens follow
    them, as in an ``understanding`` sample's question."""

    token_ids: Sequence[int] | torch.Tensor
    picture: np.ndarray | None = None


@dataclass
class GeneratedText:
    """What one prompt generated: ``token_ids`` (the EOS id included when it stopped there),
    ``stopped_at_eos`` (False: it ran to ``max_new_tokens``), and ``text``, decoded without the EOS,
    when a tokenizer was given."""

    token_ids: list[int]
    stopped_at_eos: bool
    text: str | None = None


def prompt_batch(
    config: MoTConfig, prompts: Sequence[TextPrompt], vision: VisionFeaturizer | None = None
) -> PackedBatch:
    """The pack of ``prompts`` (one AR-only sample each) with Qwen3-VL positions. A picture becomes
    the ViT's input rows (the model's own ViT encodes them, ``model.vision`` set) or the weight-free
    stand-in's tokens: ``vision``, default the loader's choice for ``config`` (``vision_featurizer``)."""
    if not prompts:
        raise ValueError("prompt_batch: prompts is empty")
    placeholder = config.vision.image_token_id if config.vision is not None else 0
    featurize = vision or vision_featurizer(config)
    samples = []
    for i, prompt in enumerate(prompts):
        ids = torch.as_tensor(prompt.token_ids, dtype=torch.long).reshape(-1)
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < config.vocab_size):
            raise ValueError(
                f"prompts[{i}].token_ids must lie in [0, vocab_size={config.vocab_size}), "
                f"got ids from {int(ids.min())} to {int(ids.max())}"
            )
        picture = featurize(prompt.picture) if prompt.picture is not None else None
        n_vision = int(np.prod(picture.grid)) if picture is not None else 0
        if ids.numel() + n_vision == 0:
            raise ValueError(f"prompts[{i}] has no tokens: give token_ids or a picture")
        is_vision = torch.arange(ids.numel() + n_vision) >= ids.numel()
        ids = torch.cat([ids, torch.full((n_vision,), placeholder, dtype=torch.long)])
        labels = torch.full_like(ids, IGNORE_INDEX)  # a prompt has no next-token targets
        if picture is None:  # text only: every axis counts tokens
            samples.append(PackedSample("understanding", ids, labels, pos.text_positions(0.0, ids.numel())))
            continue
        samples.append(
            PackedSample(
                task="understanding",
                ar_token_ids=ids,
                ar_labels=labels,
                ar_positions=pos.qwen3_vl_positions(is_vision, [picture.grid]),
                ar_vision_embeds=picture.embeds,
                ar_is_vision=is_vision,
                vision_pixels=picture.pixels,
                vision_grid_thw=torch.tensor([picture.patch_grid]) if picture.pixels is not None else None,
            )
        )
    return PackedBatch.from_samples(samples)


def choose_tokens(logits: torch.Tensor, sampling: TextSampling, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of each row of ``logits`` (S, vocab): the argmax when greedy, else the token
    whose interval of the nucleus distribution's cumulative sum, most likely token first, holds
    ``uniforms`` (S,) in [0, 1) — inverse-CDF sampling, one uniform per sequence."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    if uniforms is None or uniforms.shape != logits.shape[:1]:
        got = None if uniforms is None else tuple(uniforms.shape)
        raise ValueError(f"choose_tokens: sampling needs uniforms of shape ({logits.shape[0]},), got {got}")
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    probs, order = probs.sort(dim=-1, descending=True)
    # A token is in the nucleus if the more likely tokens before it hold less than top_p; the most
    # likely is always in (top_p -> 0 is greedy).
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(before >= sampling.top_p, 0.0)
    cdf = probs.cumsum(dim=-1)
    target = uniforms.to(cdf)[:, None] * cdf[:, -1:]
    kept = (probs > 0).sum(dim=-1, keepdim=True) - 1
    rank = torch.searchsorted(cdf, target, right=True).clamp(max=kept)
    return order.gather(-1, rank).squeeze(-1)


def _seeds(seeds: int | Sequence[int], count: int) -> list[int]:
    if isinstance(seeds, Integral):
        return [int(seeds) + i for i in range(count)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != count:
        raise ValueError(f"generate_text: seeds has {len(seeds)} entries for {count} prompts (one per prompt)")
    return seeds


def _eos_ids(eos_ids: int | Iterable[int] | None, tokenizer: Tokenizer | None, vocab_size: int) -> torch.Tensor:
    if eos_ids is None:
        if tokenizer is None:
            raise ValueError("generate_text: eos_ids is None and no tokenizer gives one (pass eos_ids=() for none)")
        eos_ids = tokenizer.eos_id
    ids = [eos_ids] if isinstance(eos_ids, Integral) else list(eos_ids)
    bad = [i for i in ids if not (isinstance(i, Integral) and 0 <= i < vocab_size)]
    if bad:
        raise ValueError(f"generate_text: eos_ids must be token ids in [0, {vocab_size}), got {bad}")
    return torch.tensor([int(i) for i in ids], dtype=torch.long)


@torch.no_grad()
def generate_text(
    model: MoTModel,
    prompts: PackedBatch | Sequence[TextPrompt],
    sampling: TextSampling = TextSampling(),
    eos_ids: int | Iterable[int] | None = None,
    seeds: int | Sequence[int] = 0,
    tokenizer: Tokenizer | None = None,
) -> list[GeneratedText]:
    """Generates text after each prompt, one ``GeneratedText`` per prompt, in order.

    prompts: ``TextPrompt``s (laid out by ``prompt_batch``), or a pack of AR-only samples, e.g.
        ``conversion.understanding_batch`` of a Qwen3-VL processor's output.
    eos_ids: the id(s) that end a sequence; None: the tokenizer's ``eos_id``; () for none.
    seeds: per prompt, the seed of its own generator (sampling only); an int s seeds prompt i with s + i.
    tokenizer: when given, each result's ``text`` is its tokens decoded.
    Logits holding NaN or Inf (a diverged model) are a ValueError naming the prompt, never a token.
    """
    config = model.config
    batch = prompts if isinstance(prompts, PackedBatch) else prompt_batch(config, prompts)
    if batch.num_dm_tokens:
        raise ValueError(f"generate_text: prompts are AR-only, but the pack holds {batch.num_dm_tokens} DM tokens")
    if min((batch.ar_cu_seqlens[1:] - batch.ar_cu_seqlens[:-1]).tolist()) == 0:
        raise ValueError("generate_text: every prompt needs at least one AR token")
    count = batch.num_samples
    generators = [torch.Generator().manual_seed(s) for s in _seeds(seeds, count)]
    eos = _eos_ids(eos_ids, tokenizer, config.vocab_size)
    device = model.embed_tokens.weight.device

    prefill = model.forward_ar(batch.to(device))
    last_rows = prefill.layout.ar_cu_seqlens[1:] - 1
    logits = model.lm_logits(prefill.hidden.index_select(0, last_rows))
    # The cache grows as tokens come (doubling), up to the longest prompt + max_new_tokens - 1: a
    # large max_new_tokens costs nothing until the tokens exist.
    full = max(prefill.layout.ar_lengths) + sampling.max_new_tokens - 1
    cache = ReasonerCache.from_prefill(
        prefill.keys_values, prefill.layout, min(full, max(prefill.layout.ar_lengths) + _FIRST_ROOM)
    )
    # Each sequence's next position: one past its largest so far, the same on all three axes.
    sample = prefill.layout.sample_ids("ar")
    next_position = (
        torch.full((count,), float("-inf"), device=device).scatter_reduce(
            0, sample, batch.ar_positions.to(device).amax(dim=0), "amax"
        )
        + 1
    )

    tokens: list[list[int]] = [[] for _ in range(count)]
    stopped = [False] * count
    active = torch.arange(count, device=device)  # the sequences still generating, in cache order
    for step in range(sampling.max_new_tokens):
        broken = ~torch.isfinite(logits).all(dim=-1)
        if bool(broken.any()):  # argmax of NaN picks a token as if it meant one; sampling raised in torch
            first = int(active[broken.nonzero()[0, 0]])
            raise ValueError(
                f"generate_text: prompt {first}'s logits for new token {step} hold NaN or Inf "
                "(a diverged or broken model); no text is returned"
            )
        uniforms = None
        if not sampling.greedy:
            uniforms = torch.stack([torch.rand((), generator=generators[i]) for i in active.tolist()])
        chosen = choose_tokens(logits.float(), sampling, uniforms.to(device) if uniforms is not None else None)
        finished = torch.isin(chosen, eos.to(device))
        for i, token, done in zip(active.tolist(), chosen.tolist(), finished.tolist()):
            tokens[i].append(token)
            stopped[i] = done
        if step == sampling.max_new_tokens - 1 or bool(finished.all()):
            break
        if bool(finished.any()):
            going = (~finished).nonzero().squeeze(1)
            cache, chosen, active = cache.keep(going), chosen[going], active[going]
        if not cache.has_room():
            cache = cache.grown(min(full, 2 * cache.capacity))
        step_positions = (next_position[active] + step).expand(3, -1)
        logits = model.lm_logits(model.decode_ar(chosen, step_positions, cache))

    return [
        GeneratedText(
            ids,
            done,
            tokenizer.decode(ids[:-1] if done else ids) if tokenizer is not None else None,
        )
        for ids, done in zip(tokens, stopped)
    ]
