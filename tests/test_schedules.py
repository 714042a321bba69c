import math

import pytest
import torch

from atmerge.core.schedules import batch_adaptive_r, count_above, layer_threshold, threshold_schedule


def test_layer_threshold_hand_values():
    # alpha=0.99, beta=0.04, theta_min=0.88 (Table A2, DeiT-S)
    assert layer_threshold(1, 0.99, 0.04, 0.88) == pytest.approx(0.99)
    assert layer_threshold(2, 0.99, 0.04, 0.88) == pytest.approx(0.99 - (math.exp(0.04) - 1))  # 0.949189
    assert layer_threshold(3, 0.99, 0.04, 0.88) == pytest.approx(0.906713, abs=1e-6)
    assert layer_threshold(4, 0.99, 0.04, 0.88) == pytest.approx(0.88)  # 0.8625 clipped to theta_min


def test_threshold_schedule_is_non_increasing_and_bounded():
    th = threshold_schedule(12, 1.0, 0.03, 0.855)
    assert len(th) == 12 and th[0] == 1.0
    assert all(a >= b for a, b in zip(th, th[1:]))
    assert min(th) == pytest.approx(0.855)


def test_layer_counted_from_one():
    with pytest.raises(ValueError, match="from 1"):
        layer_threshold(0, 0.99, 0.04, 0.88)


def test_count_above_is_strict():
    scores = torch.tensor([[0.9, 0.8, 0.95], [0.8, 0.2, 0.3]])
    assert count_above(scores, 0.8).tolist() == [2, 0]


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([[0.9, 0.5, 0.95], [0.1, 0.2, 0.3]], 1),  # counts 2, 0 -> mean 1
        ([[0.9, 0.5, 0.3], [0.9, 0.95, 0.3]], 2),  # counts 1, 2 -> mean 1.5 -> rounded half up
        ([[0.1, 0.5, 0.3], [0.9, 0.1, 0.3]], 1),  # counts 0, 1 -> 0.5 -> 1
        ([[0.9, 0.5, 0.3], [0.9, 0.1, 0.3], [0.1, 0.1, 0.1]], 1),  # 2/3 -> 1
        ([[0.9, 0.5, 0.3], [0.1, 0.1, 0.1], [0.1, 0.1, 0.1]], 0),  # 1/3 -> 0
    ],
)
def test_batch_adaptive_r_is_rounded_batch_mean(rows, expected):
    assert batch_adaptive_r(torch.tensor(rows), 0.8) == expected


def test_batch_adaptive_r_of_one_image_is_its_count():
    scores = torch.rand(1, 40)
    assert batch_adaptive_r(scores, 0.5) == int((scores > 0.5).sum())


def test_batch_adaptive_r_empty_set_a():
    assert batch_adaptive_r(torch.zeros(3, 0), 0.5) == 0
