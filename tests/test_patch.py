"""Patching timm models: exactness when nothing merges, unpatch, attention paths, invariants."""

import copy

import pytest
import timm
import torch

import atmerge
from atmerge.core.matching import size_distinctive_split
from atmerge.methods.base import BlockContext
from atmerge.models.timm_vit import attention_with_keys
from conftest import blocky_images, small_vit

# name, kwargs, input size: timm VisionTransformer variants (DeiT, distilled DeiT, DINOv2, MAE-style avg pooling), random init
MODELS = [
    ("deit_tiny_patch16_224", {}, 224),
    ("deit_small_distilled_patch16_224", {}, 224),
    ("vit_small_patch14_dinov2", dict(img_size=224, num_classes=0), 224),
    ("vit_base_patch16_224", dict(global_pool="avg", depth=4), 224),  # MAE-style, 4 blocks for speed
]
NO_MERGE = atmerge.ATM(alpha=1.0, beta=0.0, theta_min=1.0)


@pytest.mark.parametrize("name, kwargs, size", MODELS)
@pytest.mark.parametrize("fused", [True, False])
def test_threshold_one_merges_nothing_and_matches_unpatched(name, kwargs, size, fused):
    model = timm.create_model(name, **kwargs).eval()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        atmerge.patch(model, NO_MERGE)
        got = model(x)
    stats = atmerge.last_stats(model)
    assert sum(stats.merged_per_block) == 0
    assert (got - expected).abs().max() < 1e-4


def test_cifar_reference_model_threshold_one(cifar_model, cifar_images):
    model = copy.deepcopy(cifar_model)
    x = cifar_images[0]
    with torch.no_grad():
        expected = model(x)
        atmerge.patch(model, NO_MERGE)
        got = model(x)
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize("name, kwargs, size", MODELS[:3])
def test_unpatch_restores_exact_outputs(name, kwargs, size):
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        before = model(x)
        atmerge.patch(model, atmerge.ATM(alpha=0.5, beta=0.1, theta_min=0.0), trace_source=True)
        merged = model(x)
        atmerge.unpatch(model)
        after = model(x)
    assert not torch.equal(merged, before)  # the patch did change something
    assert torch.equal(after, before)
    assert not atmerge.is_patched(model)
    assert all(type(b).__name__ == "Block" for b in model.blocks)
    assert not any(k.startswith("_atmerge") for m in model.modules() for k in vars(m))


def test_repatching_replaces_the_method():
    model = small_vit()
    x = blocky_images(2)
    atmerge.patch(model, NO_MERGE)
    atmerge.patch(model, atmerge.ATM(alpha=0.9, beta=0.05, theta_min=0.5))
    with torch.no_grad():
        model(x)
    assert sum(atmerge.last_stats(model).merged_per_block) > 0
    atmerge.unpatch(model)
    assert type(model) is timm.models.vision_transformer.VisionTransformer


def test_fused_and_manual_attention_agree_while_merging():
    model = small_vit()
    x = blocky_images(2)
    method = atmerge.ATM(alpha=0.95, beta=0.05, theta_min=0.6)
    outs = []
    with torch.no_grad():
        for fused in (True, False):
            for blk in model.blocks:
                blk.attn.fused_attn = fused
            atmerge.patch(model, method)
            outs.append(model(x))
            assert sum(atmerge.last_stats(model).merged_per_block) > 0
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_proportional_attention_equals_attention_over_repeated_tokens(fused):
    # A token of size s must weigh in attention like s copies of itself (Appendix A).
    attn = small_vit().blocks[0].attn
    attn.fused_attn = fused
    x = torch.randn(1, 4, 48)
    size = torch.tensor([[1.0, 3.0, 1.0, 2.0]])
    with torch.no_grad():
        out, _, _ = attention_with_keys(attn, x, size.log()[:, None, None, :])
        repeated = x[:, [0, 1, 1, 1, 2, 3, 3]]
        ref, _, _ = attention_with_keys(attn, repeated, None)
    assert torch.allclose(out, ref[:, [0, 1, 4, 5]], atol=1e-5)


def test_metric_is_head_mean_of_keys():
    attn = small_vit().blocks[0].attn
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        _, metric, _ = attention_with_keys(attn, x, None)
        k = attn.qkv(x).reshape(2, 5, 3, 3, 16)[:, :, 1]  # [B, N, heads, head_dim]
    assert torch.allclose(metric, k.mean(2), atol=1e-6)


