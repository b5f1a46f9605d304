"""The reasoner is blind to DM tokens, and no token ever attends across samples — on every backend."""

import pytest
import torch

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.objectives.losses import cross_entropy_per_token

BACKENDS = ["dense", "sdpa"] + (["flash"] if torch.cuda.is_available() else [])


def model_with_backend(config, backend):
    torch.manual_seed(0)
    config.attention_backend = backend
    model = MoTModel(config)
    return model.cuda() if backend == "flash" else model


def noised_pack(config, seed, num_samples=6):
    g = torch.Generator().manual_seed(seed)
    batch = random_pack(config, g, num_samples=num_samples)
    return add_flow_matching_noise(batch, FlowMatchingConfig(), g)


def ar_outputs(model, batch):
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=model.config.attention_backend == "flash"):
        device = next(model.parameters()).device
        batch = batch.to(device)
        output = model(batch)
        ce, _ = cross_entropy_per_token(output, batch)
    return output.ar_hidden.cpu(), ce.cpu()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", ["latents", "timesteps", "noise_mask", "everything"])
def test_changing_dm_inputs_changes_no_ar_output_bit_for_bit(tiny_config, backend, change):
    model = model_with_backend(tiny_config, backend)
    batch, _ = noised_pack(tiny_config, seed=3)
    g = torch.Generator().manual_seed(99)
    changed = batch
    if change in ("latents", "everything"):
        changed = changed.replace(
            dm_tokens={k: torch.randn(v.shape, generator=g) * 100 for k, v in batch.dm_tokens.items()}
        )
    if change in ("noise_mask", "everything"):
        # Every DM token becomes a noisy target (a valid layout: no clean prefix at all).
        changed = changed.replace(dm_noise_mask=torch.ones_like(batch.dm_noise_mask))
    if change in ("timesteps", "noise_mask", "everything"):
        t = torch.rand(batch.num_dm_tokens, generator=g)
        changed = changed.replace(dm_timesteps=torch.where(changed.dm_noise_mask, t, torch.zeros(())))
    changed.validate()
    hidden, ce = ar_outputs(model, batch)
    changed_hidden, changed_ce = ar_outputs(model, changed)
    assert torch.equal(hidden, changed_hidden)
    assert torch.equal(ce, changed_ce)
    # The control: the DM side did see the change, so the comparison above is not vacuous.
    with torch.no_grad():
        device = next(model.parameters()).device
        assert not torch.equal(model(batch.to(device)).dm_hidden, model(changed.to(device)).dm_hidden)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("perturbed", [0, 2, 5])
def test_perturbing_one_sample_changes_no_other_sample(tiny_config, backend, perturbed):
    model = model_with_backend(tiny_config, backend)
    batch, _ = noised_pack(tiny_config, seed=11)
    g = torch.Generator().manual_seed(5)
    ar_rows = slice(int(batch.ar_cu_seqlens[perturbed]), int(batch.ar_cu_seqlens[perturbed + 1]))
    dm_rows = slice(int(batch.dm_cu_seqlens[perturbed]), int(batch.dm_cu_seqlens[perturbed + 1]))
    ids = batch.ar_token_ids.clone()
    ids[ar_rows] = torch.randint(0, tiny_config.vocab_size, ids[ar_rows].shape, generator=g)
    tokens = {}
    for key, values in batch.dm_tokens.items():
        in_sample = (batch.dm_token_index[key] >= dm_rows.start) & (batch.dm_token_index[key] < dm_rows.stop)
        tokens[key] = torch.where(in_sample[:, None], torch.randn(values.shape, generator=g), values)
    changed = batch.replace(ar_token_ids=ids, dm_tokens=tokens)
    device = next(model.parameters()).device
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=backend == "flash"):
        before, after = model(batch.to(device)), model(changed.to(device))
    keep_ar = torch.ones(batch.num_ar_tokens, dtype=torch.bool)
    keep_ar[ar_rows] = False
    keep_dm = torch.ones(batch.num_dm_tokens, dtype=torch.bool)
    keep_dm[dm_rows] = False
    assert torch.equal(before.ar_hidden.cpu()[keep_ar], after.ar_hidden.cpu()[keep_ar])
    assert torch.equal(before.dm_hidden.cpu()[keep_dm], after.dm_hidden.cpu()[keep_dm])
    perturbed_rows = torch.cat(
        [
            before.ar_hidden.cpu()[~keep_ar] - after.ar_hidden.cpu()[~keep_ar],
            before.dm_hidden.cpu()[~keep_dm] - after.dm_hidden.cpu()[~keep_dm],
        ]
    )
    assert perturbed_rows.abs().max() > 0  # the perturbed sample itself did change


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tasks", [("understanding",), ("text_to_video",)], ids=["no_dm_at_all", "dm_heavy"])
def test_packs_with_an_empty_stream_run_forward_and_backward(tiny_config, backend, tasks):
    from megatron_cosmos3.data.synthetic_packs import random_pack
    from megatron_cosmos3.objectives.losses import mot_losses

    model = model_with_backend(tiny_config, backend)
    g = torch.Generator().manual_seed(0)
    batch, targets = add_flow_matching_noise(
        random_pack(tiny_config, g, num_samples=3, tasks=tasks), FlowMatchingConfig(), g
    )
    device = next(model.parameters()).device
    losses = mot_losses(model, batch.to(device), {k: v.to(device) for k, v in targets.items()})
    losses.total.backward()
    assert torch.isfinite(losses.total)
