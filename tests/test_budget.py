"""Comparing at equal cost: match_gflops, and ATM's ablation options."""

import copy

import pytest
import torch

import atmerge
from atmerge.budget import mean_gflops
from conftest import blocky_images, small_vit
from test_reference import _compare


def _batches():
    return [blocky_images(4, cells=8, noise=0.05, seed=s) for s in range(2)]


@pytest.mark.parametrize(
    "factory",
    [
        lambda t: atmerge.ATM(alpha=1.0, beta=0.1 * (1 - t), theta_min=0.5),
        lambda t: atmerge.ToMe(r=round(16 * (1 - t))),
        lambda t: atmerge.EViT(keep_rate=max(t, 0.05), locations=(2, 4)),
    ],
)
def test_match_gflops_hits_the_budget_without_exceeding_it(factory):
    model = small_vit()
    twin = copy.deepcopy(model)
    batches = _batches()
    dense = atmerge.gflops(model, (3, 32, 32))
    target = 0.7 * dense
    found = atmerge.match_gflops(model, factory, target, batches, steps=10)
    assert found.within_budget and found.gflops <= target
    assert found.gflops > 0.55 * dense  # close to the budget, not just cheap
    # the reported cost is what the chosen setting really costs
    assert mean_gflops(twin, found.method, batches) == pytest.approx(found.gflops)
    assert atmerge.is_patched(model) and model.__dict__["_atmerge_state"].method == found.method


def test_match_gflops_reports_an_unreachable_budget():
    model = small_vit()
    found = atmerge.match_gflops(model, lambda t: atmerge.ToMe(r=round(2 * (1 - t))), 1e-6, _batches(), steps=4)
    assert not found.within_budget


def test_match_gflops_refuses_a_non_positive_budget():
    with pytest.raises(ValueError, match="target_gflops must be positive, got 0"):
        atmerge.match_gflops(small_vit(), lambda t: atmerge.ToMe(r=1), 0, _batches())


def test_per_image_counts_equal_running_images_one_by_one():
    model = small_vit()
    x = blocky_images(3, cells=8, noise=0.05, seed=2)
    settings = dict(alpha=0.97, beta=0.05, theta_min=0.6)
    with torch.no_grad():
        atmerge.patch(model, atmerge.ATM(**settings))
        singles, stats = [], []
        for i in range(3):
            singles.append(model(x[i : i + 1]))
            stats.append(atmerge.last_stats(model))
        atmerge.patch(model, atmerge.ATM(**settings, batch_adaptive=False))
        together = model(x)
    combined = atmerge.last_stats(model)
    assert torch.allclose(together, torch.cat(singles), atol=1e-6)
    assert combined.batch_size == 3
    assert combined.gflops == pytest.approx(sum(s.gflops for s in stats) / 3)
    assert combined.merged_per_block[0] == pytest.approx(sum(s.merged_per_block[0] for s in stats) / 3)


@pytest.mark.parametrize("split_layer", [0, 6])
def test_split_layer_ablations_match_the_reference(split_layer):
    # 0: size-distinctive matching in every block; depth: alternate matching everywhere
    rs = _compare(small_vit(), blocky_images(3), alpha=0.97, beta=0.05, theta_min=0.6, split_layer=split_layer)
    assert sum(rs) > 5
