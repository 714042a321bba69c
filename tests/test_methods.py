"""Baseline methods on the same seam: ToMe, fixed-count schedules, constant threshold."""

import copy

import pytest
import torch

import atmerge
from atmerge.core.schedules import linear_r_schedule, tome_r_schedule
from atmerge.methods.base import BlockContext
from conftest import blocky_images, small_vit
from reference import reference_forward, source_groups


def test_tome_r_schedules_by_hand():
    assert tome_r_schedule(4, 8) == [8, 8, 8, 8]
    assert tome_r_schedule(4, [3, 2]) == [3, 2, 0, 0]
    # (r, inflection): ramp from int(8 * 0.5) = 4 to 2 * 8 - 4 = 12 over 12 blocks
    assert tome_r_schedule(12, (8, 0.5)) == [4, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12]


def test_linear_r_schedules_by_hand():
    assert linear_r_schedule(4, 3, "constant") == [3, 3, 3, 3]
    assert linear_r_schedule(4, 3, "increasing") == [3, 4, 5, 6]
    assert linear_r_schedule(5, 3, "decreasing") == [3, 2, 1, 0, 0]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: atmerge.ToMe(r=-1), "r must be an integer >= 0, got -1"),
        (lambda: atmerge.ToMe(r=2.5), "r must be an integer >= 0, got 2.5"),
        (lambda: atmerge.ToMe(r=(8, 0.5, 1)), r"r as a tuple must be \(r, inflection\)"),
        (lambda: atmerge.TopR(schedule="cosine"), "schedule='cosine'; choose 'constant', 'increasing' or 'decreasing'"),
        (lambda: atmerge.ConstantThreshold(theta=1.2), r"theta=1.2 is out of range; allowed \[0.0, 1.0\]"),
    ],
)
def test_bad_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_tome_list_longer_than_depth():
    with pytest.raises(ValueError, match="r has 7 entries for a model of 6 blocks"):
        atmerge.patch(small_vit(), atmerge.ToMe(r=[1] * 7))


def test_tome_equals_reference(cifar_model, cifar_images):
    model = copy.deepcopy(cifar_model).double()
    x = cifar_images[0][:4].double()
    # ToMe's release (r=4, inflection 0.5): int of 12 evenly spaced values from 2 to 6, by hand
    schedule = [2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 6]
    with torch.no_grad():
        ref_out, ref_groups, ref_r = reference_forward(model, x, split_layer=12, fixed_r=schedule, prune_last=False)
        atmerge.patch(model, atmerge.ToMe(r=(4, 0.5)), trace_source=True, prune_last_block=False)
        out = model(x)
        stats, groups = atmerge.last_stats(model), source_groups(atmerge.merge_source(model))
        atmerge.patch(model, atmerge.ToMe(r=(4, 0.5)))  # default: only CLS reaches the last MLP
        pruned_out = model(x)
    assert stats.merged_per_block == ref_r == schedule
    assert groups == [sorted(tuple(sorted(g)) for g in img) for img in ref_groups]
    assert (out - ref_out).abs().max() < 1e-9
    assert stats.tokens_mlp_per_block[-1] == 65 - sum(schedule)  # ToMe as released keeps every token
    assert (pruned_out - out).abs().max() < 1e-9  # the CLS-only last block changes no output
    assert atmerge.last_stats(model).tokens_mlp_per_block[-1] == 1


def _tome_block_by_hand(num_protected: int):
    """ToMe(r=1) deciding one block of 8 unprotected tokens (after ``num_protected`` CLS-like
    tokens) whose key cosines are written by hand; returns the merged token values, each token
    valued by its position (merge by sum)."""
    p = num_protected
    keys = torch.zeros(1, p + 8, 12, dtype=torch.float64)
    for i in range(p):
        keys[0, i, 8 + i] = 1.0
    a_pos, b_pos = [p + 1, p + 3, p + 5, p + 7], [p, p + 2, p + 4, p + 6]
    if p % 2 == 0:  # the release's split: A = even positions of the whole sequence, B = odd
        a_pos, b_pos = b_pos, a_pos
    for j, b in enumerate(b_pos):
        keys[0, b, j] = 1.0
    for k, (a, c) in enumerate(zip(a_pos, (0.1, 0.5, 0.3, 0.9))):  # A token k's cosine to B token k
        keys[0, a, k] = c
        keys[0, a, 4 + k] = (1 - c * c) ** 0.5  # the rest of its norm in a dimension of its own
    ctx = BlockContext(0, 2, keys, torch.ones(1, p + 8, dtype=torch.float64), p)
    merge = atmerge.ToMe(r=1).decide(ctx).merge
    return merge(torch.arange(p + 8.0, dtype=torch.float64)[None, :, None])[0, :, 0].tolist(), a_pos, b_pos


