"""A patched model keeps the interfaces of timm's and transformers' own models:
forward_features returns every token left after merging and the head reads it as forward does;
torch.jit.script and torch.fx are refused with one clear line and leave the model usable;
Hugging Face key-padding attention masks follow merges; Hugging Face gradient checkpointing
recomputes the merges of the forward pass.  Tiny random-weight models, no downloads."""

import dataclasses

import pytest
import timm
import torch

import atmerge
from atmerge.methods.registry import METHODS, knob_factory
from atmerge.models.adapter import adapter_for
from atmerge.models.patching import merge_state
from conftest import blocky_images

TIMM_FAMILIES = [
    "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "vit_tiny_patch16_224",
    "deit3_small_patch16_224",
    "lvvit_t",
    "t2t_vit_t_14",
    "mae_vit_base_ft",
]
SMALL = dict(depth=3, img_size=64, num_classes=10)  # 4×4 patches of 16 px
NO_MERGE = atmerge.ATM(alpha=1.0, beta=0.0, theta_min=1.0)
SCRIPT_LINE = r"torch.jit.script does not support a model patched by atmerge.*torch.compile.*torch.export"
FX_LINE = r"torch.fx symbolic tracing .* does not support a model patched by atmerge.*torch.compile.*torch.export"


def timm_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **SMALL).eval()


def registry_method(name: str, model: torch.nn.Module):
    """The registry's method ``name`` at a setting that reduces tokens on a small model: its
    one-knob family at t = 0.3, or (a method without one, e.g. a frozen schedule) 2 merges a block."""
    adapter = adapter_for(model)
    depth = len(adapter.blocks(model))
    try:
        return knob_factory(name, depth, adapter.num_patches(model))(0.3)
    except NotImplementedError:
        if "counts" not in {f.name for f in dataclasses.fields(METHODS[name])}:
            raise
        return METHODS[name](counts=(2,) * depth)


# ----------------------------------------------------------------------------- forward_features


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_forward_features_keeps_the_merged_tokens_and_the_head_reads_them_as_forward_does(name, method_name):
    model = timm_model(name)
    x = blocky_images(2, size=64)
    atmerge.patch(model, registry_method(method_name, model))
    p, cls_pooled = model.num_prefix_tokens, adapter_for(model).cls_pooled(model)
    with torch.no_grad():
        out = model(x)
        forward_stats = atmerge.last_stats(model)
        tokens = model.forward_features(x)
        features_stats = atmerge.last_stats(model)
        through_head = model.forward_head(tokens)
    torch.testing.assert_close(through_head, out, rtol=1e-5, atol=1e-5)
    assert tokens.shape[0] == 2 and tokens.shape[2] == model.embed_dim
    assert tokens.shape[1] > p and tokens.shape[1] == features_stats.tokens_mlp_per_block[-1]
    assert not features_stats.prune_last_block
    # the merges before the last block are those of forward; the CLS-only last block only in forward
    assert features_stats.tokens_per_block == forward_stats.tokens_per_block
    assert forward_stats.prune_last_block == cls_pooled
    if cls_pooled:
        assert forward_stats.tokens_mlp_per_block[-1] == p


@pytest.mark.parametrize("name", TIMM_FAMILIES)
def test_forward_features_merging_nothing_equals_the_unpatched_tokens(name):
    model = timm_model(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected_tokens, expected_out = model.forward_features(x), model(x)
        atmerge.patch(model, NO_MERGE)
        tokens, out = model.forward_features(x), model(x)
    assert tokens.shape == expected_tokens.shape == (2, 16 + model.num_prefix_tokens, model.embed_dim)
    torch.testing.assert_close(tokens, expected_tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "t2t_vit_t_14"])
