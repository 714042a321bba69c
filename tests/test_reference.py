"""The vectorised, batched ATM equals the slow per-image reference of tests/reference.py."""

import pytest
import torch

import atmerge
from reference import reference_forward, source_groups
from conftest import SMALL_MODEL_VARIANTS, blocky_images, small_vit


def _compare(model, images, **atm):
    model = model.double()
    images = images.double()
    with torch.no_grad():
        ref_out, ref_groups, ref_r = reference_forward(model, images, **atm)
        atmerge.patch(model, atmerge.ATM(**atm), trace_source=True)
        out = model(images)
        stats = atmerge.last_stats(model)
        groups = source_groups(atmerge.merge_source(model))
        atmerge.unpatch(model)
    assert stats.merged_per_block == ref_r
    assert groups == [sorted(tuple(sorted(g)) for g in img) for img in ref_groups]
    assert (out - ref_out).abs().max() < 1e-9, (out - ref_out).abs().max()
    return ref_r


def test_reference_cifar_model_real_images(cifar_model, cifar_images):
    import copy

    rs = _compare(copy.deepcopy(cifar_model), cifar_images[0][:4], alpha=0.99, beta=0.04, theta_min=0.88)
    assert sum(rs) > 10  # the comparison exercised real merges
    assert sum(rs[9:]) > 0  # including size-distinctive blocks (l > l_s = 9)


@pytest.mark.parametrize(
    "kwargs",
    SMALL_MODEL_VARIANTS,
)
def test_reference_small_models(kwargs):
    model = small_vit(**kwargs)
    rs = _compare(model, blocky_images(3), alpha=0.97, beta=0.05, theta_min=0.6, split_layer=3)
    assert sum(rs) > 5


def test_batch_of_one_equals_per_image_merging():
    model = small_vit().double()
    images = blocky_images(3, cells=8, noise=0.05, seed=2).double()
    with torch.no_grad():
        atmerge.patch(model, atmerge.ATM(alpha=0.97, beta=0.05, theta_min=0.6))
        singles = []
        for i in range(3):
            model(images[i : i + 1])
            singles.append(atmerge.last_stats(model).merged_per_block)
        model(images)
        batched = atmerge.last_stats(model).merged_per_block
    # Block 1 sees identical tokens alone or batched: r = round-half-up mean of the per-image counts.
    counts = [s[0] for s in singles]
    assert batched[0] == int(sum(counts) / 3 + 0.5)
    assert len(set(counts)) > 1  # the images differ, so the batch mean is a real mean
    for i in range(3):
        _, _, ref_r = reference_forward(model, images[i : i + 1], alpha=0.97, beta=0.05, theta_min=0.6)
        assert singles[i] == ref_r
