"""Determinism: the same images give bit-identical merges and outputs on every run; no result
depends on the order of the images in a batch; per-image methods give every image the result
it gets alone; batch-adaptive r (ATM, constant θ) depends on which other images share the batch
— by design — and a batch of identical images merges exactly like one of them."""

from __future__ import annotations

import pytest
import torch

import atmerge
from conftest import blocky_images, small_vit

MERGING_ATM = atmerge.ATM(alpha=0.97, beta=0.05, theta_min=0.6)  # merges plenty on blocky images
BATCH_ADAPTIVE = [MERGING_ATM, atmerge.ConstantThreshold(theta=0.8)]
PER_IMAGE = [
    atmerge.ATM(alpha=0.97, beta=0.05, theta_min=0.6, batch_adaptive=False),
    atmerge.ToMe(r=6),
    atmerge.TopR("increasing", 3),
    atmerge.EViT(0.6, (2, 4)),
    atmerge.MCTF(r=6),
    atmerge.ZeroTP(r=4),
]


def _label(method: atmerge.Method) -> str:
    return method.label()


def _images() -> torch.Tensor:
    """Six different images: blocky ones (much to merge) and noisier ones (less)."""
    return torch.cat([blocky_images(3, seed=1), blocky_images(3, cells=8, noise=0.3, seed=2)])


def _run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, atmerge.MergeStats, torch.Tensor | None]:
    with torch.no_grad():
        out = model(x)
    return out, atmerge.last_stats(model), atmerge.merge_source(model)


@pytest.mark.parametrize("method", BATCH_ADAPTIVE + PER_IMAGE, ids=_label)
def test_two_runs_give_bit_identical_merges_and_outputs(method):
    model = atmerge.patch(small_vit(global_pool="avg"), method, trace_source=True)
    x = _images()
    first, again = _run(model, x), _run(model, x.clone())
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert (first[2] is None and again[2] is None) or torch.equal(first[2], again[2])
    assert sum(first[1].merged_per_block) > 0


@pytest.mark.parametrize("method", BATCH_ADAPTIVE + PER_IMAGE, ids=_label)
def test_the_order_of_the_images_changes_no_result(method):
    # batch-adaptive r is a mean over the batch, so it too is the same in any order
    model = atmerge.patch(small_vit(), method)
    x = _images()
    order = torch.tensor([4, 0, 5, 2, 1, 3])
    out, stats, _ = _run(model, x)
    permuted, permuted_stats, _ = _run(model, x[order])
    unpermuted = torch.empty_like(permuted)
    unpermuted[order] = permuted
    assert (unpermuted - out).abs().max() < 1e-6
    assert permuted_stats.merged_per_block == pytest.approx(stats.merged_per_block)
    assert permuted_stats.gflops == pytest.approx(stats.gflops)


@pytest.mark.parametrize("method", PER_IMAGE, ids=_label)
def test_per_image_methods_give_each_image_the_result_it_gets_alone(method):
    model = atmerge.patch(small_vit(), method)
    x = _images()
    together, stats, _ = _run(model, x)
    alone = [_run(model, image) for image in x.split(1)]
    assert (torch.cat([out for out, _, _ in alone]) - together).abs().max() < 1e-6
    mean_alone = [sum(column) / len(alone) for column in zip(*(s.merged_per_block for _, s, _ in alone))]
    assert stats.merged_per_block == pytest.approx(mean_alone)


@pytest.mark.parametrize("method", BATCH_ADAPTIVE, ids=_label)
def test_batch_adaptive_r_depends_on_the_other_images_of_the_batch(method):
    model = atmerge.patch(small_vit(), method)
    blocky, noise = blocky_images(1, seed=1), torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out_alone, alone, _ = _run(model, blocky)
    out_together, together, _ = _run(model, torch.cat([blocky, noise]))
    # noise has fewer pairs above θ, so the batch mean — and the blocky image's r — is lower
    assert together.merged_per_block[0] < alone.merged_per_block[0]
    assert not torch.allclose(out_together[:1], out_alone, atol=1e-4)


@pytest.mark.parametrize("method", BATCH_ADAPTIVE, ids=_label)
def test_a_batch_of_identical_images_merges_like_one_image(method):
    model = atmerge.patch(small_vit(), method)
    image = _images()[:1]
    out_one, one, _ = _run(model, image)
    out_many, many, _ = _run(model, image.expand(5, -1, -1, -1).contiguous())
    assert many.merged_per_block == one.merged_per_block and sum(one.merged_per_block) > 0
    assert (out_many - out_one).abs().max() < 1e-6