def test_gflops_keep_the_last_block_saving_in_forward_and_describe_forward_features_alone(name):
    x = blocky_images(2, size=64)
    pruned, kept = timm_model(name), timm_model(name)
    atmerge.patch(pruned, atmerge.ToMe(r=3))
    atmerge.patch(kept, atmerge.ToMe(r=3), prune_last_block=False)
    cost = adapter_for(kept).cost(kept)
    assert cost.pool_per_token == 0  # CLS pooling: the head costs the same for any token count
    with torch.no_grad():
        kept(x)
        every_token = atmerge.last_stats(kept)
        pruned(x)
        forward_stats = atmerge.last_stats(pruned)
        pruned.forward_features(x)
        features_stats = atmerge.last_stats(pruned)
    p = pruned.num_prefix_tokens
    assert forward_stats.tokens_mlp_per_block[-1] == p < every_token.tokens_mlp_per_block[-1]
    assert forward_stats.gflops < every_token.gflops  # the saving stays in forward
    # forward_features ran every block on every token and no head
    assert features_stats.tokens_mlp_per_block == every_token.tokens_mlp_per_block
    assert features_stats.gflops == pytest.approx(every_token.gflops - cost.head / 1e9, rel=1e-9)


def test_forward_intermediates_spreads_the_final_tokens_while_forward_features_holds_merged_ones():
    model = timm_model("deit_tiny_patch16_224")
    x = blocky_images(2, size=64)
    atmerge.patch(model, atmerge.ToMe(r=3))
    with torch.no_grad():
        final, _ = model.forward_intermediates(x, output_fmt="NLC")
        tokens = model.forward_features(x)
    assert final.shape == (2, 17, model.embed_dim)  # spread back over the grid
    assert tokens.shape == (2, 17 - 3 * 3, model.embed_dim)  # r = 3 in each of 3 blocks


# ----------------------------------------------------------------------------- TorchScript and FX


def _transformers():
    return pytest.importorskip("transformers")


def hf_vit(cls_name: str = "ViTForImageClassification", attn: str = "sdpa", layers: int = 4) -> torch.nn.Module:
    transformers = _transformers()
    torch.manual_seed(0)
    family = cls_name.split("For")[0].replace("Model", "")
    config_cls = {"ViT": "ViTConfig", "DeiT": "DeiTConfig", "Dinov2": "Dinov2Config", "CLIPVision": "CLIPVisionConfig"}
    extra = {"num_labels": 10} if "Classification" in cls_name else {}
    if family != "Dinov2":
        extra["intermediate_size"] = 96
    config = getattr(transformers, config_cls[family])(
        hidden_size=48,
        num_hidden_layers=layers,
        num_attention_heads=3,
        image_size=32,
        patch_size=4,
        layer_norm_eps=1e-6,
        attn_implementation=attn,
        **extra,
    )
    return getattr(transformers, cls_name)(config).eval()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("family", ["timm", "timm_distilled", "hf"])
def test_torchscript_is_refused_in_one_line_and_the_model_stays_usable(family):
    if family == "hf":
        model, x = hf_vit(), torch.randn(2, 3, 32, 32)
        block = model.vit.layers[0]
    else:
        model = timm_model("deit_tiny_distilled_patch16_224" if family == "timm_distilled" else "deit_tiny_patch16_224")
        x, block = torch.randn(2, 3, 64, 64), None
    atmerge.patch(model, atmerge.ToMe(r=2))
    with torch.no_grad():
        before = model(x)
    for _ in range(2):  # a second attempt says the same (nothing was half-compiled)
        with pytest.raises(RuntimeError, match=SCRIPT_LINE):
            torch.jit.script(model)
    if block is None:
        block = model.blocks[0]
    with pytest.raises(RuntimeError, match=SCRIPT_LINE):
        torch.jit.script(block)
    with torch.no_grad():
        after = model(x)
    main = (lambda o: o.logits) if family == "hf" else (lambda o: o)
    assert torch.equal(main(after), main(before))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_an_unpatched_block_still_scripts_so_the_refusal_is_the_patchs():
    model = timm_model("deit_tiny_patch16_224")
    torch.jit.script(model.blocks[0])  # timm's own Block is scriptable
    atmerge.patch(model, atmerge.ToMe(r=2))
    atmerge.unpatch(model)
    torch.jit.script(model.blocks[0])


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "lvvit_t"])
def test_fx_tracing_is_refused_in_one_line_and_the_model_stays_usable(name):
    from timm.models import create_feature_extractor

    model = timm_model(name)
    x = torch.randn(2, 3, 64, 64)
    torch.fx.symbolic_trace(model.blocks[0])  # the unpatched block traces: the refusal is the patch's
    atmerge.patch(model, atmerge.ToMe(r=2))
    with torch.no_grad():
        before = model(x)
    with pytest.raises(RuntimeError, match=FX_LINE):
        torch.fx.symbolic_trace(model)
    with pytest.raises(RuntimeError, match=FX_LINE):
        create_feature_extractor(model, return_nodes=["blocks.1"])
    assert model.training  # torchvision's extractor traces in train mode and leaves it so when tracing fails
    model.eval()
    with pytest.raises(RuntimeError, match=FX_LINE):
        torch.fx.symbolic_trace(model.blocks[0])
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_fx_tracing_a_patched_hugging_face_layer_is_refused_in_one_line():
    model = hf_vit("ViTModel")
    atmerge.patch(model, atmerge.ToMe(r=2))
    with pytest.raises(RuntimeError, match=FX_LINE):
        torch.fx.symbolic_trace(model.layers[0])


