"""Hugging Face transformers ViTs: the same API as timm models, and the same numbers as a timm
twin holding the same (random, converted) weights.  Tiny configs built in code, no downloads."""

import copy
import logging
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

import atmerge  # noqa: E402
from atmerge.models import hf_vit  # noqa: E402
from atmerge.models.adapter import adapter_for  # noqa: E402
from conftest import blocky_images  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

TINY = dict(
    hidden_size=48, num_hidden_layers=4, num_attention_heads=3, image_size=32, patch_size=4, layer_norm_eps=1e-6
)
TIMM_TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3)
NO_MERGE = atmerge.ATM(alpha=1.0, beta=0.0, theta_min=1.0)
MERGING = atmerge.ATM(alpha=0.99, beta=0.04, theta_min=0.5)
# parity tolerance (float32): the two libraries may order an operation differently (q·scale·kᵀ vs
# (q·kᵀ)·scale); on these configs (head_dim 16, a power-of-two scale) the outputs are bit-identical
ATOL = 1e-5


def hf_model(cls_name: str, attn: str = "sdpa") -> torch.nn.Module:
    """A random-init tiny model of the named transformers class."""
    cls = getattr(transformers, cls_name)
    family = cls_name.split("For")[0].replace("Model", "").replace("WithProjection", "")
    config_cls = {"ViT": "ViTConfig", "DeiT": "DeiTConfig", "Dinov2": "Dinov2Config", "CLIPVision": "CLIPVisionConfig"}
    extra = {"num_labels": 10} if "Classification" in cls_name else {}
    if family == "CLIPVision":
        extra["projection_dim"] = 16
    if family != "Dinov2":
        extra["intermediate_size"] = 192
    config = getattr(transformers, config_cls[family])(**TINY, **extra, attn_implementation=attn)
    return cls(config).eval()


HF_CLASSES = [
    "ViTModel",
    "ViTForImageClassification",
    "DeiTModel",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
    "Dinov2Model",
    "Dinov2ForImageClassification",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
]
METHODS = [
    atmerge.ATM(alpha=0.9, beta=0.04, theta_min=0.3),
    atmerge.ToMe(r=6),
    atmerge.TopR("increasing", 4),
    atmerge.ConstantThreshold(0.6),
    atmerge.EViT(keep_rate=0.7, locations=(2, 3)),
    atmerge.MCTF(r=6, blocks=(2, 3, 4)),
    atmerge.ZeroTP(r=4),
    atmerge.ATM(alpha=0.9, beta=0.04, theta_min=0.3, batch_adaptive=False),
]


def main_output(out) -> torch.Tensor:
    """logits / image_embeds / pooler_output: what the model is for."""
    for name in ("logits", "image_embeds", "pooler_output", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(f"no output in {list(out.keys())}")


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights: timm's init leaves biases at 0 and LayerScale at 1e-5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            scale = name.endswith(("gamma", "norm1.weight", "norm2.weight", "norm.weight"))
            p.copy_(1 + 0.2 * noise if scale else p + 0.05 * noise)
    return model


def timm_to_hf(state: dict, *, prefix: str, layers: str, names: dict, top: dict) -> dict:
    """timm ViT state_dict keys → an HF model's: qkv split into q/k/v, ``names`` maps a block's
    timm parts to the HF layer's (found under ``prefix + layers``), ``top`` the keys outside the
    blocks to the HF model's."""
    out = {hf: state[key] for key, hf in top.items() if key in state}
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"{prefix}{layers}.{i}."
        for kind in ("weight", "bias"):
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), state[f"{src}attn.qkv.{kind}"].chunk(3)):
                out[f"{dst}{names['attn']}.{part}.{kind}"] = chunk
        for key in (k for k in state if k.startswith(src) and ".qkv." not in k):
            rest = key[len(src) :]
            part = next(p for p in sorted(names, key=len, reverse=True) if rest.startswith(p + ".") or rest == p)
            out[dst + names[part] + rest[len(part) :]] = state[key]
    return out


DEIT_NAMES = {
    "norm1": "layernorm_before",
    "attn": "attention",
    "attn.proj": "attention.o_proj",
    "norm2": "layernorm_after",
    "mlp": "mlp",
}
DINO_NAMES = {
    "norm1": "norm1",
    "attn": "attention",
    "attn.proj": "attention.o_proj",
    "norm2": "norm2",
    "mlp": "mlp",
    "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1",
}
EMBED = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}


