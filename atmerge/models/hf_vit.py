"""Adapter for Hugging Face ``transformers`` vision transformers: ViT, DeiT (distillation token
protected), DINOv2 (LayerScale) and the CLIP vision tower.

Imported only once ``transformers`` is (see :func:`atmerge.models.families.load_families`).  The
block step is the shared :func:`atmerge.models.block.merging_step`; this module only says where
each family keeps its parts.  Three classes are swapped: every layer (the merging step), its
attention module (the log-size bias as an additive mask in 'eager' or 'sdpa' attention, the
keys' head-mean returned beside the output; called as a module, so ``output_attentions`` and
hooks see every block's attention map over the tokens it had), and
``Dinov2ForImageClassification`` (its mean over patch tokens weighted by merge size).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip import modeling_clip as clip
from transformers.models.deit import modeling_deit as deit
from transformers.models.dinov2 import modeling_dinov2 as dinov2
from transformers.models.vit import modeling_vit as vit
from transformers.utils.generic import can_return_tuple

from atmerge.core.merging import size_weighted_mean
from atmerge.core.packing import Packing
from atmerge.flops import BlockCost, ModelCost
from atmerge.models.adapter import ModelAdapter, UnsupportedModelError, check_image_tensor, register_adapter
from atmerge.models.block import AttentionOutput, BlockParts, checkpointed_step, merging_step
from atmerge.models.costs import layer_norm_macs, linear_macs
from atmerge.models.patching import INDEX, ORIGINAL, PREFIX, STATE, patched_class, refuse_fx

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class AttentionNames:
    """Where a family's attention module keeps its parts; ``eager``: the family's own eager
    attention function (used where the probabilities are needed)."""

    out_proj: str
    scale: str
    dropout: str
    eager: Callable


@dataclass(frozen=True)
class Layout:
    """Where a family's backbone keeps its parts (attribute paths); None where it has none."""

    layers: str
    patch_conv: str
    num_protected: int
    any_size: bool  # takes any multiple of the patch size (DINOv2 always interpolates)
    norm1: str
    attention: str
    norm2: str
    drop: str | None  # dropout / drop path after each branch
    scale1: str | None = None  # LayerScale
    scale2: str | None = None
    norm_pre: str | None = None  # per token before the blocks
    final_norm: str | None = None  # per token after the blocks
    pooled_norm: str | None = None  # on the pooled CLS token only (per image)


_PATCHES = "embeddings.patch_embeddings.projection"
_VIT_LAYER = dict(norm1="layernorm_before", attention="attention", norm2="layernorm_after", drop="dropout")
LAYOUTS: dict[type, Layout] = {
    vit.ViTModel: Layout("layers", _PATCHES, 1, False, **_VIT_LAYER, final_norm="layernorm"),
    deit.DeiTModel: Layout("layers", _PATCHES, 2, False, **_VIT_LAYER, final_norm="layernorm"),
    dinov2.Dinov2Model: Layout(
        "encoder.layer",
        _PATCHES,
        1,
        True,
        norm1="norm1",
        attention="attention",
        norm2="norm2",
        drop="drop_path",
        scale1="layer_scale1",
        scale2="layer_scale2",
        final_norm="layernorm",
    ),
    clip.CLIPVisionModel: Layout(
        "encoder.layers",
        "embeddings.patch_embedding",
        1,
        False,
        norm1="layer_norm1",
        attention="self_attn",
        norm2="layer_norm2",
        drop=None,
        norm_pre="pre_layrnorm",
        pooled_norm="post_layernorm",
    ),
}
LAYERS = {
    vit.ViTLayer: vit.ViTModel,
    deit.DeiTLayer: deit.DeiTModel,
    dinov2.Dinov2Layer: dinov2.Dinov2Model,
    clip.CLIPEncoderLayer: clip.CLIPVisionModel,
}
_VIT_ATTENTION = dict(out_proj="o_proj", scale="scaling", dropout="attention_dropout")
ATTENTIONS = {
    vit.ViTAttention: AttentionNames(**_VIT_ATTENTION, eager=vit.eager_attention_forward),
    deit.DeiTAttention: AttentionNames(**_VIT_ATTENTION, eager=deit.eager_attention_forward),
    dinov2.Dinov2Attention: AttentionNames(**_VIT_ATTENTION, eager=dinov2.eager_attention_forward),
    clip.CLIPAttention: AttentionNames("out_proj", "scale", "dropout", eager=clip.eager_attention_forward),
}
# every supported model class → whether only the protected tokens reach its output (CLS pooled)
MODELS: dict[type, bool] = {
    vit.ViTModel: False,
    vit.ViTForImageClassification: True,
    deit.DeiTModel: False,
    deit.DeiTForImageClassification: True,
    deit.DeiTForImageClassificationWithTeacher: True,
    dinov2.Dinov2Model: False,
    dinov2.Dinov2ForImageClassification: False,  # CLS and the mean of the patch tokens
    clip.CLIPVisionModel: False,
    clip.CLIPVisionModelWithProjection: False,
}