def test_tome_keeps_the_releases_token_order_with_and_without_a_class_token():
    """Worked out by hand from facebookresearch/ToMe ``tome/merge.py`` (bipartite_soft_matching):
    A = even positions, B = odd positions; the r best A tokens merge into their best B tokens; the
    output is [unmerged A, B], and the unmerged A tokens are re-sorted into token order only when
    there is a class token (``if class_token: unm_idx = unm_idx.sort(dim=1)[0]``).  Here A's best
    cosines are 0.1, 0.5, 0.3, 0.9 in token order, r = 1: the last A token merges."""
    # no class token: A = 0, 2, 4, 6 (best scores .1, .5, .3, .9), B = 1, 3, 5, 7; 6 merges into 7;
    # the unmerged A stay by descending score: 2 (.5), 4 (.3), 0 (.1)
    out, a_pos, b_pos = _tome_block_by_hand(0)
    assert (a_pos, b_pos) == ([0, 2, 4, 6], [1, 3, 5, 7])
    assert out == [2, 4, 0, 1, 3, 5, 7 + 6]
    # with a class token (position 0): A = 2, 4, 6, 8, B = 1, 3, 5, 7; 8 merges into 7; the
    # unmerged A are re-sorted into token order after CLS
    out, a_pos, b_pos = _tome_block_by_hand(1)
    assert (a_pos, b_pos) == ([2, 4, 6, 8], [1, 3, 5, 7])
    assert out == [0, 2, 4, 6, 1, 3, 5, 7 + 8]


def test_tome_r_above_half_is_clipped_to_set_a():
    model = atmerge.patch(small_vit(), atmerge.ToMe(r=100))
    with torch.no_grad():
        model(blocky_images(2))
    merged = atmerge.last_stats(model).merged_per_block
    assert merged[0] == 32  # 64 patches + CLS: A = positions 2, 4, ..., 64
    assert merged[1] == 16


def test_no_reduction_reproduces_the_unpatched_model():
    model = small_vit()
    x = blocky_images(2)
    with torch.no_grad():
        expected = model(x)
        for method in (atmerge.ToMe(r=0), atmerge.TopR(r=0), atmerge.ConstantThreshold(theta=1.0)):
            atmerge.patch(model, method)
            assert (model(x) - expected).abs().max() < 1e-5
            assert sum(atmerge.last_stats(model).merged_per_block) == 0


def test_topr_counts_follow_the_schedule():
    model = atmerge.patch(small_vit(), atmerge.TopR(schedule="increasing", r=2))
    with torch.no_grad():
        model(blocky_images(2))
    assert atmerge.last_stats(model).merged_per_block == [2, 3, 4, 5, 6, 0]  # last block: CLS only


def test_constant_threshold_hand_case():
    # CLS + 4 tokens: A = {2, 4}, B = {1, 3}; token 2 ~ token 1 (cos 0.995), token 4 ⟂ both.
    metric = torch.tensor([[[0.0, 0, 1], [1, 0, 0], [1, 0.1, 0], [0, 1, 0], [0, 0, 1]]])
    ctx = BlockContext(0, 12, metric, torch.ones(1, 5), 1)
    d = atmerge.ConstantThreshold(theta=0.99).decide(ctx)
    assert d.merge.r == 1 and d.merge.src.tolist() == [[0]] and d.merge.dst.tolist() == [[0]]
    assert atmerge.ConstantThreshold(theta=0.996).decide(ctx).merge.r == 0
    assert d.threshold == 0.99