def load(hf: torch.nn.Module, converted: dict, allowed_missing: tuple[str, ...] = ()) -> torch.nn.Module:
    missing, unexpected = hf.load_state_dict(converted, strict=False)
    assert not unexpected and all(k.endswith(allowed_missing) for k in missing), (missing, unexpected)
    return hf


def deit_twins(attn: str):
    """A timm distilled DeiT and an HF DeiTForImageClassificationWithTeacher with its weights."""
    timm_model = randomise(VisionTransformerDistilled(**TIMM_TINY, num_classes=10)).eval()
    for block in timm_model.blocks:
        block.attn.fused_attn = attn == "sdpa"
    top = {
        **{k: "deit." + v for k, v in EMBED.items()},
        "dist_token": "deit.embeddings.distillation_token",
        "head.weight": "cls_classifier.weight",
        "head.bias": "cls_classifier.bias",
        "head_dist.weight": "distillation_classifier.weight",
        "head_dist.bias": "distillation_classifier.bias",
    }
    converted = timm_to_hf(timm_model.state_dict(), prefix="deit.", layers="layers", names=DEIT_NAMES, top=top)
    return timm_model, load(hf_model("DeiTForImageClassificationWithTeacher", attn), converted)


def dinov2_twins(attn: str, hf_class: str):
    """A timm DINOv2-like ViT (LayerScale, average pooling of the patch tokens after the final
    norm) and an HF Dinov2Model / Dinov2ForImageClassification with its weights."""
    timm_model = VisionTransformer(**TIMM_TINY, init_values=1e-5, global_pool="avg", fc_norm=False, num_classes=0)
    timm_model = randomise(timm_model).eval()
    for block in timm_model.blocks:
        block.attn.fused_attn = attn == "sdpa"
    prefix = "dinov2." if hf_class == "Dinov2ForImageClassification" else ""
    top = {k: prefix + v for k, v in EMBED.items()}
    converted = timm_to_hf(timm_model.state_dict(), prefix=prefix, layers="encoder.layer", names=DINO_NAMES, top=top)
    not_in_timm = ("mask_token", "classifier.weight", "classifier.bias")
    return timm_model, load(hf_model(hf_class, attn), converted, allowed_missing=not_in_timm)


def run(model, x, method=None, **options):
    if method is not None:
        atmerge.patch(model, method, **options)
    with torch.no_grad():
        return model(x)


# ----------------------------------------------------------------------------- parity with timm


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method", [None, MERGING, atmerge.ToMe(r=6)], ids=["unpatched", "ATM", "ToMe"])
def test_deit_twins_give_the_same_outputs_token_counts_and_gflops(attn, method):
    timm_model, hf = deit_twins(attn)
    x = blocky_images(4)
    expected, got = run(timm_model, x, method), run(hf, x, method).logits
    assert (got - expected).abs().max() < ATOL
    if method is not None:
        ours, theirs = atmerge.last_stats(hf), atmerge.last_stats(timm_model)
        assert ours.tokens_per_block == theirs.tokens_per_block and ours.tokens_per_block[-1] < 66
        assert ours.tokens_mlp_per_block == theirs.tokens_mlp_per_block
        assert ours.gflops == pytest.approx(theirs.gflops, rel=1e-12)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method", [None, MERGING, atmerge.ToMe(r=6)], ids=["unpatched", "ATM", "ToMe"])
def test_dinov2_twins_give_the_same_tokens_pooled_output_and_token_counts(attn, method):
    timm_model, hf = dinov2_twins(attn, "Dinov2Model")
    x = blocky_images(4)
    with torch.no_grad():
        if method is not None:
            atmerge.patch(timm_model, method)
        tokens = timm_model.forward_features(x)
    out = run(hf, x, method)
    assert out.last_hidden_state.shape == tokens.shape  # the same merged tokens in the same order
    assert (out.last_hidden_state - tokens).abs().max() < ATOL
    assert (out.pooler_output - tokens[:, 0]).abs().max() < ATOL
    if method is not None:
        ours, theirs = atmerge.last_stats(hf), atmerge.last_stats(timm_model)
        assert ours.tokens_per_block == theirs.tokens_per_block and tokens.shape[1] < 65
        assert ours.gflops == pytest.approx(theirs.gflops, rel=1e-12)