def test_cls_and_distillation_tokens_are_never_merged():
    model = small_vit(class_token=True, reg_tokens=1)  # two protected tokens
    x = blocky_images(3, cells=2)
    with torch.no_grad():
        atmerge.patch(model, atmerge.ATM(alpha=0.5, beta=0.2, theta_min=0.0, split_layer=2), trace_source=True)
        model(x)
    source = atmerge.merge_source(model)
    assert torch.equal(source[:, 0], torch.eye(source.shape[-1])[0].expand(3, -1))
    assert torch.equal(source[:, 1], torch.eye(source.shape[-1])[1].expand(3, -1))
    assert sum(atmerge.last_stats(model).merged_per_block) > 20


def test_size_distinctive_blocks_never_merge_two_large_tokens():
    torch.manual_seed(3)
    method = atmerge.ATM(alpha=0.0, beta=0.0, theta_min=0.0, split_layer=0)  # merge every pair above 0
    for _ in range(20):
        size = torch.randint(1, 30, (4, 41)).float()
        metric = torch.randn(4, 41, 8)
        d = method.decide(BlockContext(5, 12, metric, size, 1))
        merge = d.merge
        a_pos = merge.a_idx.gather(1, merge.src)
        b_sizes = size.gather(1, merge.b_idx)
        src_sizes = size.gather(1, a_pos)
        # every merged pair joins a token of the smaller half with one of the larger half
        assert (src_sizes.max(1).values <= b_sizes.min(1).values).all()
        a_sorted, _ = size_distinctive_split(size, 1)
        assert torch.equal(merge.a_idx, a_sorted)
        assert (merge.a_idx >= 1).all() and (merge.b_idx >= 1).all()


def test_last_block_keeps_only_cls_for_token_pooling_and_all_for_avg():
    x = blocky_images(2)
    method = atmerge.ATM(alpha=0.9, beta=0.05, theta_min=0.5)
    token = atmerge.patch(small_vit(), method)
    avg = atmerge.patch(small_vit(global_pool="avg"), method)
    with torch.no_grad():
        token(x), avg(x)
    st, sa = atmerge.last_stats(token), atmerge.last_stats(avg)
    assert st.tokens_mlp_per_block[-1] == 1.0
    assert sa.tokens_mlp_per_block[-1] > 1.0
    assert sa.tokens_per_block[1:] == sa.tokens_mlp_per_block[:-1]


def test_stats_are_consistent():
    model = small_vit()
    with torch.no_grad():
        atmerge.patch(model, atmerge.ATM(alpha=0.95, beta=0.05, theta_min=0.6))
        model(blocky_images(4))
    s = atmerge.last_stats(model)
    assert s.batch_size == 4 and len(s.tokens_per_block) == 6
    assert s.tokens_per_block[0] == 65.0
    for i in range(5):
        assert s.tokens_per_block[i + 1] == s.tokens_per_block[i] - s.merged_per_block[i]
    assert s.thresholds[:5] == pytest.approx(atmerge.ATM(alpha=0.95, beta=0.05, theta_min=0.6).thresholds(6)[:5])
    assert s.merged_per_block[-1] == 0 and s.tokens_mlp_per_block[-1] == 1.0  # last block: CLS only
    assert 0 < s.gflops < atmerge.gflops(small_vit(), (3, 32, 32))
    assert s.to_dict()["gflops"] == s.gflops


def test_dense_tokens_spread_groups_back_to_the_grid():
    model = small_vit(global_pool="", num_classes=0)
    x = blocky_images(2)
    with torch.no_grad():
        atmerge.patch(model, atmerge.ATM(alpha=1.0, beta=0.01, theta_min=0.9), trace_source=True)
        merged = model.forward_features(x)
    assert 5 < merged.shape[1] < 60
    dense = atmerge.dense_tokens(model, merged)
    source = atmerge.merge_source(model)
    assert dense.shape == (2, 65, 48) and merged.shape[1] < 65
    for b in range(2):
        for i, row in enumerate(source[b]):
            for j in torch.nonzero(row).flatten().tolist():
                assert torch.equal(dense[b, j], merged[b, i])
    with pytest.raises(ValueError, match="do not match"):
        atmerge.dense_tokens(model, merged[:, :-1])


