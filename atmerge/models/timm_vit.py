"""Adapter for timm ``VisionTransformer`` models (DeiT, ViT, DINOv2, MAE-style, distilled DeiT).

Model surgery only: the patched Block runs the shared merging step
(:func:`atmerge.models.block.merging_step`) with timm's parts — attention with a log-size bias
(proportional attention) returning the keys' head-mean, the residual branches — and the shared
:class:`MergeState` decides nothing either: which tokens merge is the method's business, never
this module's.

A timm backbone defined elsewhere (atmerge's LV-ViT and T2T-ViT, or a user's) registers itself
with :func:`register_backbone`: its Block subclasses patched like timm's Block, its cost hooks
(what its own parts cost beyond the common ones), and its module (where a pickled patched model's
class is found again).  This module never imports a backbone.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from dataclasses import dataclass
from types import ModuleType
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models._features import feature_take_indices
from timm.layers.attention_pool import AttentionPoolLatent
from timm.models.vision_transformer import Block, VisionTransformer

from atmerge.core.merging import size_weighted_mean, spread_by_source
from atmerge.core.packing import Packing
from atmerge.flops import BlockCost, ModelCost
from atmerge.models.adapter import ModelAdapter, UnsupportedModelError, check_image_tensor, register_adapter
from atmerge.models.block import AttentionOutput, BlockParts, checkpointed_step, merging_step
from atmerge.models.costs import layer_norm_macs, linear_macs
from atmerge.models.patching import ORIGINAL as _ORIGINAL
from atmerge.models.patching import PREFIX as _PREFIX
from atmerge.models.patching import STATE as _STATE
from atmerge.models.patching import merge_state, patched_class
from atmerge.models.stem import Stem
from atmerge.runtime import MergeState

SUPPORTED_POOLS = ("token", "avg", "")
SUPPORTED_BLOCKS: set[type] = {Block}  # and the Block subclasses of the registered backbones
__all__ = [
    "TimmViT",
    "UnsupportedModelError",
    "attention_with_keys",
    "check_image_batch",
    "merge_state",
    "register_backbone",
]

CostHook = Callable[[VisionTransformer, ModelCost], ModelCost]


# ----------------------------------------------------------------------------- backbones


@dataclass(frozen=True)
class Backbone:
    """A timm ``VisionTransformer`` variant defined outside timm, as registered."""

    module: str
    blocks: tuple[type, ...]
    cost_hooks: tuple[tuple[type, CostHook], ...]


BACKBONES: dict[str, Backbone] = {}  # by module name


def register_backbone(
    module: str | ModuleType,
    *,
    blocks: Iterable[type] = (),
    cost_hooks: Mapping[type, CostHook] | None = None,
) -> Backbone:
    """Make the timm adapter patch a backbone defined in ``module`` (a module or its name; the
    backbone's own module calls ``register_backbone(__name__, ...)`` when imported).

    blocks: its subclasses of timm's ``Block`` that are patched like ``Block`` (same parts:
        norm1, attn — timm's ``Attention`` —, ls1, drop_path1, norm2, mlp, ls2, drop_path2).
    cost_hooks: ``{model class: hook}``; ``hook(model, cost) -> cost`` adds what the model's own
        parts cost (e.g. a head reading every patch token) to the :class:`ModelCost` counted from
        the common parts, for every model that is an instance of the class.  A patch embedding
        other than one convolution is an :class:`atmerge.models.stem.Stem`, which counts itself.
    A pickled patched model of one of the module's classes loads in a fresh process once the
    module has been imported (and so registered).  Registering a module again replaces it.
    """
    name = module if isinstance(module, str) else module.__name__
    blocks = tuple(blocks)
    for cls in blocks:
        if not (isinstance(cls, type) and issubclass(cls, Block)):
            raise TypeError(f"blocks must be subclasses of timm's Block, got {cls!r}")
    hooks = tuple((cls, hook) for cls, hook in (cost_hooks or {}).items())
    for cls, hook in hooks:
        if not (isinstance(cls, type) and issubclass(cls, VisionTransformer)) or not callable(hook):
            raise TypeError(f"cost_hooks maps VisionTransformer subclasses to functions, got {cls!r}: {hook!r}")
    SUPPORTED_BLOCKS.update(blocks)
    BACKBONES[name] = backbone = Backbone(name, blocks, hooks)
    return backbone


# ----------------------------------------------------------------------------- validation


def check_timm_model(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` naming what is missing if the timm model ``model``
    can't be patched (the adapter's check; for any model call
    :func:`atmerge.models.adapter.check_supported`)."""
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"atmerge patches timm VisionTransformer models (DeiT, ViT, DINOv2, MAE-style; atmerge's LV-ViT, T2T-ViT); "
            f"got {type(model).__name__}"
        )
    pool = getattr(model, "attn_pool", None)
    if pool is not None and (type(pool) is not AttentionPoolLatent or pool.pos_embed is not None):
        raise UnsupportedModelError(
            f"global_pool={model.global_pool!r} with a {type(pool).__name__}"
            f"{' with a position embedding' if getattr(pool, 'pos_embed', None) is not None else ''} is not "
            "supported; supported: 'token', 'avg', 'map' (timm's AttentionPoolLatent without position embedding) or ''"
        )
    if pool is None and model.global_pool not in SUPPORTED_POOLS:
        raise UnsupportedModelError(
            f"global_pool={model.global_pool!r} is not supported; supported: 'token', 'avg', 'map' or '' (none)"
        )
    if not isinstance(model.patch_embed, Stem) and not isinstance(getattr(model.patch_embed, "proj", None), nn.Conv2d):
        raise UnsupportedModelError("the patch embedding must be a single Conv2d (timm PatchEmbed) or an atmerge Stem")
    for i, block in enumerate(model.blocks):
        if getattr(block, _ORIGINAL, type(block)) not in SUPPORTED_BLOCKS:
            raise UnsupportedModelError(
                f"block {i} is a {type(block).__name__}; atmerge supports timm's pre-norm Block"
            )
        if type(block.attn) is not Attention:
            raise UnsupportedModelError(
                f"block {i} uses {type(block.attn).__name__}; atmerge supports timm's Attention"
            )


