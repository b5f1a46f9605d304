"""Position rules: Qwen3-VL's interleaved MRoPE for AR tokens, the FPS rule for DM tokens."""

from fractions import Fraction

import pytest
import torch

from megatron_cosmos3.data.media_writers import exact_rate
from megatron_cosmos3.model import positions as pos
from megatron_cosmos3.model.config import TPS_BASE, MoTConfig, qwen3_vl_mrope_section
from megatron_cosmos3.model.rope import MultimodalRotaryEmbedding


@pytest.mark.parametrize(
    "head_dim, section",
    [
        (128, [24, 20, 20]),
        (16, [4, 2, 2]),
        (64, [16, 8, 8]),
        (24, [6, 3, 3]),
        (80, [16, 12, 12]),
        # Splits transformers runs that are not ours as written: its default [24, 20, 20] at small
        # head_dims (h and w cut at head_dim/2), a t entry it never reads.
        (16, [24, 20, 20]),
        (24, [24, 20, 20]),
        (16, [2, 3, 3]),
        (16, [1, 2, 2]),
    ],
)
def test_mrope_matches_transformers_qwen3_vl(head_dim, section):
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    hf_config = Qwen3VLTextConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": 5e5, "mrope_section": section},
    )
    reference = Qwen3VLTextRotaryEmbedding(hf_config)
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 4000, (3, 1, 50), generator=g)
    want_cos, want_sin = reference(torch.zeros(1, dtype=torch.float32), positions)
    split = qwen3_vl_mrope_section(section, head_dim)
    assert MoTConfig(head_dim=head_dim, mrope_section=split).rope_sections == split  # a valid config
    ours = MultimodalRotaryEmbedding(head_dim, 5e5, split)
    cos, sin = ours(positions[:, 0].float())
    torch.testing.assert_close(cos, want_cos[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin, want_sin[0], rtol=1e-6, atol=1e-6)


def test_text_and_vision_positions_follow_qwen3_vl():
    text = pos.text_positions(0, 3)
    assert text.tolist() == [[0, 1, 2]] * 3
    grid = pos.vision_grid_positions(pos.next_start(text), 1, 2, 3)
    assert grid[0].tolist() == [3] * 6  # one image: a single temporal position
    assert grid[1].tolist() == [3, 3, 3, 4, 4, 4]
    assert grid[2].tolist() == [3, 4, 5, 3, 4, 5]
    assert pos.next_start(grid) == 6  # text after the image continues at max + 1


def temporal_position_at(positions_t: torch.Tensor, tokens_per_second: float, time_s: float) -> float:
    """Interpolates a stream's temporal positions at an instant (token i sits at time i / TPS)."""
    token = time_s * tokens_per_second
    lower = int(token)
    frac = token - lower
    return float(positions_t[lower] * (1 - frac) + positions_t[lower + 1] * frac) if frac else float(positions_t[lower])


@pytest.mark.parametrize("fps", [16, 24, 30])
def test_event_at_1_2_s_sits_at_offset_plus_7_2_in_video_at_any_frame_rate(fps):
    offset = 17.0
    tps = pos.video_tokens_per_second(fps)
    grid_t = 12
    video = pos.dm_video_positions(offset, grid_t, 2, 3, fps)
    frame_t = video[0].view(grid_t, 6)[:, 0]  # temporal position of each latent frame
    assert temporal_position_at(frame_t, tps, 1.2) == pytest.approx(offset + 7.2, abs=1e-5)
    # Spatial axes start at the offset like a Qwen3-VL image grid.
    assert video[1].view(grid_t, 2, 3)[0, :, 0].tolist() == [offset, offset + 1]
    assert video[2].view(grid_t, 2, 3)[0, 0, :].tolist() == [offset, offset + 1, offset + 2]
    # One second spans TPS_BASE units whatever the frame rate.
    assert float(frame_t[1] - frame_t[0]) * tps == pytest.approx(TPS_BASE)


def test_event_at_1_2_s_sits_at_offset_plus_7_2_in_25hz_audio_and_in_actions():
    offset = 9.0
    audio = pos.dm_sequence_positions(offset, 50, pos.AUDIO_TOKENS_PER_SECOND)
    assert float(audio[0, 30]) == pytest.approx(offset + 7.2)  # token 30 of 25 Hz audio is t = 1.2 s
    assert torch.equal(audio[0], audio[1]) and torch.equal(audio[0], audio[2])
    for rate in (10.0, 15.0, 30.0):
        actions = pos.dm_sequence_positions(offset, 40, rate)
        assert temporal_position_at(actions[0], rate, 1.2) == pytest.approx(offset + 7.2, abs=1e-5)


def test_split_clip_keeps_its_times():
    """The noisy frames of image-to-video continue the clip's clock after the clean first frame."""
    whole = pos.dm_video_positions(5.0, 4, 1, 2, fps=24)
    first = pos.dm_video_positions(5.0, 1, 1, 2, fps=24)
    rest = pos.dm_video_positions(5.0, 3, 1, 2, fps=24, first_frame=1)
    assert torch.equal(torch.cat([first, rest], dim=1), whole)


def test_invalid_rates_are_clear_errors():
    with pytest.raises(ValueError, match="fps must be > 0"):
        pos.video_tokens_per_second(0)
    with pytest.raises(ValueError, match="tokens_per_second must be > 0"):
        pos.dm_sequence_positions(0.0, 3, -1.0)


@pytest.mark.parametrize("fps", [60.0, 120.0, 29.97, 12.5, 7.0, 30.0])
def test_a_clips_frame_rate_reads_back_exactly_from_its_positions_after_any_prompt(fps):
    """Generated samples take their frame rate from the pack's positions: exact for any rate of up
    to three decimals and any prompt length, where 24 / (t1 - t0) of float32 positions is not."""
    naive_misses = 0
    for offset in (0.0, 17.0, 133.0, 300.0, 509.0):
        for frames in (2, 5):
            times = pos.dm_video_positions(offset, frames, 2, 3, fps)[0].unique()
            assert pos.video_fps_from_times(times) == fps, (offset, frames)
            naive_misses += round(4 * TPS_BASE / float(times[1] - times[0]), 3) != fps
    if fps >= 60:  # the control: the step alone loses the rate after a long enough prompt
        assert naive_misses > 0
    assert pos.video_fps_from_times(pos.dm_video_positions(40.0, 1, 2, 2, fps)[0].unique()) is None


@pytest.mark.parametrize("n", [8, 12, 15, 24, 30, 48, 60, 120, 240])
def test_an_ntsc_clips_frame_rate_reads_back_as_its_fraction(n):
    """A clip at n * 1000 / 1001 fps (the float the data path reads a 24000/1001 file as) reads back
    as that float, so it is written as n*1000/1001, not 2997/125 (23.976, its three-decimal rounding,
    1 ppm off); except where its float32 positions are bit for bit those of a rate of up to two
    decimals (29.97 beside 30000/1001, few latent frames after a long prompt), which is returned, as
    the pinned rates above need. 24000/1001 is never such a tie here."""
    fps = n * 1000 / 1001
    exact = 0
    for offset in (0.0, 17.0, 50.0, 133.0, 300.0, 509.0, 2000.0):
        for frames in (2, 3, 5, 9, 17):
            times = pos.dm_video_positions(offset, frames, 2, 3, fps)[0].unique()
            got = pos.video_fps_from_times(times)
            if got == fps:
                assert exact_rate(got) == Fraction(n * 1000, 1001)
                exact += 1
            else:  # a tie: the positions cannot tell them apart
                assert round(got, 2) == got and offset > 0 and n != 24, (offset, frames, got)
                assert torch.equal(pos.dm_video_positions(offset, frames, 2, 3, got)[0].unique(), times)
    assert exact >= 5 * 2  # every clip at offset 0, and more