@pytest.mark.parametrize("method", [None, MERGING, atmerge.ToMe(r=6)], ids=["unpatched", "ATM", "ToMe"])
def test_dinov2_classifier_pools_patch_tokens_by_merge_size_as_timm_avg_pooling_does(method):
    timm_model, hf = dinov2_twins("sdpa", "Dinov2ForImageClassification")
    x = blocky_images(4)
    with torch.no_grad():
        if method is not None:
            atmerge.patch(timm_model, method)
        tokens = timm_model.forward_features(x)
        mean = timm_model.forward_head(tokens, pre_logits=True)  # size-weighted when patched
        expected = hf.classifier(torch.cat([tokens[:, 0], mean], dim=1))
    assert (run(hf, x, method).logits - expected).abs().max() < ATOL
    if method is not None:
        assert atmerge.last_stats(hf).tokens_mlp_per_block[-1] == tokens.shape[1] < 65  # last block keeps all


# ----------------------------------------------------------------------------- every class, every method


@pytest.mark.parametrize("cls_name", HF_CLASSES)
def test_merging_nothing_equals_unpatched_and_unpatch_is_exact(cls_name):
    model, x = hf_model(cls_name), torch.randn(2, 3, 32, 32)
    before = main_output(run(model, x))
    nothing = run(model, x, NO_MERGE)
    assert sum(atmerge.last_stats(model).merged_per_block) == 0
    assert (main_output(nothing) - before).abs().max() < 1e-5
    run(model, x, atmerge.ToMe(r=8))
    atmerge.unpatch(model)
    assert torch.equal(main_output(run(model, x)), before)
    assert not any(type(m).__name__.startswith("Merging") for m in model.modules())


@pytest.mark.parametrize("cls_name", HF_CLASSES)
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.label())
def test_every_method_runs_and_counts_its_gflops(cls_name, method):
    model, x = hf_model(cls_name), blocky_images(3)
    dense = atmerge.gflops(model, (3, 32, 32))
    out = run(model, x, method, trace_source=True)
    stats = atmerge.last_stats(model)
    assert stats.tokens_per_block[-1] < stats.tokens_per_block[0] and 0 < stats.gflops < dense
    assert main_output(out).isfinite().all()
    if getattr(out, "last_hidden_state", None) is not None:  # fewer tokens: one per merged group
        assert out.last_hidden_state.shape[1] == atmerge.merge_source(model).shape[1] < 65


@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "Dinov2ForImageClassification", "CLIPVisionModel"])
@pytest.mark.parametrize(
    "method",
    [MERGING, atmerge.MCTF(r=6, blocks=(2, 3, 4)), atmerge.EViT(locations=(2, 3))],
    ids=["ATM", "MCTF", "EViT"],
)
def test_eager_and_sdpa_give_the_same_patched_outputs(cls_name, method):
    eager, sdpa = hf_model(cls_name, "eager"), hf_model(cls_name, "sdpa")
    sdpa.load_state_dict(eager.state_dict())
    x = blocky_images(3)
    a, b = main_output(run(eager, x, method)), main_output(run(sdpa, x, method))
    assert (a - b).abs().max() < ATOL
    assert atmerge.last_stats(eager).tokens_per_block == atmerge.last_stats(sdpa).tokens_per_block


def test_protected_tokens_cls_pooling_and_the_last_block():
    deit = hf_model("DeiTForImageClassificationWithTeacher")
    adapter = adapter_for(deit)
    assert (adapter.num_protected(deit), adapter.cls_pooled(deit), adapter.num_patches(deit)) == (2, True, 64)
    run(deit, blocky_images(2), atmerge.ToMe(r=8), trace_source=True)
    source = atmerge.merge_source(deit)
    assert torch.equal(source[:, :2, :2], torch.eye(2).expand(2, 2, 2)) and (source[:, :2].sum(-1) == 1).all()
    assert atmerge.last_stats(deit).tokens_mlp_per_block[-1] == 2
    for name in ("DeiTModel", "Dinov2ForImageClassification", "CLIPVisionModelWithProjection"):
        model = hf_model(name)
        assert not adapter_for(model).cls_pooled(model)
        with pytest.raises(ValueError, match="does not pool with CLS"):
            atmerge.patch(model, atmerge.ToMe(r=2), prune_last_block=True)