def expected_image_size(model: VisionTransformer) -> tuple[int, int] | None:
    """(H, W) the model requires, or None when it takes any size (dynamic_img_size)."""
    pe = model.patch_embed
    if getattr(pe, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", True) or pe.img_size is None:
        return None
    return tuple(pe.img_size)


def check_images(model: VisionTransformer, shape: tuple[int, ...]) -> tuple[int, int]:
    """Validate an image batch shape [B, C, H, W]; return the patch grid (H/p, W/p)."""
    pe = model.patch_embed
    in_chans = pe.in_chans if isinstance(pe, Stem) else pe.proj.in_channels
    size = expected_image_size(model)
    ph, pw = model.patch_embed.patch_size
    wanted = f"[B, {in_chans}, {size[0]}, {size[1]}]" if size else f"[B, {in_chans}, H, W] with H, W multiples of {ph}"
    bad = len(shape) != 4 or shape[1] != in_chans
    bad = bad or (size is not None and tuple(shape[2:]) != size)
    bad = bad or (size is None and (shape[2] % ph or shape[3] % pw))
    if bad:
        raise ValueError(f"images of shape {list(shape)} given; this model takes {wanted}")
    return shape[2] // ph, shape[3] // pw


def check_image_batch(model: VisionTransformer, x: object) -> tuple[int, int]:
    """Validate the images a model is called with: a floating-point tensor [B, C, H, W] of the
    model's channels and size; return the patch grid (H/p, W/p)."""
    return check_images(model, tuple(check_image_tensor(x).shape))


# ----------------------------------------------------------------------------- FLOPs


def model_cost(model: VisionTransformer) -> ModelCost:
    """Per-token and per-image multiply-add costs of a timm ViT (see :mod:`atmerge.flops`)."""
    blocks = []
    for block in model.blocks:
        attn = block.attn
        attn_linear = attn.qkv.weight.numel() + attn.proj.weight.numel()
        if getattr(attn, "gate", None) is not None:
            attn_linear += attn.gate.weight.numel()
        blocks.append(
            BlockCost(
                attn_linear=attn_linear,
                attn_dim=attn.num_heads * attn.head_dim,
                mlp=linear_macs(block.mlp),
                norm1=layer_norm_macs(block.norm1),
                norm2=layer_norm_macs(block.norm2),
                qk_norms=attn.num_heads * (layer_norm_macs(attn.q_norm) + layer_norm_macs(attn.k_norm)),
                out_norm=layer_norm_macs(getattr(attn, "norm", nn.Identity())),
                qk_linear=2 * attn.qkv.weight.numel() // 3,
            )
        )
    head = layer_norm_macs(model.fc_norm) + linear_macs(model.head)
    pool, pool_per_token = getattr(model, "attn_pool", None), 0
    if pool is not None:  # timm's AttentionPoolLatent: latent queries attend over the tokens
        width = pool.num_heads * pool.head_dim
        pool_per_token = (
            pool.kv.weight.numel() + 2 * pool.latent_len * width + pool.num_heads * layer_norm_macs(pool.k_norm)
        )
        per_latent = linear_macs(pool.q) + linear_macs(pool.proj) + pool.num_heads * layer_norm_macs(pool.q_norm)
        per_latent += (linear_macs(pool.mlp) + layer_norm_macs(pool.norm)) if pool.mlp is not None else 0
        head += pool.latent_len * per_latent
    if isinstance(getattr(model, "head_dist", None), nn.Module):
        head += linear_macs(model.head_dist)
    pool_skips = 0 if model.pool_include_prefix else model.num_prefix_tokens
    pe = model.patch_embed
    stem = isinstance(pe, Stem)
    cost = ModelCost(
        blocks=tuple(blocks),
        patch_embed=0 if stem else pe.proj.weight.numel() // pe.proj.groups + layer_norm_macs(pe.norm),
        stem=pe.macs() if stem else 0,
        norm_pre=layer_norm_macs(model.norm_pre),
        final_norm=layer_norm_macs(model.norm),
        head=head,
        pool_per_token=pool_per_token,
        pool_skips=pool_skips,
    )
    for backbone in BACKBONES.values():  # the registered backbones' own parts (LV-ViT's auxiliary head)
        for cls, hook in backbone.cost_hooks:
            if isinstance(model, cls):
                cost = hook(model, cost)
    return cost


def dense_gflops(model: VisionTransformer, input_size: tuple[int, int, int]) -> float:
    """GFLOPs per image of the unpatched model for images of ``input_size`` (C, H, W)."""
    gh, gw = check_images(model, (1, *input_size))
    return model_cost(model).dense_gflops(gh * gw, model.num_prefix_tokens)


# ----------------------------------------------------------------------------- patched forward


def _heads(attn: Attention, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k (after their norms), v [B, H, N, d] of the projected tokens qkv [B, N, 3·C_a]."""
    B, N, _ = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _attend_heads(
    attn: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    return_attention: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of q, k, v [B, H, N, d] with an additive bias (or None) → (heads concatenated
    [B, N, H·d] before the output norm and projection, probabilities [B, H, N, N] or None)."""
    B, _, N, _ = q.shape
    if bias is not None:
        mask = resolve_self_attn_mask(N, q, attn_mask, is_causal)
        attn_mask, is_causal = (bias if mask is None else bias + mask), False
    probs = None
    if attn.fused_attn and not return_attention:
        dropout = attn.attn_drop.p if attn.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal)
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        scores = maybe_add_mask(scores, resolve_self_attn_mask(N, scores, attn_mask, is_causal))
        probs = scores.softmax(dim=-1)
        x = attn.attn_drop(probs) @ v
    return x.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim), probs