# ----------------------------------------------------------------------------- structure


def _original(module: nn.Module) -> type:
    return module.__dict__.get(ORIGINAL, type(module))


def backbone(model: nn.Module) -> PreTrainedModel:
    """The ViTModel / DeiTModel / Dinov2Model / CLIPVisionModel inside ``model`` (or itself)."""
    return model.base_model


def layout(model: nn.Module) -> Layout:
    return LAYOUTS[_original(backbone(model))]


def layers(model: nn.Module) -> list[nn.Module]:
    return list(backbone(model).get_submodule(layout(model).layers))


def attention_implementation(config) -> str:
    """The model's attention implementation if atmerge supports it, else UnsupportedModelError."""
    name = getattr(config, "_attn_implementation", None) or "eager"
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"attn_implementation={name!r} is not supported; supported: 'eager', 'sdpa' "
            "(load the model with attn_implementation='sdpa' or call model.set_attn_implementation('sdpa'))"
        )
    return name


def check_hf_model(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` naming what is missing if ``model`` can't be patched."""
    if _original(model) not in MODELS:
        names = ", ".join(cls.__name__ for cls in MODELS)
        got = _original(model).__name__
        raise UnsupportedModelError(f"atmerge patches these Hugging Face models: {names}; got {got}")
    parts = layout(model)
    for i, layer in enumerate(layers(model)):
        attn = getattr(layer, parts.attention, None)
        if _original(layer) not in LAYERS or _original(attn) not in ATTENTIONS:
            got = _original(layer).__name__
            raise UnsupportedModelError(f"layer {i} is a {got}; atmerge supports the family's own layers")
        missing = [n for n in ("q_proj", "k_proj", "v_proj") if not isinstance(getattr(attn, n, None), nn.Linear)]
        if missing:
            raise UnsupportedModelError(
                f"{_original(attn).__name__} has no {', '.join(missing)}: this transformers version lays attention "
                "out differently; atmerge supports transformers >= 5 (separate q/k/v projections)"
            )
        attention_implementation(attn.config)


def _hw_tuple(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def check_images(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    """Validate an image batch shape [B, C, H, W]; return the patch grid (H/p, W/p)."""
    config = backbone(model).config
    channels, (ph, pw), size = config.num_channels, _hw_tuple(config.patch_size), _hw_tuple(config.image_size)
    any_size = layout(model).any_size
    wanted = f"[B, {channels}, {size[0]}, {size[1]}]"
    if any_size:
        wanted = f"[B, {channels}, H, W] with H, W multiples of {ph}"
    bad = len(shape) != 4 or shape[1] != channels
    bad = bad or (any_size and (shape[2] % ph or shape[3] % pw)) or (not any_size and tuple(shape[2:]) != size)
    if bad:
        raise ValueError(f"images of shape {list(shape)} given; this model takes {wanted}")
    return shape[2] // ph, shape[3] // pw


# ----------------------------------------------------------------------------- FLOPs


def _norm(module: nn.Module, name: str | None) -> int:
    return layer_norm_macs(module.get_submodule(name)) if name else 0


def model_cost(model: nn.Module) -> ModelCost:
    """Per-token and per-image multiply-adds of an HF ViT (see :mod:`atmerge.flops`)."""
    base, parts = backbone(model), layout(model)
    blocks = []
    for layer in layers(model):
        attn = getattr(layer, parts.attention)
        out_proj = getattr(attn, ATTENTIONS[_original(attn)].out_proj)
        qk = attn.q_proj.weight.numel() + attn.k_proj.weight.numel()
        blocks.append(
            BlockCost(
                attn_linear=qk + attn.v_proj.weight.numel() + out_proj.weight.numel(),
                attn_dim=attn.q_proj.out_features,
                mlp=linear_macs(layer.mlp),
                norm1=_norm(layer, parts.norm1),
                norm2=_norm(layer, parts.norm2),
                qk_linear=qk,
            )
        )
    conv = base.get_submodule(parts.patch_conv)
    outside = linear_macs(model) - linear_macs(base) if model is not base else 0  # classifiers, projections
    return ModelCost(
        blocks=tuple(blocks),
        patch_embed=conv.weight.numel() // conv.groups,
        norm_pre=_norm(base, parts.norm_pre),
        final_norm=_norm(base, parts.final_norm),
        head=outside + linear_macs(getattr(base, "pooler", None)) + _norm(base, parts.pooled_norm),
    )


def dense_gflops(model: nn.Module, input_size: tuple[int, int, int]) -> float:
    """GFLOPs per image of the unpatched model for images of ``input_size`` (C, H, W)."""
    gh, gw = check_images(model, (1, *input_size))
    return model_cost(model).dense_gflops(gh * gw, layout(model).num_protected)


# ----------------------------------------------------------------------------- patched forward


def _merging_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    atmerge_probs: torch.Tensor | None = None,
    atmerge_need_probs: bool = False,
    atmerge_packing: Packing | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The family's attention on hidden_states [B, N, C] with ``attention_mask`` an additive mask
    (the log-size bias) → (output [B, N, C], probabilities [B, H, N, N] or None (sdpa), keys'
    head-mean [B, N, C_h]).  ``atmerge_need_probs`` runs it eagerly so that the probabilities
    exist; given ``atmerge_probs`` (a method that reduced tokens before attention) only the
    values are projected and the keys' mean is None.  Given ``atmerge_packing`` (a padded
    per-image batch, :mod:`atmerge.core.packing`), hidden_states are its real tokens [T, C]: the
    projections run on them only, attention on the padded layout, and the output is [T, C]."""
    names: AttentionNames = self._atmerge_names
    packing = atmerge_packing
    batch, tokens = (packing.batch, packing.width) if packing is not None else hidden_states.shape[:2]
    shape = (batch, tokens, -1, self.head_dim)

    def heads(projected: torch.Tensor) -> torch.Tensor:  # [B, N, C] or packed [T, C] → [B, H, N, d]
        return (projected if packing is None else packing.spread(projected)).view(shape).transpose(1, 2)

    dropout = getattr(self, names.dropout) if self.training else 0.0
    value = heads(self.v_proj(hidden_states))
    if atmerge_probs is not None:
        out = (F.dropout(atmerge_probs, dropout, self.training) @ value).transpose(1, 2)
        probs, metric = atmerge_probs, None
    else:
        query = heads(self.q_proj(hidden_states))
        key = heads(self.k_proj(hidden_states))
        name = attention_implementation(self.config)
        function = names.eager if atmerge_need_probs or name == "eager" else ALL_ATTENTION_FUNCTIONS[name]
        scale = getattr(self, names.scale)
        out, probs = function(self, query, key, value, attention_mask, dropout=dropout, scaling=scale, **kwargs)
        metric = key.mean(1)
    out = out.reshape(batch, tokens, -1)
    out = getattr(self, names.out_proj)(out.contiguous() if packing is None else packing.pack(out))
    return out, probs, metric


def _attention_map(attn: nn.Module, h: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities [B, H, N, N] (softmax in float32) and keys' head-mean [B, N, C_h] of h [B, N, C]."""
    shape = (*h.shape[:2], -1, attn.head_dim)
    query = attn.q_proj(h).view(shape).transpose(1, 2)
    key = attn.k_proj(h).view(shape).transpose(1, 2)
    scores = (query @ key.transpose(2, 3)) * getattr(attn, attn._atmerge_names.scale)
    scores = scores if bias is None else scores + bias
    return scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype), key.mean(1)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class HFParts(BlockParts):
    """The parts of an HF layer laid out as ``layout`` says, for :func:`merging_step`."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def _part(self, block: nn.Module, name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
        return getattr(block, name) if name else _identity

    def norm1(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return getattr(block, self.layout.norm1)(x)

    def attention(self, block, h, bias, mask, is_causal, need_probs, **kwargs) -> AttentionOutput:
        attn = getattr(block, self.layout.attention)
        out, probs, metric = attn(h, bias if bias is not None else mask, atmerge_need_probs=need_probs, **kwargs)
        return out, metric, probs

    def packed_attention(self, block, h, packing, bias, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        out, _, metric = getattr(block, self.layout.attention)(h, bias, atmerge_packing=packing, **kwargs)
        return out, metric

    def attention_map(self, block, h, bias) -> tuple[torch.Tensor, torch.Tensor]:
        return _attention_map(getattr(block, self.layout.attention), h, bias)

    def attend(self, block, h, probs) -> torch.Tensor:
        return getattr(block, self.layout.attention)(h, None, atmerge_probs=probs)[0]

    def attn_branch(self, block: nn.Module, out: torch.Tensor) -> torch.Tensor:
        return self._part(block, self.layout.drop)(self._part(block, self.layout.scale1)(out))

    def mlp(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._part(block, self.layout.scale2)(block.mlp(getattr(block, self.layout.norm2)(x)))

    def mlp_drop(self, block: nn.Module, update: torch.Tensor) -> torch.Tensor:
        return self._part(block, self.layout.drop)(update)


def key_padding(mask: torch.Tensor, batch: int, tokens: int) -> torch.Tensor | None:
    """The real tokens [B, N] (bool) that an attention mask lets every query see, or None when it
    hides nothing.  Accepted: [B, N] (1 / True = keep, the convention of a model's
    ``attention_mask``) and what transformers builds from it for the layers, [B, 1, N, N]
    broadcastable — bool (True = attend; sdpa) or additive (0 = attend, very negative or −inf =
    hidden; eager).  A mask that differs between queries or heads, or adds other values, is not
    key padding: ValueError."""
    wanted = (
        f"atmerge follows key-padding masks only: [{batch}, {tokens}] of 1/0 or bool, or [{batch}, 1, "
        f"{tokens}, {tokens}] that hides the same tokens from every query and head"
    )
    if mask.dim() == 2 and mask.shape[-1] == tokens and mask.shape[0] in (1, batch):
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"an attention mask [B, N] must hold 1 (keep) and 0 (padding); {wanted}")
        valid = mask.bool()
    elif mask.dim() == 4 and mask.shape[-1] == tokens and mask.shape[-2] in (1, tokens) and mask.shape[0] in (1, batch):
        if not bool((mask == mask[:, :1, :1, :]).all()):
            raise ValueError(f"the attention mask differs between queries or heads, so it is not key padding; {wanted}")
        row = mask[:, 0, 0, :]
        if row.dtype == torch.bool:
            valid = row
        else:
            hidden = row <= -1e4
            if not bool(((row == 0) | hidden).all()):
                raise ValueError(
                    f"an additive attention mask must hold 0 (attend) and -inf or a very negative "
                    f"value (padding), got values such as {row[(row != 0) & ~hidden][0].item():g}; {wanted}"
                )
            valid = ~hidden
    else:
        raise ValueError(f"an attention mask of shape {list(mask.shape)} does not fit {tokens} tokens; {wanted}")
    return None if bool(valid.all()) else valid


def _merging_layer_forward(
    self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
) -> torch.Tensor:
    """The layer on hidden_states [B, N, C] → [B, N', C].  An ``attention_mask`` must be key
    padding (:func:`key_padding`; anything else is refused in one line): the first layer hands it
    to the merge state, which makes the hidden tokens padding — size 0, so that they never match,
    merge, are attended to or pooled, with every method — in every layer (so later layers ignore
    the mask, which no longer fits the merged tokens).  Under gradient checkpointing
    (``model.gradient_checkpointing_enable()``, training) the layer runs through the model's
    checkpoint function and its recomputation merges exactly as the forward pass did."""
    refuse_fx(hidden_states)
    padding = None
    if attention_mask is not None and getattr(self, INDEX) == 0:
        padding = key_padding(attention_mask, *hidden_states.shape[:2])
    parts = self._atmerge_parts

    def step(tokens: torch.Tensor) -> torch.Tensor:
        return merging_step(parts, self, tokens, None, key_padding=padding, **kwargs)

    if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
        return checkpointed_step(getattr(self, STATE), step, hidden_states, self._gradient_checkpointing_func)
    return step(hidden_states)


@can_return_tuple
def _merging_dinov2_classifier_forward(
    self: dinov2.Dinov2ForImageClassification,
    pixel_values: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> ImageClassifierOutput:
    """Dinov2ForImageClassification's forward: the classifier reads [CLS, mean of the patch
    tokens]; over merged tokens that mean is weighted by merge size (each patch counts once)."""
    outputs = self.dinov2(pixel_values, attention_mask=attention_mask, **kwargs)
    tokens, size = outputs.last_hidden_state, getattr(self, STATE).size
    logits = self.classifier(torch.cat([tokens[:, 0], size_weighted_mean(tokens[:, 1:], size[:, 1:])], dim=1))
    loss = None if labels is None else self.loss_function(labels, logits, self.config, **kwargs)
    return ImageClassifierOutput(
        loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
    )


PARTS = {cls: HFParts(LAYOUTS[model]) for cls, model in LAYERS.items()}


def _patched_methods(cls: type) -> dict:
    if cls in LAYERS:
        return {"forward": _merging_layer_forward, "_atmerge_parts": PARTS[cls]}
    if cls in ATTENTIONS:
        return {"forward": _merging_attention_forward, "_atmerge_names": ATTENTIONS[cls]}
    if cls is dinov2.Dinov2ForImageClassification:
        return {"forward": _merging_dinov2_classifier_forward}
    raise UnsupportedModelError(f"atmerge does not patch {cls.__name__}")


def __getattr__(name: str) -> type:
    """Rebuild a patched class by name when a pickled patched model is loaded in a fresh process."""
    if name == "check_supported":  # the old name of check_hf_model, kept for one release
        import warnings

        warnings.warn(
            "atmerge.models.hf_vit.check_supported is renamed check_hf_model (atmerge.models.adapter."
            "check_supported checks any model); the old name will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return check_hf_model
    originals = {cls.__name__: cls for cls in (*LAYERS, *ATTENTIONS, dinov2.Dinov2ForImageClassification)}
    original = originals.get(name[len(PREFIX) :]) if name.startswith(PREFIX) else None
    if original is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return patched_class(original, _patched_methods(original), __name__)


class HFViT(ModelAdapter):
    """Hugging Face ViT, DeiT, DINOv2 and CLIP vision models (transformers >= 5)."""

    family = "Hugging Face transformers models (ViT, DeiT, DINOv2, CLIP vision)"

    def claims(self, model: nn.Module) -> bool:
        return isinstance(model, PreTrainedModel)

    def check(self, model: nn.Module) -> None:
        check_hf_model(model)

    def check_images(self, model: nn.Module, images: object) -> tuple[int, int]:
        return check_images(model, tuple(check_image_tensor(images).shape))

    def cost(self, model: nn.Module) -> ModelCost:
        return model_cost(model)

    def dense_gflops(self, model: nn.Module, input_size: tuple[int, int, int]) -> float:
        return dense_gflops(model, input_size)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return layers(model)

    def num_protected(self, model: nn.Module) -> int:
        return layout(model).num_protected

    def num_patches(self, model: nn.Module) -> int:
        config = backbone(model).config
        (h, w), (ph, pw) = _hw_tuple(config.image_size), _hw_tuple(config.patch_size)
        return (h // ph) * (w // pw)

    def cls_pooled(self, model: nn.Module) -> bool:
        return MODELS[_original(model)]

    def has_cls_token(self, model: nn.Module) -> bool:
        return True

    def patched_methods(self, cls: type) -> dict:
        return _patched_methods(cls)

    def is_classifier(self, model: nn.Module) -> bool:
        return type(model).__name__.endswith(("ForImageClassification", "ForImageClassificationWithTeacher"))

    def main_output(self, model: nn.Module, output: object) -> torch.Tensor:
        """logits (classifiers), image_embeds (CLIP with projection), else pooler_output, else the
        first token of last_hidden_state."""
        for name in ("logits", "image_embeds", "pooler_output"):
            value = getattr(output, name, None)
            if isinstance(value, torch.Tensor):
                return value
        return output.last_hidden_state[:, 0]

    def patched_modules(self, model: nn.Module) -> list[nn.Module]:
        blocks = layers(model)
        modules = [*blocks, *(getattr(b, layout(model).attention) for b in blocks)]
        return [model, *modules] if _original(model) is dinov2.Dinov2ForImageClassification else modules


register_adapter(HFViT())