def test_shared_dinov2_weights_raw_keys_merge_far_more_than_centred():
    from conftest import require_shared
    from atmerge import checkpoints, data
    from PIL import Image

    require_shared("models/dinov2_small_imgfocus.safetensors")
    require_shared("data/imagenet-samples.tar")
    model = checkpoints.dinov2_small()
    tf = data.model_transform(model)
    files = sorted(data.imagenet_samples_folder().iterdir())[:4]
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    assert x.shape == (4, 3, 224, 224)
    merged = {}
    with torch.no_grad():
        base = model(x)
        atmerge.patch(model, NO_MERGE)
        assert (model(x) - base).abs().max() < 1e-4
        for sim in ("raw", "centered"):
            atmerge.patch(model, atmerge.ATM(alpha=0.99, beta=0.04, theta_min=0.88, similarity=sim))
            model(x)
            merged[sim] = atmerge.last_stats(model).merged_per_block
    # raw key cosines sit near 1 in the first blocks: about half of set A merges in block 1
    assert merged["raw"][0] > 0.4 * 128 and merged["centered"][0] < 10


def test_patched_model_pickles_and_merges_the_same_in_a_fresh_process(tmp_path):
    import pickle
    import subprocess
    import sys

    model = atmerge.patch(small_vit(), atmerge.ATM(alpha=0.97, beta=0.05, theta_min=0.6))
    x = blocky_images(2)
    with torch.no_grad():
        expected = model(x)
    merged = atmerge.last_stats(model).merged_per_block
    assert sum(merged) > 0
    torch.save({"model": model, "x": x, "expected": expected, "merged": merged}, tmp_path / "patched.pt")
    copy_in_process = pickle.loads(pickle.dumps(model))
    assert copy_in_process.state_dict().keys() == model.state_dict().keys()
    check = (
        "import torch, atmerge\n"
        f"d = torch.load({str(tmp_path / 'patched.pt')!r}, weights_only=False)\n"
        "with torch.no_grad(): out = d['model'](d['x'])\n"
        "assert torch.equal(out, d['expected'])\n"
        "assert atmerge.last_stats(d['model']).merged_per_block == d['merged']\n"
        "atmerge.unpatch(d['model']); assert type(d['model']).__name__ == 'VisionTransformer'\n"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "method",
    [
        atmerge.ATM(alpha=0.97, beta=0.05, theta_min=0.6),
        atmerge.ToMe(r=6),
        atmerge.EViT(0.6, (2, 4)),
        atmerge.MCTF(r=6),
        atmerge.ZeroTP(r=4),
    ],
)
def test_low_precision_forward_is_close_to_float32(method, dtype):
    # bf16 / fp16 on the CPU: logits close to float32 relative to their scale (max |logit| ≈ 0.36
    # in this random-init model, so an absolute 0.05 would be 14%), sizes float32.  Measured
    # worst cases: bf16 4.6% (EViT), fp16 1.9% (Zero-TPrune): the selecting methods may keep
    # another token of a near tie; the merging ones stay under 2% (bf16) and 0.2% (fp16)
    model = atmerge.patch(small_vit(), method)
    x = blocky_images(4)
    with torch.no_grad():
        expected = model(x)
        merged = atmerge.last_stats(model).merged_per_block
        low = copy.deepcopy(model).to(dtype)
        out = low(x.to(dtype))
    tolerance = {torch.bfloat16: 0.06, torch.float16: 0.025}[dtype] * expected.abs().max()
    assert out.dtype == dtype and (out.float() - expected).abs().max() < tolerance
    assert atmerge.last_stats(low).merged_per_block == merged
    assert atmerge.models.patching.merge_state(low).size.dtype == torch.float32


