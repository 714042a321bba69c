"""Attention pooling (timm global_pool='map', SigLIP-style): log(size) in the pooling logits makes
every original patch count once."""

import pytest
import torch

import atmerge
from conftest import blocky_images, small_vit
from test_flops import fvcore_gflops


def map_vit(**kwargs):
    torch.manual_seed(0)
    return small_vit(global_pool="map", **kwargs)


def test_pooling_merged_tokens_with_their_sizes_equals_pooling_the_repeated_tokens():
    pool = map_vit().attn_pool.eval()
    tokens, sizes = torch.randn(2, 5, 48), torch.tensor([[1.0, 3.0, 2.0, 1.0, 4.0], [2.0, 1.0, 1.0, 5.0, 1.0]])
    with torch.no_grad():
        merged = pool(tokens, attn_mask=sizes.log()[:, None, None, :])
        for b in range(2):
            repeated = tokens[b].repeat_interleave(sizes[b].long(), dim=0)[None]
            assert torch.allclose(merged[b], pool(repeated)[0], atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(), dict(class_token=False), dict(reg_tokens=2)])
def test_merging_nothing_is_the_unpatched_model_and_merging_runs(kwargs):
    model, x = map_vit(**kwargs), blocky_images(4, cells=4, noise=0.1, seed=1)
    with torch.no_grad():
        expected = model(x)
        atmerge.patch(model, atmerge.ATM(alpha=1.0, beta=0.0, theta_min=1.0))
        assert torch.equal(model(x), expected)
        assert not atmerge.last_stats(model).prune_last_block  # every token reaches the pool
        for method in (
            atmerge.ATM(alpha=0.9, beta=0.1, theta_min=0.3),
            atmerge.ToMe(r=6),
            atmerge.ATM(alpha=0.9, beta=0.1, theta_min=0.3, batch_adaptive=False),
        ):
            atmerge.patch(model, method)
            out = model(x)
            assert out.shape == expected.shape and torch.isfinite(out).all()
            assert atmerge.last_stats(model).tokens_per_block[-1] < 65


def test_gflops_count_the_attention_pool_per_token():
    model = map_vit()
    model.attn_pool.fused_attn = False  # so that fvcore sees the matmuls
    assert atmerge.gflops(model, (3, 32, 32)) == pytest.approx(
        fvcore_gflops(model, torch.randn(1, 3, 32, 32)), rel=1e-6
    )
    cost = atmerge.models.timm_vit.model_cost(model)
    fewer = cost.gflops(64, [65.0] * 6, [65.0] * 6, tokens_out=33.0)
    assert cost.gflops(64, [65.0] * 6, [65.0] * 6) - fewer == pytest.approx(
        32 * (cost.pool_per_token + cost.final_norm) / 1e9
    )
