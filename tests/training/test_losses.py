"""The objectives: flow matching counts only noisy targets; CE only labelled AR positions."""

import re

import pytest
import torch

from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.objectives.flow_matching import (
    FlowMatchingConfig,
    add_flow_matching_noise,
    sample_timesteps,
    shift_timesteps,
)
from megatron_cosmos3.objectives.losses import flow_matching_per_token, mot_losses

TASKS_WITH_CONDITIONING = ("image_to_video", "video_to_audio", "forward_dynamics", "policy")


def test_flow_matching_gives_clean_conditioning_targets_exactly_zero_gradient(tiny_config, generator):
    batch = random_pack(tiny_config, generator, num_samples=6, tasks=TASKS_WITH_CONDITIONING)
    assert (~batch.dm_noise_mask).any() and batch.dm_noise_mask.any()
    predictions = {k: torch.randn(v.shape, generator=generator) for k, v in batch.dm_tokens.items()}
    targets = {k: torch.randn(v.shape, generator=generator).requires_grad_() for k, v in batch.dm_tokens.items()}
    losses, rows = flow_matching_per_token(predictions, targets, batch)
    losses.sum().backward()
    for key, index in batch.dm_token_index.items():
        clean = ~batch.dm_noise_mask[index]
        assert torch.equal(targets[key].grad[clean], torch.zeros_like(targets[key].grad[clean]))
        assert (targets[key].grad[~clean].abs().sum(-1) > 0).all()
    assert torch.equal(rows.sort().values, batch.dm_noise_mask.nonzero().squeeze(1))


def test_flow_matching_loss_equals_a_recomputation_over_noisy_tokens_only(tiny_config, generator):
    batch = random_pack(tiny_config, generator, num_samples=5, tasks=TASKS_WITH_CONDITIONING)
    predictions = {k: torch.randn(v.shape, generator=generator) for k, v in batch.dm_tokens.items()}
    targets = {k: torch.randn(v.shape, generator=generator) for k, v in batch.dm_tokens.items()}
    losses, rows = flow_matching_per_token(predictions, targets, batch)
    expected = {}
    for key, index in batch.dm_token_index.items():
        for j, row in enumerate(index.tolist()):
            if batch.dm_noise_mask[row]:
                expected[row] = float(((predictions[key][j] - targets[key][j]) ** 2).mean())
    assert dict(zip(rows.tolist(), losses.tolist())) == pytest.approx(expected)


def test_noising_keeps_clean_tokens_clean_and_follows_the_interpolation(tiny_config, generator):
    batch = random_pack(tiny_config, generator, num_samples=6, tasks=TASKS_WITH_CONDITIONING)
    noised, targets = add_flow_matching_noise(batch, FlowMatchingConfig(), generator)
    noised.validate()
    for key, x0 in batch.dm_tokens.items():
        index = batch.dm_token_index[key]
        t = noised.dm_timesteps[index][:, None]
        clean = ~batch.dm_noise_mask[index]
        assert torch.equal(noised.dm_tokens[key][clean], x0[clean])
        assert (t[clean] == 0).all() and (t[~clean] > 0).all()
        eps = targets[key] + x0
        torch.testing.assert_close(noised.dm_tokens[key], (1 - t) * x0 + t * eps)
    # One timestep per sample for its noisy targets.
    for s in range(batch.num_samples):
        rows = slice(int(batch.dm_cu_seqlens[s]), int(batch.dm_cu_seqlens[s + 1]))
        assert noised.dm_timesteps[rows][batch.dm_noise_mask[rows]].unique().numel() <= 1


def test_logit_normal_timesteps_and_shift():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, FlowMatchingConfig(), g)
    assert 0 < float(t.min()) and float(t.max()) < 1
    assert float(t.median()) == pytest.approx(0.5, abs=0.02)  # logit-normal(0, 1) is symmetric
    shifted = sample_timesteps(20000, FlowMatchingConfig(shift=3.0), torch.Generator().manual_seed(0))
    assert torch.allclose(shifted, shift_timesteps(t, 3.0))
    assert float(shifted.median()) == pytest.approx(0.75, abs=0.02)  # 3 * 0.5 / (1 + 2 * 0.5)
    with pytest.raises(ValueError, match=r"flow_matching.shift=0.0 must be > 0"):
        FlowMatchingConfig(shift=0.0)


def test_the_shift_check_holds_inside_a_meta_device_context():
    """A model is built under ``with torch.device("meta")`` with its config loaded there (as the
    DeepSpeed tests and users do): the check's own tensors stay on the CPU (meta has no nonzero)."""
    with torch.device("meta"):
        assert FlowMatchingConfig(shift=3.0).shift == 3.0
        with pytest.raises(ValueError, match=r"flow_matching.shift=1e\+300"):
            FlowMatchingConfig(shift=1e300)