# ----------------------------------------------------------------------------- outputs, options


def test_hidden_states_and_attentions_are_those_of_the_merged_tokens():
    model, x = hf_model("ViTModel", "eager"), blocky_images(2)
    atmerge.patch(model, atmerge.ToMe(r=8))
    with torch.no_grad():
        out = model(x, output_hidden_states=True, output_attentions=True)
    tokens = atmerge.last_stats(model).tokens_per_block  # 65, 57, 49, 41
    assert [h.shape[1] for h in out.hidden_states] == [*tokens, tokens[-1] - 8]
    assert [a.shape[-1] for a in out.attentions] == tokens
    assert all(torch.allclose(a.sum(-1), torch.ones(())) for a in out.attentions)


def test_pooled_output_and_dense_tokens_of_a_feature_model():
    model, x = hf_model("ViTModel"), blocky_images(2)
    out = run(model, x, atmerge.ToMe(r=8), trace_source=True)
    assert out.pooler_output.shape == (2, 48) and out.last_hidden_state.shape == (2, 65 - 32, 48)
    dense = atmerge.dense_tokens(model, out.last_hidden_state)
    assert dense.shape == (2, 65, 48)


def test_patched_model_deep_copies_and_pickles():
    model, x = hf_model("Dinov2ForImageClassification"), blocky_images(2)
    expected = run(model, x, MERGING).logits
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(run(clone, x).logits, expected)
        assert atmerge.last_stats(clone).tokens_per_block == atmerge.last_stats(model).tokens_per_block
    assert hf_vit.__getattr__("MergingDinov2Layer").__mro__[1] is transformers.models.dinov2.modeling_dinov2.Dinov2Layer


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_training_forward_and_backward_run_and_checkpointing_gives_the_same_gradients(use_reentrant):
    model, x = hf_model("DeiTForImageClassification"), blocky_images(2)
    atmerge.patch(model, atmerge.ToMe(r=8))
    model.train()
    model(x).logits.sum().backward()
    assert atmerge.last_stats(model).tokens_per_block == [66, 58, 50, 42]
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:  # reentrant checkpointing needs an input that requires grad
        model.enable_input_require_grads()
    runs = []
    hf_vit.layers(model)[-1].layernorm_after.register_forward_hook(lambda *_: runs.append(1))
    model(x).logits.sum().backward()  # the recomputation merges as the forward pass did
    assert len(runs) == 2  # the last layer ran again in the backward pass
    assert atmerge.last_stats(model).tokens_per_block == [66, 58, 50, 42]
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_padding_mask_follows_merges_with_a_batch_adaptive_method():
    model, x = hf_model("ViTModel", "eager"), blocky_images(2)
    mask = torch.ones(2, 65)
    mask[:, -3:] = 0
    expected = model(x, attention_mask=mask).last_hidden_state
    atmerge.patch(model, NO_MERGE)
    torch.testing.assert_close(model(x, attention_mask=mask).last_hidden_state[:, :62], expected[:, :62])
    # ToMe no longer refuses the mask once it merges (that a padded image then equals the same
    # image unpadded is checked for every registered method in tests/test_interfaces.py)
    atmerge.patch(model, atmerge.ToMe(r=4))
    padded = model(x, attention_mask=mask)
    assert padded.last_hidden_state.shape[0] == 2 and torch.isfinite(padded.last_hidden_state).all()


# ----------------------------------------------------------------------------- refusals


