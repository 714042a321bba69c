"""EViT, MCTF and Zero-TPrune: hand-computed small cases, invariants, FLOPs against fvcore."""

import pytest
import timm
import torch

import atmerge
from atmerge.core.importance import attention_received, cls_attention, weighted_pagerank
from atmerge.core.merging import merge_weighted_average
from atmerge.methods.base import BlockContext
from atmerge.methods.evit import attentive_fusion
from atmerge.methods.mctf import bidirectional_assignment, multi_criteria_weights
from atmerge.methods.zerotp import importance_then_similarity_pruning
from conftest import blocky_images, small_vit
from test_flops import fvcore_gflops


def test_attention_scores_by_hand():
    attn = torch.tensor([[[[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]])  # [1, 1, 3, 3]
    assert torch.allclose(cls_attention(attn), torch.tensor([[0.5, 0.3, 0.2]]))
    assert torch.allclose(attention_received(attn), torch.tensor([[0.8, 1.3, 0.9]]) / 3)


def test_weighted_pagerank_by_hand():
    # everybody attends to token 0 -> all importance flows to token 0
    attn = torch.tensor([[[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]]])
    assert torch.allclose(weighted_pagerank(attn, 5), torch.tensor([[1.0, 0.0, 0.0]]))
    # a random row-stochastic graph keeps a distribution, and is stationary: s = Aᵀ s
    a = torch.rand(2, 3, 6, 6).softmax(-1)
    s = weighted_pagerank(a, 200)
    assert torch.allclose(s.sum(-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(a.mean(1).transpose(1, 2) @ s.unsqueeze(-1), s.unsqueeze(-1), atol=1e-5)


def test_evit_fusion_by_hand():
    score = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.05]])  # CLS then 4 patches
    red = attentive_fusion(score, keep=2, num_protected=1)
    assert red.assign.tolist() == [[0, 3, 1, 2, 3]]  # tokens 2, 3 kept; 1 and 4 fused into slot 3
    x = torch.tensor([[[7.0], [1.0], [2.0], [3.0], [4.0]]])
    y, size = merge_weighted_average(red, x, torch.ones(1, 5))
    fused = 0.1 * 1.0 + 0.05 * 4.0  # the release's rule: a weighted sum, not a weighted mean
    assert torch.allclose(y[0, :, 0], torch.tensor([7.0, 2.0, 3.0, fused]))
    assert size.tolist() == [[1.0, 1.0, 1.0, 2.0]]


def test_mctf_weights_by_hand():
    tokens = torch.tensor([[[0.0, 1], [1.0, 0], [1.0, 0], [0.0, 1]]])  # A = 0, 2; B = 1, 3 (no prefix)
    a, b = torch.tensor([0, 2]), torch.tensor([1, 3])
    info = torch.tensor([[0.5, 0.25, 0.5, 1.0]])
    size = torch.tensor([[1.0, 2.0, 1.0, 1.0]])
    only_sim = multi_criteria_weights(tokens, info, size, a, b, 1.0, 0.0, 0.0)
    assert torch.allclose(only_sim, torch.tensor([[[0.5, 1.0], [1.0, 0.5]]]))
    w = multi_criteria_weights(tokens, info, size, a, b, 1.0, 1.0, 1.0)
    inv_info = torch.tensor([2.0, 4.0, 2.0, 1.0]) / 4.0
    inv_size = torch.tensor([1.0, 0.5, 1.0, 1.0])
    expected = only_sim[0] * (inv_info[a, None] * inv_info[None, b]) * (inv_size[a, None] * inv_size[None, b])
    assert torch.allclose(w[0], expected)


def test_mctf_bidirectional_assignment_by_hand():
    # CLS + A = {2, 4}, B = {1, 3}; A-token 2 best with B-token 3 (0.9); then B picks among unmerged A
    weights = torch.tensor([[[0.2, 0.9], [0.3, 0.1]]])  # [1, Na=2, Nb=2]
    a, b = torch.tensor([2, 4]), torch.tensor([1, 3])
    red = bidirectional_assignment(weights, a, b, r=2, num_protected=1, num_tokens=5)
    # step 1 (r1 = 1): token 2 -> token 3.  step 2 (r2 = 1): B tokens choose the unmerged A token 4:
    # token 1 scores 0.3, token 3 scores 0.1 -> token 1 fuses into token 4.
    assert red.num_out == 3
    assert red.assign.tolist() == [[0, 1, 2, 2, 1]]  # slots: CLS, A-token 4 (+1), B-token 3 (+2)


def test_mctf_keeps_unmerged_b_tokens_in_the_releases_order():
    """Worked out by hand from the release's algorithm (mlvlab/MCTF ``utils/mctf.py``), not from
    atmerge's code: after the B→A step the unmerged B tokens stay in the order of their
    descending best score (``node_max2.sort(descending=True)``), not in token order.

    Tokens: CLS 0, A = {2, 4, 6, 8}, B = {1, 3, 5, 7}; r = 4, so r1 = 2 A→B and r2 = 2 B→A.
    Step 1, best B per A: 2→7 (0.4), 4→1 (0.9), 6→3 (0.3), 8→3 (0.5); the two best fuse:
    4→1, 8→3.  Unmerged A: 2, 6 (re-sorted into token order).
    Step 2, best unmerged A per B: 1→6 (0.2), 3→6 (0.3), 5→2 (0.25), 7→2 (0.4); the two best
    fuse: 7→2, 3→6 (3 carries 8).  Unmerged B by descending score: 5 (0.25), then 1 (0.2).
    Output: [CLS, 2+7, 6+3+8, 5, 1+4].
    """
    weights = torch.tensor(
        [
            [
                [0.1, 0.2, 0.25, 0.4],  # A-token 2 against B-tokens 1, 3, 5, 7
                [0.9, 0.1, 0.1, 0.1],  # A-token 4
                [0.2, 0.3, 0.2, 0.1],  # A-token 6
                [0.1, 0.5, 0.1, 0.2],
            ]
        ]
    )  # A-token 8
    a, b = torch.tensor([2, 4, 6, 8]), torch.tensor([1, 3, 5, 7])
    red = bidirectional_assignment(weights, a, b, r=4, num_protected=1, num_tokens=9)
    assert red.num_out == 5
    #                      token: 0  1  2  3  4  5  6  7  8
    assert red.assign.tolist() == [[0, 4, 1, 2, 4, 3, 2, 1, 2]]


def test_mctf_decides_a_block_in_the_releases_layout_by_hand():
    """The whole block decision (``MCTF.decide``: the release's alternate split of positions, its
    clipping, the weights and the bidirectional matching) on tokens whose cosines are written by
    hand, worked out from the release's algorithm (mlvlab/MCTF ``utils/mctf.py``) alone.

    17 tokens: CLS 0; the release splits by position, ``x[:, ::2]`` / ``x[:, 1::2]``, so A = the
    even positions 2..16 (CLS masked) and B = the odd positions 1..15.  B tokens are orthonormal;
    an A token's cosine to each B token is written below (the rest of its norm in a spare
    dimension).  τ_info = τ_size = 0 leave the similarity (cos + 1)/2 alone, which ranks as cos.
    r = 4 (17 − 4 ≥ 10 and 4 ≤ 16 // 2: not clipped): r1 = 2 A→B, r2 = 2 B→A.
    Step 1, best B per A: 2→7 (.4), 4→1 (.9), 6→3 (.3), 8→3 (.5), 10→9 (.04), 12, 14, 16 → 0;
    the two best fuse: 4→1, 8→3.  Unmerged A, re-sorted into token order: 2, 6, 10, 12, 14, 16.
    Step 2, best unmerged A per B: 1→6 (.2), 3→6 (.3), 5→2 (.25), 7→2 (.4), 9, 11, 13, 15 → 10
    (.04, .03, .02, .01); the two best fuse: 7→2, 3→6 (with 8).  The unmerged B tokens stay in
    the order of their best score: 5, 1, 9, 11, 13, 15 — not token order (1 before 5).
    Output: [CLS, 2+7, 6+3+8, 10, 12, 14, 16, 5, 1+4, 9, 11, 13, 15]."""
    cos = {  # A token -> its cosine to B tokens 1, 3, 5, 7, 9, 11, 13, 15
        2: [0.1, 0.2, 0.25, 0.4, 0, 0, 0, 0],
        4: [0.9, 0.1, 0.1, 0.1, 0, 0, 0, 0],
        6: [0.2, 0.3, 0.2, 0.1, 0, 0, 0, 0],
        8: [0.1, 0.5, 0.1, 0.2, 0, 0, 0, 0],
        10: [0, 0, 0, 0, 0.04, 0.03, 0.02, 0.01],
        12: [0.0] * 8,
        14: [0.0] * 8,
        16: [0.0] * 8,
    }
    tokens = torch.zeros(1, 17, 10, dtype=torch.float64)
    tokens[0, 0, 9] = 1.0  # CLS
    for j, b in enumerate(range(1, 17, 2)):
        tokens[0, b, j] = 1.0
    for a, row in cos.items():
        tokens[0, a, :8] = torch.tensor(row, dtype=torch.float64)
        tokens[0, a, 8] = (1 - sum(c * c for c in row)) ** 0.5
    attention = torch.full((1, 2, 17, 17), 1 / 17, dtype=torch.float64)
    ctx = BlockContext(1, 4, None, torch.ones(1, 17, dtype=torch.float64), 1, tokens, attention)
    decision = atmerge.MCTF(r=4, tau_info=0.0, tau_size=0.0).decide(ctx)
    assert decision.merge.num_out == 13 and decision.requested == 4
    slots = [[0], [2, 7], [6, 3, 8], [10], [12], [14], [16], [5], [1, 4], [9], [11], [13], [15]]
    expected = [next(s for s, group in enumerate(slots) if token in group) for token in range(17)]
    assert decision.merge.assign.tolist() == [expected]


def test_zerotp_pruning_by_hand():
    importance = torch.tensor([[0.5, 0.3, 0.05, 0.1, 0.2, 0.01]])  # CLS + 5
    metric = torch.tensor([[[0.0, 1], [1.0, 0], [1.0, 0], [0.0, 1], [0.9, 0.1], [1.0, 0.0]]])
    red = importance_then_similarity_pruning(importance, metric, 1, 1, 1)
    # I-stage prunes token 5 (least important); ranks of the rest: 1, 4, 3, 2 ->
    # anchors 1, 3; candidates 4, 2; token 2 equals anchor 1 (cos 1) -> pruned.
    assert red.assign.tolist() == [[0, 1, -1, 2, 3, -1]]
    assert red.num_out == 4


@pytest.mark.parametrize(
    "method", [atmerge.EViT(keep_rate=1.0, locations=(2, 4)), atmerge.MCTF(r=0), atmerge.ZeroTP(r=0)]
)
def test_no_reduction_reproduces_the_unpatched_model(method):
    model = small_vit()
    x = blocky_images(2)
    with torch.no_grad():
        expected = model(x)
        atmerge.patch(model, method)
        got = model(x)
    assert (got - expected).abs().max() < 1e-5
    stats = atmerge.last_stats(model)
    assert stats.tokens_mlp_per_block[:-1] == [65] * 5
    assert stats.prune_last_block and stats.tokens_mlp_per_block[-1] == 1  # the same rule for every method


@pytest.mark.parametrize(
    "method", [atmerge.EViT(keep_rate=0.5, locations=(1, 3)), atmerge.MCTF(r=12), atmerge.ZeroTP(r=12)]
)
def test_cls_is_never_pruned_or_merged(method):
    model = small_vit()
    with torch.no_grad():
        atmerge.patch(model, method, trace_source=True)
        model(blocky_images(3))
    source = atmerge.merge_source(model)
    assert torch.equal(source[:, 0], torch.eye(65)[0].expand(3, -1))
    assert atmerge.last_stats(model).tokens_per_block[-1] < 40


@pytest.mark.parametrize(
    "method",
    [
        atmerge.EViT(keep_rate=0.6, locations=(4, 7, 10)),
        atmerge.MCTF(r=8),
        atmerge.MCTF(r=0.3, blocks=(2, 5, 9)),
        atmerge.ZeroTP(r=8),
    ],
)
def test_gflops_match_fvcore_trace(method):
    # fvcore traces the real patched forward: it sees the look-ahead attention of MCTF (part of
    # gflops) and the matching/PageRank matmuls (reported as matching_gflops).
    model = timm.create_model("deit_tiny_patch16_224").eval()
    x = blocky_images(1, size=224, cells=8)
    atmerge.patch(model, method)
    with torch.no_grad():
        model(x)
    s = atmerge.last_stats(model)
    assert s.gflops + s.matching_gflops == pytest.approx(fvcore_gflops(model, x), rel=1e-6)


def test_mctf_fuses_before_attention_of_every_block_but_the_first():
    model = atmerge.patch(small_vit(), atmerge.MCTF(r=8), prune_last_block=False)
    with torch.no_grad():
        model(blocky_images(2))
    s = atmerge.last_stats(model)
    # block 1 fuses nothing; blocks 2.. fuse 8 at their start, until the release's 10-token floor
    assert s.merged_per_block == [0, 8, 8, 8, 8, 8]
    assert s.tokens_per_block == [65, 65, 57, 49, 41, 33]
    assert s.tokens_attended_per_block == [65, 57, 49, 41, 33, 25] == s.tokens_mlp_per_block
    model = atmerge.patch(small_vit(), atmerge.MCTF(r=0.5, blocks=(2, 3, 4, 5, 6)))
    with torch.no_grad():
        model(blocky_images(1))
    s = atmerge.last_stats(model)
    # r = ⌊share × free⌋ clipped to free // 2 and n − 10: 65 → 33 → 17 → 10 (7, not 8) → 10 → 10
    assert s.merged_per_block == [0, 32, 16, 7, 0, 0]
    assert s.tokens_mlp_per_block == [65, 33, 17, 10, 10, 1]  # CLS only in the last block


def test_fixed_counts_above_the_limit_are_clipped_and_reported():
    model = atmerge.patch(small_vit(), atmerge.ToMe(r=40))
    with torch.no_grad():
        model(blocky_images(1))
    s = atmerge.last_stats(model)
    assert s.requested_per_block == [40] * 5 + [None]  # the last block keeps CLS only
    assert s.merged_per_block[0] == 32 and 0 in s.clipped_blocks


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: atmerge.EViT(keep_rate=0.0), r"keep_rate=0.0 is out of range; allowed \(0.0, 1.0\]"),
        (lambda: atmerge.EViT(keep_rate=1.5), r"keep_rate=1.5 is out of range"),
        (lambda: atmerge.EViT(locations=(0, 3)), "locations must be block numbers counted from 1"),
        (lambda: atmerge.MCTF(tau_info=-1), r"tau_info=-1 is out of range"),
        (lambda: atmerge.MCTF(r=1.5), r"r must be an integer >= 0 or a share in \(0, 1\), got 1.5"),
        (lambda: atmerge.MCTF(blocks=(0,)), "blocks must be block numbers counted from 1"),
        (lambda: atmerge.ZeroTP(importance_share=2), r"importance_share=2 is out of range"),
        (lambda: atmerge.ZeroTP(iterations=0), "iterations must be an integer >= 1, got 0"),
    ],
)
def test_bad_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_evit_locations_beyond_depth():
    with pytest.raises(ValueError, match=r"locations \(4, 7, 10\) go beyond the model's depth; allowed 1..6"):
        atmerge.patch(small_vit(), atmerge.EViT())


def test_methods_that_reduce_nothing_cost_nothing_extra():
    x = blocky_images(2)
    dense = atmerge.gflops(small_vit(global_pool="avg"), (3, 32, 32))
    for method in (atmerge.MCTF(r=0), atmerge.ZeroTP(r=0)):
        model = atmerge.patch(small_vit(global_pool="avg"), method)
        with torch.no_grad():
            model(x)
        s = atmerge.last_stats(model)
        assert s.gflops == pytest.approx(dense) and s.matching_gflops == 0
