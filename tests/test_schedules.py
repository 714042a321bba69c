import math

import pytest
import torch

from atmerge.core.schedules import batch_adaptive_r, count_above, layer_threshold, threshold_schedule, tome_r_schedule


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


def test_tome_r_schedules_written_out_by_hand():
    """The schedules that tests hand to the references, as literal numbers worked out by hand
    (so that a reference given a schedule is checked against these, not against the library).
    (r, inflection): from r(1 − inflection) in block 1 to 2r − that in the last block, in equal
    steps, each rounded down."""
    assert tome_r_schedule(4, 5) == [5, 5, 5, 5]
    assert tome_r_schedule(4, [1, 2]) == [1, 2, 0, 0]
    assert tome_r_schedule(4, (4, 0.5)) == [2, 3, 4, 6]  # 2, 3.33, 4.67, 6
    assert tome_r_schedule(4, (4, -0.5)) == [6, 4, 3, 2]  # 6, 4.67, 3.33, 2
    assert tome_r_schedule(4, (3, 1.0)) == [0, 2, 4, 6]  # 0 to 6 in steps of 2
    assert tome_r_schedule(6, (6, 0.5)) == [3, 4, 5, 6, 7, 9]  # 3 to 9 in steps of 1.2 (test_reference_baselines)
    # 2 to 6 in steps of 4/11 (test_methods' ToMe reference): 2, 2.36, 2.73, 3.09, 3.45, 3.82,
    # 4.18, 4.55, 4.91, 5.27, 5.64, 6
    assert tome_r_schedule(12, (4, 0.5)) == [2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 6]