@pytest.mark.parametrize("shift, drawn", [(1e10, 1.0), (1e300, float("nan")), (1e-300, 0.0)])
def test_a_shift_that_makes_every_training_timestep_one_value_is_refused_by_name(shift, drawn):
    """Generation refuses a shift whose steps coincide in float32 (solvers.standing_step); training's
    had no bound: 1e10 drew 1.0 (pure noise) for nearly every sample, 1e300 NaN, 1e-300 0.0."""
    from megatron_cosmos3.training.config import load_config

    unchecked = FlowMatchingConfig()
    unchecked.shift = shift  # what training drew with it, before the check
    t = sample_timesteps(1000, unchecked, torch.Generator().manual_seed(0))
    assert (t.isnan() if drawn != drawn else t == drawn).float().mean() > 0.9
    with pytest.raises(ValueError, match=re.escape(f"flow_matching.shift={shift!r}: the timesteps drawn at")):
        load_config(overrides=[f"flow_matching.shift={shift!r}"])
    # Controls: a large shift that still spreads the draws, and the same spread unshifted.
    load_config(overrides=["flow_matching.shift=1e6"])
    load_config(overrides=["flow_matching.logit_normal_std=1e-6"])


@pytest.mark.parametrize(
    "field, value, drawn",
    [
        ("logit_normal_mean", 1e6, {1.0}),
        ("logit_normal_mean", -1e6, {0.0}),
        ("logit_normal_mean", 20.0, {1.0}),
        ("logit_normal_std", 1e6, {0.0, 1.0}),
        ("logit_normal_std", 1e-9, {0.5}),
    ],
)
def test_a_logit_normal_that_makes_the_training_timesteps_one_value_is_refused_by_name(tmp_path, field, value, drawn):
    """``flow_matching.logit_normal_mean``/``logit_normal_std`` had no bound but std > 0: a mean of
    1e6 drew 1.0 (pure noise) for every sample, a std of 1e6 0.0 or 1.0. The shift's rule now holds
    for them too: the timesteps drawn from mean - 2 std to mean + 2 std stay apart in float32."""
    from megatron_cosmos3.training.config import load_config

    unchecked = FlowMatchingConfig()
    setattr(unchecked, field, value)  # what training drew with it, before the check
    t = sample_timesteps(1000, unchecked, torch.Generator().manual_seed(0))
    assert sum(float((t == v).float().mean()) for v in drawn) > 0.9
    (tmp_path / "fm.yaml").write_text(f"flow_matching:\n  {field}: {value!r}\n")
    with pytest.raises(ValueError, match=re.escape(f"flow_matching.{field}={value!r}: the timesteps drawn at")):
        load_config(str(tmp_path / "fm.yaml"))
    # Controls: the same field a few units from the default, and a wide and a narrow std, load.
    for control in (
        "logit_normal_mean=-1.5",
        "logit_normal_mean=3.0",
        "logit_normal_std=10.0",
        "logit_normal_std=1e-6",
    ):
        load_config(overrides=[f"flow_matching.{control}"])


@pytest.mark.parametrize(
    "field, value",
    [("logit_normal_std", 0.0), ("logit_normal_std", -1.0), ("logit_normal_std", float("nan"))]
    + [(field, value) for field in ("logit_normal_mean", "logit_normal_std") for value in (float("inf"), float("-inf"))]
    + [("logit_normal_mean", float("nan"))],
)
def test_a_logit_normal_std_not_above_0_or_a_non_finite_mean_is_refused_by_name(field, value):
    """Built directly (a library caller: no config load's finite check first): a NaN std passed
    ``std <= 0``, and a NaN or infinite mean drew NaN or one value for every sample."""
    with pytest.raises(ValueError, match=rf"^flow_matching\.{field}={re.escape(repr(value))}"):
        FlowMatchingConfig(**{field: value})


def test_per_task_losses_add_up_to_the_totals(tiny_config, generator):
    batch = random_pack(tiny_config, generator, num_samples=8)
    batch, targets = add_flow_matching_noise(batch, FlowMatchingConfig(), generator)
    losses = mot_losses(MoTModel(tiny_config), batch, targets)
    for kind in ("ce", "fm"):
        total = sum(float(parts[f"{kind}_sum"]) for parts in losses.per_task.values())
        count = sum(int(parts[f"{kind}_count"]) for parts in losses.per_task.values())
        assert total == pytest.approx(float(getattr(losses, f"{kind}_sum")), rel=1e-5)
        assert count == int(getattr(losses, f"{kind}_count"))
    expected = float(losses.ce_sum / losses.ce_count + losses.fm_sum / losses.fm_count)
    assert float(losses.total.detach()) == pytest.approx(expected, rel=1e-5)
    assert {f"{t}/fm" for t, parts in losses.per_task.items() if parts["fm_count"]} >= {
        f"{t}/fm" for t in batch.task_names if t != "understanding"
    }