def _output(attn: Attention, heads: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Output norm, gate (of the block's input x) and projection of the heads [..., H·d] → [..., C]."""
    heads = getattr(attn, "norm", nn.Identity())(heads)
    if getattr(attn, "gate", None) is not None:
        heads = heads * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(heads))


def attention_with_keys(
    attn: Attention,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    return_attention: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """timm's Attention forward plus an additive bias, returning (output [B, N, C], head-mean of
    the keys [B, N, C_h], attention probabilities [B, H, N, N] or None).  With bias None it
    computes exactly what timm's forward computes.  return_attention forces the unfused path."""
    q, k, v = _heads(attn, attn.qkv(x))
    heads, probs = _attend_heads(attn, q, k, v, bias, attn_mask, is_causal, return_attention)
    return _output(attn, heads, x), k.mean(1), (probs if return_attention else None)


def packed_attention_with_keys(
    attn: Attention, h: torch.Tensor, packing: Packing, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_with_keys` of a padded per-image batch given its real tokens h [T, C]
    (:mod:`atmerge.core.packing`): the projections run on the T real tokens, attention on the
    padded layout with ``bias`` [B, 1, 1, N] (−inf for padding; q, k, v spread there with
    :meth:`~atmerge.core.packing.Packing.spread`).  Returns (output [T, C], keys' head-mean
    [B, N, C_h]; at the padding a copy of a real token's, which no padded split reads)."""
    q, k, v = _heads(attn, packing.spread(attn.qkv(h)))
    heads, _ = _attend_heads(attn, q, k, v, bias, None, False, False)
    return _output(attn, packing.pack(heads), h), k.mean(1)


def attention_map(attn: Attention, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities [B, H, N, N] of ``attn`` on x [B, N, C] and the keys' head-mean
    [B, N, C_h]; only q and k are projected (the values follow in :func:`attend`)."""
    B, N, _ = x.shape
    d = attn.num_heads * attn.head_dim
    qk_bias = attn.qkv.bias[: 2 * d] if attn.qkv.bias is not None else None
    qk = F.linear(x, attn.qkv.weight[: 2 * d], qk_bias).reshape(B, N, 2, attn.num_heads, attn.head_dim)
    q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    return (scores if bias is None else scores + bias).softmax(dim=-1), k.mean(1)


def attend(attn: Attention, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The rest of ``attn``'s forward given its probabilities [B, H, N, N]: values of x [B, N, C]
    (only v is projected), AV, output norm, gate and projection → [B, N, C]."""
    B, N, _ = x.shape
    d = attn.num_heads * attn.head_dim
    v_bias = attn.qkv.bias[2 * d :] if attn.qkv.bias is not None else None
    v = F.linear(x, attn.qkv.weight[2 * d :], v_bias).reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    out = (attn.attn_drop(probs) @ v).transpose(1, 2).reshape(B, N, d)
    out = getattr(attn, "norm", nn.Identity())(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


class TimmParts(BlockParts):
    """The parts of timm's pre-norm ``Block`` for :func:`atmerge.models.block.merging_step`."""

    def norm1(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        return block.norm1(x)

    def attention(self, block: Block, h, bias, mask, is_causal, need_probs, **kwargs) -> AttentionOutput:
        return attention_with_keys(block.attn, h, bias, mask, is_causal, need_probs)

    def packed_attention(self, block: Block, h, packing, bias, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return packed_attention_with_keys(block.attn, h, packing, bias)

    def attention_map(self, block: Block, h, bias) -> tuple[torch.Tensor, torch.Tensor]:
        return attention_map(block.attn, h, bias)

    def attend(self, block: Block, h, probs) -> torch.Tensor:
        return attend(block.attn, h, probs)

    def attn_branch(self, block: Block, out: torch.Tensor) -> torch.Tensor:
        return block.drop_path1(block.ls1(out))

    def mlp(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        return block.ls2(block.mlp(block.norm2(x)))

    def mlp_drop(self, block: Block, update: torch.Tensor) -> torch.Tensor:
        return block.drop_path2(update)


TIMM_PARTS = TimmParts()


def _merging_block_forward(
    self: Block, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    return merging_step(TIMM_PARTS, self, x, attn_mask, is_causal)


def _checkpointed_block(block: Block, state: MergeState, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` under activation checkpointing, recomputed from the merge state it saw
    (:func:`atmerge.models.block.checkpointed_step`)."""
    return checkpointed_step(state, block, x)


def _features(
    model: VisionTransformer,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    head_follows: bool,
) -> torch.Tensor:
    """timm's forward_features on images x [B, C, H, W] → tokens [B, N', C].  The last block keeps
    only the protected tokens (``prune_last``) only when ``head_follows`` (the full forward, whose
    CLS-pooled head reads nothing else); on its own forward_features returns every token left
    after merging.  With ``set_grad_checkpointing(True)`` each block is checkpointed so that its
    recomputation merges exactly as the forward pass did."""
    check_image_batch(model, x)
    state: MergeState = getattr(model, _STATE)
    prune = state.prune_last
    state.prune_last, state.features_only = prune and head_follows, not head_follows
    try:
        if not (model.grad_checkpointing and torch.is_grad_enabled()) or attn_mask is not None or is_causal:
            return getattr(model, _ORIGINAL).forward_features(model, x, attn_mask=attn_mask, is_causal=is_causal)
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for block in model.blocks:
            x = _checkpointed_block(block, state, x)
        return model.norm(x)
    finally:
        state.prune_last = prune


def _merging_forward_features(
    self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    """timm's forward_features: images [B, C, H, W] → every token left after merging [B, N', C]
    (no CLS-only last block: the caller may read any token)."""
    return _features(self, x, attn_mask, is_causal, head_follows=False)


def _merging_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    """timm's forward, images [B, C, H, W] → the head's output; the last block keeps only the
    protected tokens when the model is CLS-pooled (``prune_last``: the head reads nothing else)."""
    return self.forward_head(_features(self, x, attn_mask, is_causal, head_follows=True))


def _merging_pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
    """timm's pooling, with every original patch counting once: 'avg' weighted by merge size,
    'map' (attention pool) with log(size) added to its logits (−inf for padding)."""
    pool_type = self.global_pool if pool_type is None else pool_type
    state: MergeState = getattr(self, _STATE)
    size = state.size
    if self.attn_pool is not None and state.merged_any and size is not None and size.shape[1] == x.shape[1]:
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        return self.attn_pool(x[:, start:], attn_mask=size[:, None, None, start:].to(x.dtype).log())
    if pool_type != "avg" or size is None or size.shape[1] != x.shape[1]:
        return getattr(self, _ORIGINAL).pool(self, x, pool_type)
    start = 0 if self.pool_include_prefix else self.num_prefix_tokens
    return size_weighted_mean(x[:, start:], size[:, start:])


def _merging_forward_intermediates(
    self,
    x: torch.Tensor,
    indices: int | list[int] | None = None,
    return_prefix_tokens: bool = False,
    norm: bool = False,
    stop_early: bool = False,
    output_fmt: str = "NCHW",
    intermediates_only: bool = False,
    output_dict: bool = False,
    **kwargs,
):
    """timm's forward_intermediates (and so get_intermediate_layers) with the shapes of the
    unpatched model: every block's tokens are spread back over the patch grid through the tracked
    sources — each original patch gets the value of the token it was merged into, a pruned patch
    zeros — and so are the final features.  The last block keeps every token (no CLS-only
    pruning), so that its output has a value for every patch."""
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt={output_fmt!r} is not supported; choose 'NCHW' or 'NLC'")
    if self.grad_checkpointing and torch.is_grad_enabled():
        raise ValueError(
            "forward_intermediates with gradient checkpointing is not supported on a patched model; "
            "call model.set_grad_checkpointing(False) or run it under torch.no_grad()"
        )
    check_image_batch(self, x)
    state: MergeState = getattr(self, _STATE)
    sources: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda *_: sources.append(state.source)) for block in self.blocks]
    options = state.trace_source, state.prune_last
    state.trace_source, state.prune_last, state.features_only = True, False, True
    try:
        out = getattr(self, _ORIGINAL).forward_intermediates(
            self,
            x,
            indices,
            return_prefix_tokens=True,
            norm=norm,
            stop_early=stop_early,
            output_fmt="NLC",
            intermediates_only=False,
            output_dict=True,
            **kwargs,
        )
    finally:
        state.trace_source, state.prune_last = options
        if not state.trace_source:
            state.source = None
        for hook in hooks:
            hook.remove()
    p = self.num_prefix_tokens
    taken = sorted(feature_take_indices(len(self.blocks), indices)[0])
    patches = [spread_by_source(sources[i][:, p:, p:], y) for i, y in zip(taken, out["image_intermediates"])]
    final = spread_by_source(sources[-1], out["image_features"])
    prefix = out.get("image_intermediates_prefix")
    if output_fmt == "NCHW":
        grid = self.patch_embed.dynamic_feat_size(tuple(x.shape[2:]))
        patches = [y.reshape(x.shape[0], *grid, y.shape[-1]).permute(0, 3, 1, 2).contiguous() for y in patches]
    if output_dict:
        result = {"image_intermediates": patches}
        if prefix is not None and return_prefix_tokens:
            result["image_intermediates_prefix"] = prefix
        if not intermediates_only:
            result["image_features"] = final
        return result
    if prefix is not None and return_prefix_tokens:
        patches = list(zip(patches, prefix))
    return patches if intermediates_only else (final, patches)


def _patched_methods(cls: type) -> dict:
    if issubclass(cls, VisionTransformer):
        return {
            "forward": _merging_forward,
            "forward_features": _merging_forward_features,
            "pool": _merging_pool,
            "forward_intermediates": _merging_forward_intermediates,
        }
    return {"forward": _merging_block_forward}


def __getattr__(name: str) -> type:
    """Rebuild a patched class by name when a pickled patched model is loaded in a fresh process
    (the original class is looked up in timm's vision_transformer and deit modules and in the
    modules of the registered backbones)."""
    if name == "check_supported":  # the old name of check_timm_model, kept for one release
        warnings.warn(
            "atmerge.models.timm_vit.check_supported is renamed check_timm_model (atmerge.models.adapter."
            "check_supported checks any model); the old name will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return check_timm_model
    from timm.models import deit
    from timm.models import vision_transformer as vit

    original = None
    for module in (vit, deit, *(sys.modules.get(m) for m in BACKBONES)) if name.startswith(_PREFIX) else ():
        original = original or getattr(module, name[len(_PREFIX) :], None)
    if original is None and name.startswith(_PREFIX) and "atmerge.models.families" not in sys.modules:
        # unpickling in a fresh process before any backbone registered itself (the package loads
        # lazily): load the registered families by name, as timm's own registry loads plug-ins,
        # then look again
        importlib.import_module("atmerge.models.families")
        return __getattr__(name)
    if isinstance(original, type) and issubclass(original, (VisionTransformer, Block)):
        return patched_class(original, _patched_methods(original), __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class TimmViT(ModelAdapter):
    """timm ``VisionTransformer`` models built from timm's pre-norm ``Block`` and ``Attention``."""

    family = "timm VisionTransformer models (DeiT, ViT, DINOv2, MAE-style; atmerge's LV-ViT, T2T-ViT)"

    def claims(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def check(self, model: nn.Module) -> None:
        check_timm_model(model)

    def check_images(self, model: nn.Module, images: object) -> tuple[int, int]:
        return check_image_batch(model, images)

    def cost(self, model: nn.Module) -> ModelCost:
        return model_cost(model)

    def dense_gflops(self, model: nn.Module, input_size: tuple[int, int, int]) -> float:
        return dense_gflops(model, input_size)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def num_protected(self, model: nn.Module) -> int:
        return model.num_prefix_tokens

    def num_patches(self, model: nn.Module) -> int:
        return model.patch_embed.num_patches

    def cls_pooled(self, model: nn.Module) -> bool:
        return model.global_pool == "token" and not getattr(model, "head_reads_patch_tokens", False)

    def default_prop_attn(self, model: nn.Module) -> bool | None:
        return getattr(model, "atmerge_prop_attn", None)

    def patched_methods(self, cls: type) -> dict:
        return _patched_methods(cls)


register_adapter(TimmViT())
