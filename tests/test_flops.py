"""The analytic FLOPs counter against fvcore (fused attention off so fvcore sees the matmuls)."""

import logging

import pytest
import timm
import torch
from fvcore.nn import FlopCountAnalysis

import atmerge
from atmerge.flops import BlockCost, ModelCost
from conftest import blocky_images, small_vit


def fvcore_gflops(model, x) -> float:
    for blk in model.blocks:
        blk.attn.fused_attn = False
    logging.disable(logging.WARNING)
    try:
        analysis = FlopCountAnalysis(model, x)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return analysis.total() / 1e9
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize(
    "name, expected",
    [("deit_tiny_patch16_224", 1.26), ("deit_small_patch16_224", 4.61), ("deit_base_patch16_224", 17.58)],
)
def test_unpatched_deit_matches_fvcore(name, expected):
    model = timm.create_model(name).eval()
    ours = atmerge.gflops(model)
    assert round(ours, 2) == expected
    # equal to fvcore's count (rel 1e-6 only absorbs float summation order): same ops, norms at 5 per element
    assert ours == pytest.approx(fvcore_gflops(model, torch.randn(1, 3, 224, 224)), rel=1e-6)


@pytest.mark.parametrize(
    "name, kwargs, size",
    [
        ("deit_small_distilled_patch16_224", {}, 224),
        ("vit_small_patch14_dinov2", dict(img_size=224, num_classes=0), 224),
        ("vit_small_patch16_224", dict(global_pool="avg", fc_norm=True, qk_norm=True), 224),
    ],
)
def test_other_families_match_fvcore(name, kwargs, size):
    model = timm.create_model(name, **kwargs).eval()
    assert atmerge.gflops(model, (3, size, size)) == pytest.approx(
        fvcore_gflops(model, torch.randn(1, 3, size, size)), rel=1e-6
    )


@pytest.mark.parametrize("kwargs", [{}, dict(global_pool="avg")])
def test_patched_gflops_match_fvcore_trace_of_the_merging_forward(kwargs):
    # fvcore traces the patched forward (with its real token counts) and also counts the
    # similarity matmul of the matching, which we report separately.
    model = timm.create_model("deit_tiny_patch16_224", **kwargs).eval()
    x = blocky_images(1, size=224, cells=8)
    atmerge.patch(model, atmerge.ATM(alpha=0.99, beta=0.04, theta_min=0.5))
    with torch.no_grad():
        model(x)
    s = atmerge.last_stats(model)
    assert s.tokens_per_block[-1] < 100  # merging happened
    assert s.gflops + s.matching_gflops == pytest.approx(fvcore_gflops(model, x), rel=1e-6)


def test_block_cost_hand_computed():
    # N=3 tokens, 1 left for the MLP: attention 3*(10+2) + 2*9*4, MLP 1*(20+3)
    b = BlockCost(attn_linear=10, attn_dim=4, mlp=20, norm1=2, norm2=3)
    assert b.macs(3, 3, 1) == 3 * 12 + 72 + 23
    # reduced before attention (MCTF): q, k, QKᵀ on 5 tokens; v, AV, proj on 3
    b = BlockCost(attn_linear=10, attn_dim=4, mlp=20, norm1=2, norm2=3, qk_linear=6)
    assert b.macs(5, 3, 1) == 5 * (2 + 6) + 25 * 4 + 3 * (2 + 4) + 9 * 4 + 23


def test_model_cost_hand_computed():
    b = BlockCost(attn_linear=10, attn_dim=4, mlp=20, norm1=0, norm2=0)
    cost = ModelCost(blocks=(b, b), patch_embed=7, norm_pre=0, final_norm=5, head=11)
    got = cost.gflops(num_patches=4, tokens_attn=[5, 3], tokens_mlp=[3, 1])
    expected = 4 * 7 + (5 * 10 + 2 * 25 * 4 + 3 * 20) + (3 * 10 + 2 * 9 * 4 + 1 * 20) + 1 * 5 + 11
    assert got == pytest.approx(expected / 1e9)
    with pytest.raises(ValueError, match="all 2 blocks"):
        cost.gflops(4, [5], [3])


def test_dense_gflops_of_small_model_by_hand():
    model = small_vit(depth=2)  # dim 48, 64 patches of 4x4x3, 65 tokens, MLP 192, 10 classes
    n, d = 65, 48
    block = n * (3 * d * d + d * d + 5 * d) + 2 * n * n * d + n * (2 * d * 4 * d + 5 * d)
    expected = 64 * 48 * 48 + 2 * block + n * 5 * d + d * 10
    assert atmerge.gflops(model, (3, 32, 32)) == pytest.approx(expected / 1e9)
