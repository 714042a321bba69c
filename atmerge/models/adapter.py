"""What a model family must provide to be patched, and how the right adapter is found.

An adapter knows one family of models (timm ViTs, …): whether a model belongs to it and can be
patched, how images must look, what every token costs in every block, which tokens are
protected, and which classes to swap in.  The generic patching (class swap, unpatch, state
lookup) is :mod:`atmerge.models.patching`; the merging itself is :class:`atmerge.runtime.MergeState`
and the methods — shared by every family.

This module is the registry only: it imports no family.  A family's module registers its
adapter when imported (:func:`register_adapter`); :mod:`atmerge.models.families` imports the
built-in ones and installs the loader that brings in those imported on demand (the Hugging Face
family, once ``transformers`` is) before every lookup (:func:`register_family_loader`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from atmerge.flops import ModelCost


class UnsupportedModelError(TypeError):
    """The model is not one that atmerge can patch; the message says what is missing."""


class ModelAdapter(ABC):
    """One model family.  ``family``: how messages name it."""

    family: str = ""

    @abstractmethod
    def claims(self, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family (it may still be unsupported: :meth:`check`)."""

    @abstractmethod
    def check(self, model: nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` naming what is missing if ``model`` can't be patched."""

    @abstractmethod
    def check_images(self, model: nn.Module, images: object) -> tuple[int, int]:
        """Validate a batch the model is called with; return its patch grid (H/p, W/p)."""

    @abstractmethod
    def cost(self, model: nn.Module) -> ModelCost:
        """Per-token and per-image multiply-adds of every part (see :mod:`atmerge.flops`)."""

    @abstractmethod
    def dense_gflops(self, model: nn.Module, input_size: tuple[int, int, int]) -> float:
        """GFLOPs per image of the unpatched model at ``input_size`` (C, H, W)."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks in which tokens merge, in order."""

    @abstractmethod
    def num_protected(self, model: nn.Module) -> int:
        """Leading tokens that never merge (CLS, distillation token, registers)."""

    @abstractmethod
    def num_patches(self, model: nn.Module) -> int:
        """Patch tokens at the model's own input size."""

    @abstractmethod
    def cls_pooled(self, model: nn.Module) -> bool:
        """Whether only the CLS token reaches the head (the last block may then keep only it)."""

    @abstractmethod
    def patched_methods(self, cls: type) -> dict:
        """The methods that the patched subclass of ``cls`` (the model's or a block's class) overrides."""

    def patched_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules whose class is swapped for a patched subclass (default: the model and its blocks)."""
        return [model, *self.blocks(model)]

    def has_cls_token(self, model: nn.Module) -> bool:
        """Whether the first token is a CLS token (methods that rank tokens by its attention need one)."""
        return getattr(model, "cls_token", None) is not None

    def default_prop_attn(self, model: nn.Module) -> bool | None:
        """Proportional attention for this model when ``patch`` is not told (None: the method's
        own default); the paper turns it off for MAE."""
        return None

    def is_classifier(self, model: nn.Module) -> bool:
        """Whether the model ends in a class head (else it outputs features)."""
        return getattr(model, "num_classes", 1) != 0

    def main_output(self, model: nn.Module, output: object) -> torch.Tensor:
        """The tensor [B, K] a forward is judged on (logits of a classifier, else the pooled
        feature), from whatever the model returns."""
        return output


ADAPTERS: list[ModelAdapter] = []
_LOADERS: list[Callable[[], None]] = []


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Add a model family (its module calls this when imported)."""
    ADAPTERS.append(adapter)
    return adapter


def register_family_loader(load: Callable[[], None]) -> Callable[[], None]:
    """Have :func:`adapter_for` call ``load()`` before every lookup, so that a module above this
    one can import (and so register) families on demand; registering the same loader twice
    keeps one."""
    if load not in _LOADERS:
        _LOADERS.append(load)
    return load


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s family, checked: UnsupportedModelError names what is missing."""
    for load in _LOADERS:
        load()
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"atmerge patches torch models (nn.Module); got {type(model).__name__}")
    for adapter in ADAPTERS:
        if adapter.claims(model):
            adapter.check(model)
            return adapter
    families = ", ".join(a.family for a in ADAPTERS)
    raise UnsupportedModelError(f"atmerge patches {families}; got {type(model).__name__}")


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` if no adapter can patch ``model``."""
    adapter_for(model)


def model_depth(model: nn.Module) -> int:
    """Number of blocks in which tokens merge."""
    return len(adapter_for(model).blocks(model))


def model_patches(model: nn.Module) -> int:
    """Patch tokens at the model's own input size."""
    return adapter_for(model).num_patches(model)


def model_output(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``model(images)`` as the tensor [B, K] it is judged on (logits, or the pooled feature)."""
    return adapter_for(model).main_output(model, model(images))


def is_classifier(model: nn.Module) -> bool:
    """Whether ``model`` ends in a class head (else it outputs features)."""
    return adapter_for(model).is_classifier(model)


def check_model_images(model: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """Validate images for ``model``; return the patch grid."""
    return adapter_for(model).check_images(model, images)


def check_image_tensor(x: object) -> torch.Tensor:
    """Return ``x`` if it is a floating-point tensor (normalised pixels), else raise TypeError
    (RuntimeError for a torch.fx Proxy: symbolic tracing is not supported)."""
    from atmerge.models.patching import refuse_fx

    refuse_fx(x)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"
        raise TypeError(f"images must be a floating-point tensor [B, C, H, W] (normalised pixels), got {got}")
    return x