def test_unsupported_models_and_attention_implementations_are_refused_by_name():
    config = transformers.ViTConfig(**TINY)
    refused = r"atmerge patches these Hugging Face models: ViTModel, .*got ViTForMaskedImageModeling"
    with pytest.raises(atmerge.UnsupportedModelError, match=refused):
        atmerge.patch(transformers.ViTForMaskedImageModeling(config), atmerge.ToMe(r=2))
    model = hf_model("ViTModel")
    model.config._attn_implementation = "flash_attention_2"
    refused = r"attn_implementation='flash_attention_2' is not supported; supported: 'eager', 'sdpa'"
    with pytest.raises(atmerge.UnsupportedModelError, match=refused):
        atmerge.patch(model, atmerge.ToMe(r=2))
    model.config._attn_implementation = "sdpa"
    atmerge.patch(model, atmerge.ToMe(r=2))
    model.config._attn_implementation = "flash_attention_2"  # changed after patching
    with pytest.raises(atmerge.UnsupportedModelError, match="supported: 'eager', 'sdpa'"):
        run(model, torch.randn(1, 3, 32, 32))


def test_images_are_checked_against_the_models_config():
    adapter = adapter_for(hf_model("ViTModel"))
    vit, dino = hf_model("ViTModel"), hf_model("Dinov2Model")
    assert adapter.check_images(dino, torch.zeros(1, 3, 48, 64)) == (12, 16)  # DINOv2 takes any multiple of 4
    with pytest.raises(ValueError, match=r"images of shape \[1, 3, 48, 64\] given; this model takes \[B, 3, 32, 32\]"):
        adapter.check_images(vit, torch.zeros(1, 3, 48, 64))
    with pytest.raises(ValueError, match="H, W multiples of 4"):
        atmerge.gflops(dino, (3, 30, 32))
    with pytest.raises(TypeError, match="floating-point tensor"):
        adapter.check_images(vit, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


# ----------------------------------------------------------------------------- FLOPs against fvcore


def fvcore_gflops(model: torch.nn.Module, x: torch.Tensor) -> float:
    from fvcore.nn import FlopCountAnalysis

    class Main(torch.nn.Module):  # fvcore traces a module returning tensors
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            return main_output(self.inner(images))

    logging.disable(logging.WARNING)
    try:
        analysis = FlopCountAnalysis(Main(model), x)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return analysis.total() / 1e9
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize("cls_name", HF_CLASSES)
def test_dense_gflops_equal_fvcores_count(cls_name):
    model = hf_model(cls_name, "eager")  # fvcore sees the attention matmuls only in eager attention
    assert atmerge.gflops(model, (3, 32, 32)) == pytest.approx(
        fvcore_gflops(model, torch.randn(1, 3, 32, 32)), rel=1e-6
    )


@pytest.mark.parametrize(
    "cls_name",
    ["DeiTForImageClassificationWithTeacher", "Dinov2ForImageClassification", "CLIPVisionModelWithProjection"],
)
@pytest.mark.parametrize("method", [METHODS[0], atmerge.ToMe(r=6)], ids=["ATM", "ToMe"])
def test_patched_gflops_equal_fvcores_trace_of_the_merging_forward(cls_name, method):
    # fvcore counts the traced merging forward, the matching's similarity matmul included (which
    # we report apart); in a block that merges nothing the trace drops that matmul as dead code,
    # so these settings merge in every block
    model, x = hf_model(cls_name, "eager"), blocky_images(1)
    run(model, x, method)
    stats = atmerge.last_stats(model)
    decided = stats.merged_per_block[:-1] if stats.prune_last_block else stats.merged_per_block
    assert all(r > 0 for r in decided)
    assert stats.gflops + stats.matching_gflops == pytest.approx(fvcore_gflops(model, x), rel=1e-6)


@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "ViTModel", "CLIPVisionModelWithProjection"])
def test_evaluate_and_calibrate_judge_the_main_output(cls_name):
    """evaluate and calibrate read logits / image_embeds / pooler_output; a model without a
    class head is judged by cosine, a classifier by agreement."""
    model = randomise(hf_model(cls_name))
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = main_output(model(pixel_values=x))
    res, outputs = atmerge.evaluate(model, [x], keep_outputs=True)
    assert torch.equal(outputs[0], expected) and res.gflops == pytest.approx(atmerge.gflops(model, (3, 32, 32)))
    c = atmerge.calibrate(model, x, method="tome", budget=0.7, trials=3, batch_size=6, holdout=0)
    assert c.measure == ("agreement" if cls_name.endswith("Classification") else "cosine")
    assert c.met and c.gflops <= 0.7 * res.gflops  # ToMe reaches 70% of the cost on these models