# ----------------------------------------------------------------------------- Hugging Face masks

PER_IMAGE_NO_MERGE = atmerge.ATM(alpha=1.0, beta=0.0, theta_min=1.0, batch_adaptive=False)
PER_IMAGE = atmerge.ATM(alpha=0.99, beta=0.04, theta_min=0.5, batch_adaptive=False)
TOKENS = 65  # CLS + 8×8 patches


def padding_mask(kept: tuple[int, ...], kind: str = "long", tokens: int = TOKENS) -> torch.Tensor:
    """[B, tokens]: image b keeps its first kept[b] tokens, the rest is padding."""
    mask = torch.arange(tokens)[None, :] < torch.tensor(kept)[:, None]
    return mask if kind == "bool" else mask.to(torch.long if kind == "long" else torch.float32)


@pytest.mark.parametrize("kind", ["long", "bool", "float"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", ["ViTModel", "DeiTModel", "Dinov2Model"])
def test_a_key_padding_mask_merging_nothing_equals_the_unpatched_model_on_the_kept_tokens(cls_name, attn, kind):
    model, x = hf_vit(cls_name, attn), torch.randn(2, 3, 32, 32)
    p = 2 if cls_name == "DeiTModel" else 1
    kept = (TOKENS + p - 1, 40 + p)
    mask = padding_mask(kept, kind, TOKENS + p - 1)  # DeiT has a distillation token too
    with torch.no_grad():
        expected = model(x, attention_mask=mask).last_hidden_state
        atmerge.patch(model, PER_IMAGE_NO_MERGE)
        got = model(x, attention_mask=mask).last_hidden_state
    stats = atmerge.last_stats(model)
    assert sum(stats.merged_per_block) == 0 and stats.tokens_per_block[0] == sum(kept) / 2  # padding not counted
    for b, n in enumerate(kept):
        torch.testing.assert_close(got[b, :n], expected[b, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", ["ViTModel", "Dinov2Model"])
def test_a_padded_input_merges_as_the_same_input_unpadded(cls_name, attn):
    model, x = hf_vit(cls_name, attn), blocky_images(2)
    atmerge.patch(model, PER_IMAGE)
    base = model.base_model
    layers = model.layers if cls_name == "ViTModel" else model.encoder.layer
    kept = 49  # CLS + the first 6 rows of patches
    with torch.no_grad():
        padded = model(x, attention_mask=padding_mask((TOKENS, kept))).last_hidden_state
        size = merge_state(model).size.clone()
        # the reference: image 1's first 49 tokens alone, through the same (patched) layers
        h = base.embeddings(x[1:])[:, :kept]
        for layer in layers:
            h = layer(h)
        alone = base.layernorm(h)
        alone_size = merge_state(model).size
    real = int((size[1] > 0).sum())
    assert real < kept  # something merged
    assert real == alone.shape[1] and torch.equal(size[1, :real], alone_size[0])
    torch.testing.assert_close(padded[1, :real], alone[0], rtol=1e-5, atol=1e-5)
    assert bool((size[1, real:] == 0).all())


def test_a_classifier_with_padding_merges_and_prunes_its_last_block():
    model, x = hf_vit("ViTForImageClassification"), blocky_images(2)
    with torch.no_grad():
        expected = model(x, attention_mask=padding_mask((TOKENS, 33))).logits
        atmerge.patch(model, PER_IMAGE_NO_MERGE)
        torch.testing.assert_close(model(x, attention_mask=padding_mask((TOKENS, 33))).logits, expected)
        atmerge.patch(model, PER_IMAGE)
        assert model(x, attention_mask=padding_mask((TOKENS, 33))).logits.shape == (2, 10)
    stats = atmerge.last_stats(model)
    assert stats.prune_last_block and stats.tokens_mlp_per_block[-1] == 1


def no_merge_method(name: str, model: torch.nn.Module):
    """The registry's method ``name`` at its one-knob family's lightest setting, made to reduce
    nothing (a constant schedule for top-r, zero counts for a frozen schedule)."""
    depth = len(adapter_for(model).blocks(model))
    fields = {f.name for f in dataclasses.fields(METHODS[name])}
    if "counts" in fields:
        return METHODS[name](counts=(0,) * depth)
    method = knob_factory(name, depth, adapter_for(model).num_patches(model))(1.0)
    return dataclasses.replace(method, schedule="constant") if "schedule" in fields else method


def run_layers_alone(model: torch.nn.Module, x: torch.Tensor, kept: int) -> torch.Tensor:
    """The first ``kept`` tokens of the embedded images x through the model's (patched) layers and
    final norm, without padding: what a padded image should merge like."""
    base = model.base_model
    h = base.embeddings(x)[:, :kept]
    for layer in adapter_for(model).blocks(model):
        h = layer(h)
    return base.layernorm(h)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_every_method_merges_a_padded_image_as_the_same_image_unpadded(method_name, attn):
    """Padding is not a token: with every registered method an image merges its real tokens as
    it would without the padding — a fixed count r merges r real tokens (clipped as for the shorter
    image), a batch-adaptive method merges the image's own count — and the image beside it as it
    would alone.  float64, so that near-ties cannot flip between the two runs."""
    model, x = hf_vit("ViTModel", attn).double(), blocky_images(2).double()
    method = registry_method(method_name, model)
    atmerge.patch(model, method)
    kept = 49  # CLS + the first 6 rows of patches
    with torch.no_grad():
        padded = model(x, attention_mask=padding_mask((TOKENS, kept))).last_hidden_state
        state = merge_state(model)
        size, merged = state.size.clone(), [c[2].tolist() for c in state.per_image_counts]
        first, first_size = model(x[:1]).last_hidden_state, merge_state(model).size.clone()
        alone, alone_size = run_layers_alone(model, x[1:], kept), merge_state(model).size.clone()
    assert size.shape[0] == 2 and sum(map(sum, merged)) > 0  # something merged
    for b, (tokens, sizes) in enumerate([(first, first_size), (alone, alone_size)]):
        real = int((size[b] > 0).sum())
        assert real == tokens.shape[1] and torch.equal(size[b, :real], sizes[0])
        torch.testing.assert_close(padded[b, :real], tokens[0], rtol=1e-7, atol=1e-7)
        assert bool((size[b, real:] == 0).all())
    if method_name == "tome":  # r real tokens per image in every block, padding or not
        assert merged == [[method.r, method.r]] * 4


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_every_method_merging_nothing_equals_the_unpatched_model_on_the_kept_tokens(method_name):
    model, x = hf_vit("ViTModel", "eager"), blocky_images(2)
    mask = padding_mask((TOKENS, 50))
    with torch.no_grad():
        expected = model(x, attention_mask=mask).last_hidden_state
        atmerge.patch(model, no_merge_method(method_name, model))
        got = model(x, attention_mask=mask).last_hidden_state
    stats = atmerge.last_stats(model)
    assert sum(stats.merged_per_block) == 0 and stats.tokens_per_block[0] == (TOKENS + 50) / 2
    for b, n in enumerate((TOKENS, 50)):
        torch.testing.assert_close(got[b, :n], expected[b, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_every_method_refuses_a_mask_that_is_not_key_padding_in_one_line(method_name):
    model, x = hf_vit("ViTModel", "eager"), blocky_images(2)
    atmerge.patch(model, registry_method(method_name, model))
    per_query = torch.zeros(2, 1, TOKENS, TOKENS)
    per_query[0, 0, 3, 5] = float("-inf")
    with pytest.raises(ValueError, match="differs between queries or heads, so it is not key padding") as refused:
        model(x, attention_mask=per_query)
    assert "\n" not in str(refused.value)
    with torch.no_grad():  # the model still runs, with a key-padding mask too
        assert model(x, attention_mask=padding_mask((TOKENS, 40))).last_hidden_state.shape[0] == 2


def test_a_batch_adaptive_method_keeps_one_count_per_batch_without_padding():
    """Without padding (no mask, or one that hides nothing) batch-mean ATM merges one count per
    batch as before; with padding every image merges its own count."""
    model, x = hf_vit("ViTModel"), blocky_images(4, seed=3)
    atmerge.patch(model, atmerge.ATM(alpha=0.99, beta=0.04, theta_min=0.5))
    with torch.no_grad():
        plain = model(x).last_hidden_state
        assert not merge_state(model).per_image
        torch.testing.assert_close(model(x, attention_mask=torch.ones(4, TOKENS)).last_hidden_state, plain)
        model(x, attention_mask=padding_mask((TOKENS, TOKENS, TOKENS, 60)))
        per_image = [c[2].tolist() for c in merge_state(model).per_image_counts]
    assert merge_state(model).per_image and any(len(set(counts)) > 1 for counts in per_image)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_masks_that_are_not_trailing_key_padding_are_refused_in_one_line(attn):
    model, x = hf_vit("ViTModel", attn), torch.randn(2, 3, 32, 32)
    atmerge.patch(model, PER_IMAGE)
    per_query = torch.zeros(2, 1, TOKENS, TOKENS)
    per_query[0, 0, 3, 5] = float("-inf")
    with pytest.raises(ValueError, match="differs between queries or heads, so it is not key padding"):
        model(x, attention_mask=per_query)
    soft = torch.zeros(2, 1, TOKENS, TOKENS)
    soft[..., 7] = -0.5
    with pytest.raises(ValueError, match="must hold 0 .attend. and -inf.*such as -0.5"):
        model(x, attention_mask=soft)
    middle = torch.ones(2, TOKENS, dtype=torch.long)
    middle[1, 10] = 0
    with pytest.raises(ValueError, match="padding must be trailing"):
        model(x, attention_mask=middle)
    cls_hidden = torch.ones(2, TOKENS, dtype=torch.long)
    cls_hidden[0, 0] = 0
    with pytest.raises(ValueError, match="hides a protected token"):
        model(x, attention_mask=cls_hidden)
    with torch.no_grad():  # the model still runs
        assert model(x).last_hidden_state.shape[0] == 2


# ----------------------------------------------------------------------------- HF checkpointing


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize(
    "cls_name, method, padded",
    [
        ("ViTForImageClassification", atmerge.ToMe(r=6), False),
        ("Dinov2ForImageClassification", PER_IMAGE, True),
        ("CLIPVisionModel", atmerge.ATM(alpha=0.99, beta=0.04, theta_min=0.5), False),
        ("DeiTForImageClassification", atmerge.MCTF(r=6, blocks=(2, 3, 4)), False),
        ("ViTForImageClassification", atmerge.ToMe(r=6), True),
        ("CLIPVisionModel", atmerge.MCTF(r=6, blocks=(2, 3, 4)), True),
    ],
    ids=["vit-tome", "dinov2-per-image-padded", "clip-atm", "deit-mctf", "vit-tome-padded", "clip-mctf-padded"],
)
def test_gradient_checkpointing_gives_the_gradients_of_the_plain_patched_model(cls_name, method, padded):
    model, x = hf_vit(cls_name), blocky_images(2)
    atmerge.patch(model, method)
    model.train()
    kwargs = {"attention_mask": padding_mask((TOKENS, 50))} if padded else {}

    def loss() -> torch.Tensor:
        out = model(x, **kwargs)
        return (out.logits if hasattr(out, "logits") else out.pooler_output).square().sum()

    loss().backward()
    expected, expected_stats = _gradients(model), atmerge.last_stats(model)
    assert sum(expected_stats.merged_per_block) > 0
    model.zero_grad()
    model.gradient_checkpointing_enable()
    recomputed = []
    last = adapter_for(model).blocks(model)[-1]
    last.mlp.register_forward_pre_hook(lambda *_: recomputed.append(1))  # (the recomputation stops early)
    loss().backward()
    assert len(recomputed) == 2  # the forward pass and its recomputation in the backward pass
    assert atmerge.last_stats(model).tokens_per_block == expected_stats.tokens_per_block
    got = _gradients(model)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)
