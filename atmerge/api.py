"""The public functions: patch a model with a method, undo it, read statistics, count FLOPs.
The model's family is found by :func:`atmerge.models.families.adapter_for`."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import nn

from atmerge.core.merging import spread_by_source
from atmerge.methods.base import Method
from atmerge.models import patching
from atmerge.models.families import adapter_for
from atmerge.runtime import MergeState
from atmerge.stats import MergeStats


def patch(
    model: nn.Module,
    method: Method,
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
    A saved config is read by :func:`atmerge.load_method` (the workflows' job, not the core's):
    ``patch(model, atmerge.load_method(path, model))``.
    Returns the same model object.  Patching a patched model replaces its method and options.
    """
    if isinstance(method, (str, Path)):
        raise TypeError(
            f"method must be an atmerge method; to patch with the config {str(method)!r} use "
            f"atmerge.patch(model, atmerge.load_method(path, model))"
        )
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


def _calibration_batches(images, model: nn.Module, batch_size: int):
    """Batches [B, C, H, W] of ``images``: a tensor [N, C, H, W] (split into ``batch_size``), an
    iterable of batches (or of (batch, labels)), or a folder (the model's preprocessing)."""
    if isinstance(images, (str, Path)):
        from atmerge.data import folder_batches, model_transform

        yield from folder_batches(images, model_transform(model), batch_size)[0]
        return
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be a [N, C, H, W] tensor, got shape {list(images.shape)}")
        yield from images.split(batch_size)
        return
    try:
        iterator = iter(images)
    except TypeError:
        raise TypeError(
            f"images must be a tensor [N, C, H, W], an iterable of batches or a folder, got {type(images).__name__}"
        ) from None
    for batch in iterator:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


@contextlib.contextmanager
def _restore_mode(model: nn.Module, training: bool):
    try:
        yield
    finally:
        model.train(training)


def _weighted_quantile(values: list[float], weights: list[float], q: float) -> float:
    """The smallest value whose cumulative weight reaches q of the total (q = 1: the largest)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    total, seen = sum(weights), 0.0
    for i in order:
        seen += weights[i]
        if seen >= q * total - 1e-9:
            return values[i]
    return values[order[-1]]


def freeze(model: nn.Module, images, quantile: float | None = None, *, batch_size: int = 64) -> Method:
    """A fixed-count form of the adaptive method ``model`` is patched with (ATM, constant θ):
    run the patched model on calibration ``images`` (a tensor [N, C, H, W], an iterable of
    batches, or a folder), record each block's merge count, and return a
    :class:`~atmerge.methods.frozen.Frozen` method with the source's matching rules (ATM's
    size-distinctive split after l_s, its similarity) and those counts.

    quantile: None = each block merges the mean count over the images (rounded so that the
        tokens entering every block stay within ½ of the mean: the same GFLOPs as the adaptive
        setting on these images, to the rounding of counts); q in (0, 1] = the q-quantile of the
        counts in each block (1: the largest; fewer tokens than the mean).  The counts are those
        of a forward pass — one per batch for batch-adaptive ATM (its r is the batch's mean), one
        per image with ``batch_adaptive=False`` — weighted by images.
    A method whose counts are already fixed (ToMe, top-r, MCTF, EViT, Zero-TP, a frozen one) is
    returned as it is.  Patch the frozen method with the options the model has now (prop_attn,
    prune_last_block): ``atmerge.patch(model, atmerge.freeze(model, images))``.  The model's last
    statistics are those of the last calibration batch afterwards.
    """
    from atmerge.methods.atm import ATM
    from atmerge.methods.frozen import Frozen
    from atmerge.methods.registry import METHODS
    from atmerge.methods.constant import ConstantThreshold

    if not isinstance(model, nn.Module) or not patching.is_patched(model):
        raise ValueError("freeze needs a model patched by atmerge.patch(model, method); this model is not patched")
    if quantile is not None and (
        isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 < quantile <= 1
    ):
        raise ValueError(f"quantile={quantile!r} is out of range; allowed (0, 1], or None for the mean count")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    state = patching.merge_state(model)
    method = state.method
    if not method.adaptive:
        return method
    if not isinstance(method, (ATM, ConstantThreshold)):
        raise ValueError(
            f"freeze knows the matching rules of ATM and the constant threshold, not of {type(method).__name__}"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    samples: list[list[float]] = []  # merges per block of one sample (a batch, or an image)
    weights: list[float] = []
    first_tokens = None
    was_training = model.training
    model.eval()  # the counts of inference (no dropout); the mode is restored below
    with torch.no_grad(), _restore_mode(model, was_training):
        for batch in _calibration_batches(images, model, batch_size):
            if batch.shape[0] == 0:
                continue
            model(batch.to(device))
            if len(state.records) != state.depth:
                raise RuntimeError("the patched model's forward did not run every block")
            first_tokens = state.records[0].tokens_in
            if state.per_image_counts:  # every image merged its own counts
                merged = torch.stack([c[2] for c in state.per_image_counts], dim=1).double().cpu()  # [B, depth]
                samples.extend(merged.tolist())
                weights.extend([1.0] * merged.shape[0])
            else:
                samples.append([float(r.merged) for r in state.records])
                weights.append(float(batch.shape[0]))
    if not samples:
        raise ValueError("freeze needs at least one calibration image; got 0 images")
    depth, p = state.depth, state.num_protected
    total = sum(weights)
    if quantile is None:
        counts, cumulative, kept = [], 0.0, 0
        for block in range(depth):  # round the running total: tokens per block stay within ½ of the mean
            cumulative += sum(w * s[block] for s, w in zip(samples, weights)) / total
            counts.append(max(int(math.floor(cumulative + 0.5)) - kept, 0))
            kept += counts[-1]
    else:
        counts = [
            int(round(_weighted_quantile([s[b] for s in samples], weights, float(quantile)))) for b in range(depth)
        ]
    if isinstance(method, ATM):
        split_layer, similarity = method.resolved_split_layer(depth), method.similarity
    else:
        split_layer, similarity = None, "raw"
    # clip every block's count to its set A, so the frozen schedule runs exactly as given
    n = first_tokens
    for block in range(depth):
        size_distinctive = split_layer is not None and block + 1 > split_layer
        free = n - p
        num_a = free // 2 if size_distinctive or p % 2 else (free + 1) // 2
        num_b = free - num_a
        counts[block] = min(counts[block], num_a if num_b > 0 else 0)
        n -= counts[block]
    source = next(k for k, v in METHODS.items() if type(method) is v)
    return Frozen(counts=tuple(counts), split_layer=split_layer, similarity=similarity, frozen_from=source)