def _assert_same(got, expected) -> None:
    """Equal nested outputs of forward_intermediates: tensors, lists, tuples and dicts."""
    assert type(got) is type(expected)
    if isinstance(got, torch.Tensor):
        assert got.shape == expected.shape and (got - expected).abs().max() < 1e-6
    elif isinstance(got, dict):
        assert got.keys() == expected.keys()
        for key in got:
            _assert_same(got[key], expected[key])
    else:
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            _assert_same(g, e)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(reg_tokens=2, init_values=0.1), dict(class_token=False, global_pool="avg")],
    ids=["cls", "registers", "no-prefix"],
)
def test_dense_intermediates_equal_the_unpatched_models_when_nothing_merges(kwargs):
    model = small_vit(**kwargs)
    x = blocky_images(2)
    calls = [
        lambda m: m.forward_intermediates(x),
        lambda m: m.forward_intermediates(x, indices=[0, 3], output_fmt="NLC", norm=True, return_prefix_tokens=True),
        lambda m: m.forward_intermediates(
            x, indices=2, intermediates_only=True, output_dict=True, return_prefix_tokens=True
        ),
        lambda m: m.forward_intermediates(x, indices=[1], stop_early=True, output_dict=True),
        lambda m: m.get_intermediate_layers(x, n=2, reshape=True, return_prefix_tokens=True, norm=True),
    ]
    with torch.no_grad():
        expected = [call(model) for call in calls]
        atmerge.patch(model, NO_MERGE)
        got = [call(model) for call in calls]
    _assert_same(got, expected)


def test_dense_intermediates_give_both_tokens_of_a_merged_pair_the_merged_value():
    # ToMe with r = 1 in the first block only; the pair and its merged value computed by hand
    model = small_vit()
    blk = model.blocks[0]
    x = blocky_images(1)
    with torch.no_grad():
        t = model.norm_pre(model._pos_embed(model.patch_embed(x)))  # tokens entering block 1
        h = blk.norm1(t)
        keys = blk.attn.qkv(h).reshape(1, 65, 3, 3, 16)[:, :, 1].mean(2)[0]  # keys' head-mean [65, 16]
        a, b = torch.arange(2, 65, 2), torch.arange(1, 65, 2)  # A = even, B = odd positions; CLS in neither
        cos = torch.nn.functional.normalize(keys[a], dim=-1) @ torch.nn.functional.normalize(keys[b], dim=-1).T
        best, partner = cos.max(1)
        i, j = a[best.argmax()].item(), b[partner[best.argmax()]].item()
        y = t + blk.attn(h)  # after attention (no LayerScale in this model)
        merged = (y[0, i] + y[0, j]) / 2
        unmerged = blk(t)[0]  # the unpatched block's output
        expected = unmerged.clone()
        expected[i] = expected[j] = merged + blk.mlp(blk.norm2(merged))
        atmerge.patch(model, atmerge.ToMe(r=[1]))
        dense = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)[0][0]
    assert dense.shape == (64, 48) and torch.equal(dense[i - 1], dense[j - 1])
    assert (dense - expected[1:]).abs().max() < 1e-5 and (expected[i] - unmerged[i]).abs().max() > 1e-2


def test_dense_intermediates_of_pruned_patches_are_zero_and_the_model_still_prunes_afterwards():
    model = atmerge.patch(small_vit(), atmerge.ZeroTP(r=[4]))
    x = blocky_images(2)
    with torch.no_grad():
        final, (first, *_) = model.forward_intermediates(x, output_fmt="NLC")
        assert final.shape == (2, 65, 48) and first.shape == (2, 64, 48)
        assert ((first == 0).all(-1).sum(-1) == 4).all()  # Zero-TP dropped four patches in block 1
        model(x)
    assert atmerge.last_stats(model).tokens_mlp_per_block[-1] == 1  # CLS-only last block again
    assert atmerge.merge_source(model) is None  # source tracking was on for the dense pass only


@pytest.mark.parametrize("batch_adaptive", [True, False], ids=["batch-adaptive", "per-image"])
def test_dense_final_features_equal_dense_tokens_of_forward_features(batch_adaptive):
    method = atmerge.ATM(alpha=0.97, beta=0.05, theta_min=0.6, batch_adaptive=batch_adaptive)
    model = atmerge.patch(small_vit(global_pool="", num_classes=0), method, trace_source=True)
    x = blocky_images(3)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        spread = atmerge.dense_tokens(model, model.forward_features(x))
        last_block = model.norm(maps[-1].flatten(2).transpose(1, 2))  # the last map, normed like the features
    assert sum(atmerge.last_stats(model).merged_per_block) > 0
    assert final.shape == spread.shape == (3, 65, 48) and (final - spread).abs().max() < 1e-6
    assert len(maps) == 6 and maps[-1].shape == (3, 48, 8, 8) and (last_block - final[:, 1:]).abs().max() < 1e-5
