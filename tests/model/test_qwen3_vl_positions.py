"""Qwen3-VL's AR position rule (get_rope_index) on explicit token kinds and grids."""

import pytest
import torch

from megatron_cosmos3.model.positions import qwen3_vl_positions, token_runs


def test_text_image_and_video_frames_follow_get_rope_index():
    # 2 text, an image of 2x3 merged tokens, 1 text, a 2x2 video frame, 1 text, another frame.
    kinds = torch.tensor([0, 0] + [1] * 6 + [0] + [2] * 4 + [0] + [2] * 4)
    positions = qwen3_vl_positions(kinds, [(1, 2, 3), (1, 2, 2), (1, 2, 2)])
    t, h, w = positions.tolist()
    assert t == [0, 1] + [2] * 6 + [5] + [6] * 4 + [8] + [9] * 4
    assert h == [0, 1] + [2, 2, 2, 3, 3, 3] + [5] + [6, 6, 7, 7] + [8] + [9, 9, 10, 10]
    assert w == [0, 1] + [2, 3, 4, 2, 3, 4] + [5] + [6, 7, 6, 7] + [8] + [9, 10, 9, 10]


def test_adjacent_image_and_video_runs_are_separate_grids():
    assert token_runs(torch.tensor([0, 1, 1, 2, 2, 0])) == [(0, 0, 1), (1, 1, 3), (2, 3, 5), (0, 5, 6)]
    assert qwen3_vl_positions(torch.tensor([1, 1, 2, 2]), [(1, 1, 2), (1, 2, 1)])[0].tolist() == [0, 0, 2, 2]


@pytest.mark.parametrize(
    "grids, message",
    [
        ([(1, 2, 2)], "has 6 tokens but its grid"),
        ([], "has no grid left"),
        ([(1, 2, 3), (1, 1, 1)], "2 grids given but fewer ViT runs"),
    ],
)
def test_grids_that_do_not_fit_the_tokens_are_clear_errors(grids, message):
    with pytest.raises(ValueError, match=message):
        qwen3_vl_positions(torch.tensor([0] + [1] * 6 + [0]), grids)
