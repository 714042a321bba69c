"""Per-image merging in one padded batch (ATM / constant θ with batch_adaptive=False) equals
running the images one at a time: the same groups, outputs and per-image GFLOPs."""

import copy

import pytest
import torch

import atmerge
from atmerge.core.merging import bipartite_merge
from atmerge.core.matching import best_match, size_distinctive_split
from atmerge.core.padding import padded_best_match, padded_bipartite_merge, padded_size_distinctive_split
from conftest import SMALL_MODEL_VARIANTS, blocky_images, small_vit
from reference import real_source_groups as groups_of
from reference import reference_forward

SETTING = dict(alpha=0.95, beta=0.04, theta_min=0.85)


def run_padded(model, images, method, **options):
    atmerge.patch(model, method, trace_source=True, **options)
    with torch.no_grad():
        out = model(images)
    stats, groups = atmerge.last_stats(model), groups_of(atmerge.merge_source(model))
    atmerge.unpatch(model)
    return out, stats, groups


def test_padded_batch_equals_the_slow_reference_image_by_image(cifar_model, cifar_images):
    """Raw keys, with and without proportional attention, against tests/reference.py (float64)."""
    model, images = copy.deepcopy(cifar_model).double(), cifar_images[0][:6].double()
    for prop_attn in (True, False):
        out, stats, groups = run_padded(
            model, images, atmerge.ATM(**SETTING, batch_adaptive=False), prop_attn=prop_attn
        )
        counts = set()
        for i in range(images.shape[0]):
            ref_out, ref_groups, ref_r = reference_forward(model, images[i : i + 1], prop_attn=prop_attn, **SETTING)
            assert groups[i] == [sorted(tuple(sorted(g)) for g in ref_groups[0])][0]
            assert (out[i] - ref_out[0]).abs().max() < 1e-9
            counts.add(tuple(ref_r))
        assert len(counts) > 1  # the images really merged different counts
        assert stats.executed_gflops > stats.gflops  # padding ran


@pytest.mark.parametrize("similarity", ["raw", "centered"])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_padded_batch_equals_batches_of_one_on_real_images(cifar_model, cifar_images, similarity, prop_attn):
    model, images = copy.deepcopy(cifar_model), cifar_images[0]
    method = atmerge.ATM(**SETTING, similarity=similarity)
    out, stats, groups = run_padded(
        model, images, atmerge.ATM(**SETTING, similarity=similarity, batch_adaptive=False), prop_attn=prop_attn
    )
    gflops = []
    for i in range(images.shape[0]):  # batch-adaptive r of one image is its own count
        ref_out, ref_stats, ref_groups = run_padded(model, images[i : i + 1], method, prop_attn=prop_attn)
        assert groups[i] == ref_groups[0]
        assert (out[i] - ref_out[0]).abs().max() < 1e-5
        gflops.append(ref_stats.gflops)
    assert stats.gflops == pytest.approx(sum(gflops) / len(gflops))


@pytest.mark.parametrize("kwargs", SMALL_MODEL_VARIANTS)
@pytest.mark.parametrize(
    "method", [atmerge.ATM(alpha=0.9, beta=0.1, theta_min=0.3, split_layer=2), atmerge.ConstantThreshold(theta=0.5)]
)
def test_padded_batch_on_random_models(kwargs, method):
    """Registers, average pooling, LayerScale; size-distinctive matching from block 3."""
    torch.manual_seed(0)
    model = small_vit(**kwargs)
    images = blocky_images(5, cells=4, noise=0.3, seed=2)
    per_image = type(method)(**{**method.__dict__, "batch_adaptive": False})
    out, stats, groups = run_padded(model, images, per_image)
    merged = []
    for i in range(images.shape[0]):
        ref_out, ref_stats, ref_groups = run_padded(model, images[i : i + 1], method)
        assert groups[i] == ref_groups[0]
        assert (out[i] - ref_out[0]).abs().max() < 1e-5
        merged.append(ref_stats.merged_per_block)
    assert len({tuple(m) for m in merged}) > 1
    assert stats.merged_per_block == pytest.approx([sum(c) / len(c) for c in zip(*merged)])


def test_an_image_does_not_depend_on_the_others_of_its_batch(cifar_model, cifar_images):
    """Padding never merges, never attends, never pools: image 0's output is the same beside any
    other images (with batch-adaptive r it is not)."""
    model, images = copy.deepcopy(cifar_model), cifar_images[0]
    atmerge.patch(model, atmerge.ATM(**SETTING, batch_adaptive=False), prop_attn=False)
    with torch.no_grad():
        first = model(images[[0, 1, 2]])[0]
        second = model(images[[0, 5, 6, 7]])[0]
    assert (first - second).abs().max() < 1e-5


def test_padded_size_distinctive_split_by_hand():
    # image 0: 4 valid tokens after CLS, sizes 3, 1, 2, 1 → A = the two smallest (positions 2, 4)
    # image 1: 3 valid tokens, sizes 2, 2, 5, then padding → A = one token (position 1), B = 2, 3
    size = torch.tensor([[1.0, 3, 1, 2, 1], [1.0, 2, 2, 5, 0]])
    a_idx, b_idx, a_real, b_real = padded_size_distinctive_split(size, 1)
    assert a_idx[0].tolist() == [2, 4] and a_real[0].tolist() == [True, True]
    assert a_idx[1][a_real[1]].tolist() == [1] and b_idx[1][b_real[1]].tolist() == [2, 3]
    assert sorted(b_idx[0][b_real[0]].tolist()) == [1, 3]
    one_a, one_b = size_distinctive_split(size[1:, :4], 1)  # image 1 alone, without its padding
    assert one_a.tolist() == [[1]] and one_b.tolist() == [[2, 3]]


def test_padded_merge_equals_bipartite_merge_per_image():
    torch.manual_seed(3)
    metric, size = torch.randn(3, 9, 4), torch.ones(3, 9)
    size[2, 7:] = 0  # image 2 has 7 tokens and 2 padding
    a_idx, b_idx, a_real, b_real = padded_size_distinctive_split(size, 1)
    scores, match = padded_best_match(metric, a_idx, b_idx, a_real, b_real)
    r = torch.tensor([2, 0, 1])
    merge = padded_bipartite_merge(scores, match, a_idx, b_idx, a_real, b_real, r, 1, 9)
    x = torch.randn(3, 9, 5)
    merged = merge(x * size[..., None], "sum")
    for i, n in enumerate([9, 9, 7]):
        a1, b1 = size_distinctive_split(size[i : i + 1, :n], 1)
        s1, m1 = best_match(metric[i : i + 1, :n], a1, b1)
        one = bipartite_merge(s1, m1, a1, b1, int(r[i]), 1)(x[i : i + 1, :n], "sum")
        assert torch.allclose(merged[i, : one.shape[1]], one[0], atol=1e-6)
        assert merged[i, one.shape[1] :].abs().sum() == 0  # the rest is empty padding
    assert merge.num_out == 9  # image 1 merges nothing and keeps all 9


def test_padded_batch_under_autocast(cifar_model, cifar_images):
    """bf16 autocast: the MLP of the real tokens comes back in bf16 into a float32 stream."""
    model, images = copy.deepcopy(cifar_model), cifar_images[0]
    atmerge.patch(model, atmerge.ATM(**SETTING, batch_adaptive=False))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(images).float()
    with torch.no_grad():
        full = model(images)
    assert torch.isfinite(low).all() and (low.argmax(-1) == full.argmax(-1)).float().mean() >= 0.75
