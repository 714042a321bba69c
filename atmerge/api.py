"""The public functions: patch a model with a method, undo it, read statistics, count FLOPs.
The model's family is found by :func:`atmerge.models.adapter.adapter_for`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from atmerge.core.merging import spread_by_source
from atmerge.methods.base import Method
from atmerge.models import patching
from atmerge.models.adapter import adapter_for
from atmerge.runtime import MergeState
from atmerge.stats import MergeStats


def patch(
    model: nn.Module,
    method: Method | str | Path,
    *,
    prop_attn: bool | None = None,
    prune_last_block: bool | None = None,
    trace_source: bool = False,
) -> nn.Module:
    """Patch a timm VisionTransformer or a Hugging Face ViT / DeiT / DINOv2 / CLIP vision model in
    place so that every block reduces tokens with ``method``.

    prop_attn: add log(merge size) to the attention logits (proportional attention).  None = the
        model's default if it has one (off for ``mae_vit_base_ft``, as in the paper), else the
        method's own (``method.proportional_attention``: on for the merging methods, off for EViT
        as released).
    prune_last_block: in the last block only the protected tokens (CLS, distillation token,
        registers) reach the MLP — the paper's rule (Appendix A).  It changes no output of a
        CLS-pooled model and saves the last MLP's cost on the other tokens.  None = on for
        CLS-pooled models (timm ``global_pool='token'``; Hugging Face ``*ForImageClassification``
        that read CLS), off otherwise; the same rule for every method.
    trace_source: track which original patches each token holds (``merge_source(model)``), for
        visualisation and dense outputs; costs an extra [B, N, N] tensor.
    method may also be the path of a config written by :func:`atmerge.save_config` (a warning
    says so if it was calibrated on another model).
    Returns the same model object.  Patching a patched model replaces its method and options.
    """
    if isinstance(method, (str, Path)):
        from atmerge.config import load_method

        method = load_method(method, model)
    if not isinstance(method, Method):
        raise TypeError(f"method must be an atmerge method such as atmerge.ATM(...), got {type(method).__name__}")
    for name, value in (("prop_attn", prop_attn), ("prune_last_block", prune_last_block)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be True, False or None (the default), got {value!r}")
    if not isinstance(trace_source, bool):
        raise ValueError(f"trace_source must be True or False, got {trace_source!r}")
    adapter = adapter_for(model)
    method.check_depth(len(adapter.blocks(model)))
    if method.needs_cls_token and not adapter.has_cls_token(model):
        raise ValueError(
            f"{type(method).__name__} ranks tokens by the CLS token's attention and this model has no CLS token "
            "(class_token=False); choose a method that does not need one, e.g. atmerge.ToMe or atmerge.ATM"
        )
    prop = prop_attn if prop_attn is not None else adapter.default_prop_attn(model)
    prop = method.proportional_attention if prop is None else prop

    cls_pooled = adapter.cls_pooled(model)
    if prune_last_block and not cls_pooled:
        raise ValueError(
            "prune_last_block=True keeps only the CLS token in the last block, which changes the "
            "output of a model that does not pool with CLS (timm: global_pool='token'; Hugging Face: "
            "the image classifiers that read CLS); pass None or False"
        )
    state = MergeState(
        method,
        adapter.cost(model),
        num_protected=adapter.num_protected(model),
        prop_attn=bool(prop),
        trace_source=bool(trace_source),
        prune_last=cls_pooled if prune_last_block is None else prune_last_block,
    )
    return patching.patch_model(model, adapter, state)


def unpatch(model: nn.Module) -> nn.Module:
    """Restore a patched model to its original classes (outputs bit-for-bit the original's).
    A model that is not patched is returned unchanged."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch takes a model (torch.nn.Module), got {type(model).__name__}")
    return patching.unpatch_model(model)


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` is currently patched by atmerge."""
    return patching.is_patched(model)


def last_stats(model: nn.Module) -> MergeStats:
    """Token counts, merges, thresholds and GFLOPs of the last forward pass of a patched model."""
    return patching.merge_state(model).stats()


def merge_source(model: nn.Module):
    """[B, N, N0] 0/1 map from the tokens of the last block to the original tokens (patched with
    ``trace_source=True``); None otherwise."""
    return patching.merge_state(model).source


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
    return spread_by_source(source, tokens)


def gflops(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> float:
    """GFLOPs (1e9 multiply-adds) per image of an unpatched model at ``input_size`` (C, H, W)."""
    adapter = adapter_for(model)
    if patching.is_patched(model):
        raise ValueError(
            "gflops() counts the unpatched model; a patched model's cost depends on the images: "
            "run it and read atmerge.last_stats(model).gflops"
        )
    size = tuple(input_size) if isinstance(input_size, (tuple, list)) else ()
    if len(size) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
        raise ValueError(f"input_size must be (C, H, W), three positive integers, got {input_size!r}")
    return adapter.dense_gflops(model, size)
