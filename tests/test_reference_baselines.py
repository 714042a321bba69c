"""The vectorised baselines (EViT, MCTF, Zero-TP) equal their slow per-image loop references of
tests/reference.py: same tokens removed per block, same groups of original positions, same
outputs in float64."""

import copy

import pytest
import torch

import atmerge
from reference import reference_evit, reference_mctf, reference_zerotp, source_groups
from conftest import SMALL_MODEL_VARIANTS, blocky_images, small_vit


def _compare(model, images, method, reference, reference_options=None, **options):
    """Run ``method`` patched into ``model`` and ``reference`` with the same options (those in
    ``reference_options`` replaced for the reference); assert they agree and return the
    reference's tokens removed per block."""
    model = model.double()
    images = images.double()
    with torch.no_grad():
        ref_out, ref_groups, ref_r = reference(model, images, **{**options, **(reference_options or {})})
        atmerge.patch(model, method(**options), trace_source=True)
        try:
            out = model(images)
            stats = atmerge.last_stats(model)
            groups = source_groups(atmerge.merge_source(model))
        finally:
            atmerge.unpatch(model)
    assert stats.merged_per_block == ref_r
    assert groups == [sorted(tuple(sorted(g)) for g in img) for img in ref_groups]
    assert (out - ref_out).abs().max() < 1e-9, (out - ref_out).abs().max()
    return ref_r


def _fused_groups(model, images, method, **options):
    """Number of groups holding more than one original token, over all images (reference run)."""
    _, groups, _ = method(model.double(), images.double(), **options)
    return sum(len(g) > 1 for img in groups for g in img)


# ----------------------------------------------------------------------------- EViT


def test_evit_cifar_model_real_images(cifar_model, cifar_images):
    rs = _compare(
        copy.deepcopy(cifar_model),
        cifar_images[0][:4],
        atmerge.EViT,
        reference_evit,
        keep_rate=0.6,
        locations=(4, 7, 10),
    )
    assert [l for l, r in enumerate(rs, start=1) if r > 0] == [4, 7, 10]
    assert sum(rs) > 30


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # CLS token, token pooling
        dict(reg_tokens=2),  # CLS and two registers protected
        dict(init_values=1e-1, qk_norm=True),  # LayerScale and q/k norm
    ],
)
def test_evit_small_models(kwargs):
    model = small_vit(**kwargs)
    rs = _compare(model, blocky_images(3), atmerge.EViT, reference_evit, keep_rate=0.6, locations=(2, 4))
    assert rs[1] == 64 - 39 - 1 and rs[3] > 5  # ⌈0.6·64⌉ = 39 kept, 25 fused into one
    # A fused token is an ordinary token at the next location: it may be fused again or kept.


def test_evit_at_the_last_location_of_an_avg_pooled_model():
    # EViT fuses in the last block too when that block does not keep CLS alone (avg pooling with
    # a CLS token); the size-weighted average pooling then sees the fused token's size.
    model = small_vit(global_pool="avg", class_token=True)
    rs = _compare(model, blocky_images(3), atmerge.EViT, reference_evit, keep_rate=0.6, locations=(3, 6))
    assert rs[2] == 24 and rs[5] > 5


# ----------------------------------------------------------------------------- MCTF


def test_mctf_cifar_model_real_images(cifar_model, cifar_images):
    rs = _compare(copy.deepcopy(cifar_model), cifar_images[0][:4], atmerge.MCTF, reference_mctf, r=4)
    assert rs[0] == 0 and all(r > 0 for r in rs[1:])  # every block but the first, the last included
    assert sum(rs) > 30


@pytest.mark.parametrize(
    "kwargs",
    SMALL_MODEL_VARIANTS,
)
@pytest.mark.parametrize("r", [8, 0.25])
def test_mctf_small_models(kwargs, r):
    model = small_vit(**kwargs)
    images = blocky_images(3)
    rs = _compare(model, images, atmerge.MCTF, reference_mctf, r=r)
    assert rs[0] == 0 and sum(rs) >= 5 * 6
    assert _fused_groups(model, images, reference_mctf, r=r) > 20


def test_mctf_chosen_blocks_and_criteria():
    # Fusion in chosen blocks only, a criterion switched off, and a large r clipped to half the
    # unprotected tokens.
    model = small_vit()
    rs = _compare(
        model, blocky_images(3, seed=1), atmerge.MCTF, reference_mctf, r=40, blocks=(1, 3), tau_info=0.0, tau_size=10.0
    )
    assert rs == [32, 0, 16, 0, 0, 0]


# ----------------------------------------------------------------------------- Zero-TP


def test_zerotp_cifar_model_real_images(cifar_model, cifar_images):
    rs = _compare(copy.deepcopy(cifar_model), cifar_images[0][:4], atmerge.ZeroTP, reference_zerotp, r=4)
    assert rs == [4] * 11 + [0]  # the last block keeps CLS alone instead


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # CLS token, token pooling
        dict(class_token=False, global_pool="avg"),  # no prefix token
        dict(reg_tokens=2, global_pool="avg", fc_norm=True),  # three protected tokens
        dict(init_values=1e-1, qk_norm=True),  # LayerScale and q/k norm
    ],
)
def test_zerotp_small_models(kwargs):
    model = small_vit(**kwargs)
    rs = _compare(model, blocky_images(3), atmerge.ZeroTP, reference_zerotp, r=6)
    pooled_by_cls = model.global_pool == "token"
    assert rs == [6] * 5 + [0 if pooled_by_cls else 6]


def test_zerotp_uneven_shares_and_schedule():
    # All pruning by importance, then all by similarity, with an increasing schedule.
    model = small_vit(class_token=False, global_pool="avg")
    images = blocky_images(3, seed=3)
    # r = (6, 0.5) by hand: from 6·(1 − 0.5) = 3 in block 1 to 2·6 − 3 = 9 in block 6, steps of
    # 6/5 = 1.2 rounded down: 3, 4.2, 5.4, 6.6, 7.8, 9 → the reference is given these numbers
    by_hand = [3, 4, 5, 6, 7, 9]
    for share in (1.0, 0.0, 0.3):
        rs = _compare(
            copy.deepcopy(model),
            images,
            atmerge.ZeroTP,
            reference_zerotp,
            r=(6, 0.5),
            importance_share=share,
            reference_options=dict(r=by_hand),
        )
        assert rs == by_hand
