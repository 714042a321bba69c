"""The public functions: patch a timm ViT with a method, undo it, read statistics, count FLOPs."""

from __future__ import annotations

import torch
from torch import nn

from atmerge.methods.base import Method
from atmerge.models import timm_vit
from atmerge.runtime import MergeState
from atmerge.stats import MergeStats


def patch(model: nn.Module, method: Method, *, prop_attn: bool = True, trace_source: bool = False) -> nn.Module:
    """Patch a timm VisionTransformer in place so that every block reduces tokens with ``method``.

    prop_attn: add log(merge size) to the attention logits (proportional attention; the paper
        turns it off for MAE).
    trace_source: track which original patches each token holds (``merge_source(model)``), for
        visualisation and dense outputs; costs an extra [B, N, N] tensor.
    Returns the same model object.  Patching a patched model replaces its method and options.
    """
    if not isinstance(method, Method):
        raise TypeError(f"method must be an atmerge method such as atmerge.ATM(...), got {type(method).__name__}")
    timm_vit.check_supported(model)
    method.check_depth(len(model.blocks))

    def make_state(cost, num_protected: int, cls_pooled: bool) -> MergeState:
        return MergeState(
            method,
            cost,
            num_protected=num_protected,
            prop_attn=bool(prop_attn),
            trace_source=bool(trace_source),
            prune_last=method.prune_last_block and cls_pooled,
        )

    return timm_vit.patch_vit(model, make_state)


def unpatch(model: nn.Module) -> nn.Module:
    """Restore a patched model to its original classes (outputs bit-for-bit the original's)."""
    return timm_vit.unpatch_vit(model)


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` is currently patched by atmerge."""
    return timm_vit.is_patched(model)


def last_stats(model: nn.Module) -> MergeStats:
    """Token counts, merges, thresholds and GFLOPs of the last forward pass of a patched model."""
    return timm_vit.merge_state(model).stats()


def merge_source(model: nn.Module):
    """[B, N, N0] 0/1 map from the tokens of the last block to the original tokens (patched with
    ``trace_source=True``); None otherwise."""
    return timm_vit.merge_state(model).source


def dense_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Spread merged tokens back onto the original token grid for dense outputs.

    tokens: [B, N', C], the tokens of the last forward of a model patched with
    ``trace_source=True`` (e.g. ``model.forward_features(x)`` with ``global_pool=''``).
    Returns [B, N0, C]: every original token receives the value of the token that holds it.
    """
    source = merge_source(model)
    if source is None:
        raise ValueError("dense_tokens needs the model patched with trace_source=True")
    if source.shape[:2] != tokens.shape[:2]:
        raise ValueError(
            f"tokens of shape {list(tokens.shape)} do not match the last forward's {source.shape[1]} tokens"
        )
    return source.transpose(1, 2).to(tokens.dtype) @ tokens


def gflops(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> float:
    """GFLOPs (1e9 multiply-adds) per image of an unpatched timm ViT at ``input_size`` (C, H, W)."""
    timm_vit.check_supported(model)
    if timm_vit.is_patched(model):
        raise ValueError(
            "gflops() counts the unpatched model; a patched model's cost depends on the images: "
            "run it and read atmerge.last_stats(model).gflops"
        )
    return timm_vit.dense_gflops(model, tuple(input_size))
