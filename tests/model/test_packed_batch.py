"""The packed batch validates its layout and names the offending field."""

import pytest
import torch

from megatron_cosmos3.data.synthetic_packs import TASKS, random_pack
from megatron_cosmos3.model.attention import PackLayout
from megatron_cosmos3.model.packed_batch import IGNORE_INDEX


@pytest.mark.parametrize("seed", range(8))
def test_random_packs_satisfy_the_layout_invariants(tiny_config, seed):
    g = torch.Generator().manual_seed(seed)
    batch = random_pack(tiny_config, g, num_samples=1 + seed)
    batch.validate()
    for s in range(batch.num_samples):
        ar = slice(int(batch.ar_cu_seqlens[s]), int(batch.ar_cu_seqlens[s + 1]))
        dm = slice(int(batch.dm_cu_seqlens[s]), int(batch.dm_cu_seqlens[s + 1]))
        if dm.stop > dm.start:
            # [..., EOS, BOG | DM]: the AR section closes with the delimiters and DM time starts after it.
            assert batch.ar_token_ids[ar][-2:].tolist() == [tiny_config.vocab_size - 2, tiny_config.vocab_size - 1]
            assert float(batch.dm_positions[:, dm].min()) >= float(batch.ar_positions[:, ar].max()) + 1
        labels = batch.ar_labels[ar]
        assert labels[-1] == IGNORE_INDEX  # never a target across the sample boundary
    assert set(batch.task_names) <= set(TASKS)


def test_kv_gather_index_lays_out_each_samples_ar_then_dm_keys():
    layout = PackLayout.from_cu_seqlens(torch.tensor([0, 2, 2, 5]), torch.tensor([0, 1, 4, 4]))
    # AR stream rows 0..4, DM stream rows 5..8 in cat(AR, DM).
    assert layout.kv_gather_index.tolist() == [0, 1, 5, 6, 7, 8, 2, 3, 4]
    assert layout.kv_cu_seqlens.tolist() == [0, 3, 6, 9]


def test_noisy_before_clean_is_rejected(tiny_config, generator):
    batch = random_pack(tiny_config, generator, num_samples=3, tasks=("image_to_video",))
    mask = batch.dm_noise_mask.clone()
    first = int(batch.dm_cu_seqlens[1])
    mask[first], mask[first + 1 : int(batch.dm_cu_seqlens[2])] = True, False
    with pytest.raises(ValueError, match="sample 1: clean conditioning DM tokens must precede noisy targets"):
        batch.replace(dm_noise_mask=mask, dm_timesteps=torch.zeros_like(batch.dm_timesteps)).validate()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b.replace(ar_labels=b.ar_labels[:-1]), "ar_labels has shape"),
        (lambda b: b.replace(dm_cu_seqlens=b.dm_cu_seqlens + 1), "dm_cu_seqlens must run from 0"),
        (
            lambda b: b.replace(dm_timesteps=torch.ones_like(b.dm_timesteps)),
            "clean conditioning DM tokens must have timestep 0",
        ),
        (lambda b: b.replace(dm_tokens={k: v * float("nan") for k, v in b.dm_tokens.items()}), "holds NaN or inf"),
        (
            lambda b: b.replace(dm_token_index={k: v[:-1] for k, v in b.dm_token_index.items()}),
            r"dm_tokens\[.*\] has shape",
        ),
    ],
)
def test_malformed_batches_name_the_field(tiny_config, generator, change, message):
    batch = random_pack(tiny_config, generator, num_samples=3, tasks=("image_to_video",))
    with pytest.raises(ValueError, match=message):
        change(batch).validate()
