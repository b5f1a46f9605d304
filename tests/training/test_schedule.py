import pytest

from megatron_cosmos3.training.schedule import learning_rate


def test_warmup_then_cosine_reaches_min_lr_at_the_end():
    lrs = [learning_rate(s, 100, 1.0, 0.1, 10) for s in range(100)]
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert learning_rate(100, 100, 1.0, 0.1, 10) == pytest.approx(0.1)


def test_wsd_is_stable_then_decays_linearly_over_the_last_fraction():
    lrs = [learning_rate(s, 100, 1.0, 0.0, 5, "wsd", 0.2) for s in range(100)]
    assert lrs[5:80] == pytest.approx([1.0] * 75)
    assert lrs[80] == pytest.approx(0.95) and lrs[99] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule='linear'"):
        learning_rate(50, 100, 1.0, 0.0, 5, "linear")
