"""Paired fidelity measures against hand-computed values."""

import math

import pytest
import torch

from atmerge.fidelity import paired_fidelity, wilson_interval


def test_wilson_interval_by_hand():
    # p = 0.5, n = 100, z = 1.96: centre 0.5, half-width 1.96·sqrt(0.25/100 + 1.96²/40000)/(1 + 1.96²/100)
    low, high = wilson_interval(50, 100)
    half = 1.959964 * math.sqrt(0.0025 + 1.959964**2 / 40000) / (1 + 1.959964**2 / 100)
    assert low == pytest.approx(0.5 - half) and high == pytest.approx(0.5 + half)
    low, high = wilson_interval(10, 10)  # all agree: the upper end is 1, the lower end below 1
    assert high == pytest.approx(1.0) and 0.69 < low < 0.73
    with pytest.raises(ValueError, match="total must be positive, got 0"):
        wilson_interval(0, 0)


def test_paired_fidelity_by_hand():
    reference = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])
    outputs = reference.clone()
    outputs[1] = torch.tensor([2.0, 1.0, 0.0])  # image 1 changes its prediction (class 1 -> 0)
    labels = torch.tensor([0, 1, 0, 0])  # the unpatched model is right on 0, 1, 3; the reduced on 0, 3
    f = paired_fidelity(outputs, reference, labels)
    assert f["agreement"] == 0.75 and f["top5_agreement"] == 1.0
    kl_1 = float((reference[1].softmax(-1) * (reference[1].log_softmax(-1) - outputs[1].log_softmax(-1))).sum())
    assert f["kl"] == pytest.approx(kl_1 / 4)
    assert f["top1"] == 0.5 and f["top1_unpatched"] == 0.75 and f["top1_change"] == -0.25
    # per-image differences (0, −1, 0, 0): sample SD 0.5, SE 0.5 / 2
    assert f["top1_change_se"] == pytest.approx(0.25)
    identical = paired_fidelity(reference, reference)
    assert identical["agreement"] == 1.0 and identical["kl"] == pytest.approx(0.0, abs=1e-12)
    assert identical["cosine"] == pytest.approx(1.0) and "top1" not in identical
    with pytest.raises(ValueError, match=r"outputs \[4, 3\] and reference \[4, 2\] differ in shape"):
        paired_fidelity(outputs, reference[:, :2])
