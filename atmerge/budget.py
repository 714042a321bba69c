"""Compare methods at equal cost: find the setting whose mean GFLOPs hits a budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable, Sequence

import torch
from torch import nn

from atmerge.api import last_stats, patch
from atmerge.methods.base import Method


@dataclass(frozen=True)
class BudgetMatch:
    """The chosen knob value, its method, and its mean GFLOPs on the calibration images."""

    knob: float
    method: Method
    gflops: float
    within_budget: bool


@torch.no_grad()
def mean_gflops(model: nn.Module, method: Method, batches: Sequence[torch.Tensor], **patch_kwargs) -> float:
    """Mean per-image GFLOPs of ``model`` patched with ``method`` over image ``batches``."""
    patch(model, method, **patch_kwargs)
    total = images = 0
    for x in batches:
        model(x)
        total += last_stats(model).gflops * x.shape[0]
        images += x.shape[0]
    if images == 0:
        raise ValueError("no images to measure GFLOPs on; pass at least one non-empty batch")
    return total / images


def match_gflops(
    model: nn.Module,
    method_factory: Callable[[float], Method],
    target_gflops: float,
    batches: Sequence[torch.Tensor],
    *,
    low: float = 0.0,
    high: float = 1.0,
    steps: int = 10,
    **patch_kwargs,
) -> BudgetMatch:
    """Bisect a scalar knob in [low, high] so that ``method_factory(knob)`` costs as close to
    ``target_gflops`` as possible without exceeding it (mean over ``batches``).

    The cost must grow with the knob (e.g. a threshold: higher → fewer merges → more GFLOPs).
    If even ``low`` exceeds the budget, the cheapest setting is returned with within_budget=False.
    The model is left patched with the returned method.
    """
    if (
        isinstance(target_gflops, bool)
        or not isinstance(target_gflops, (int, float))
        or not 0 < target_gflops < math.inf
    ):
        raise ValueError(f"target_gflops must be positive, got {target_gflops!r}; pass GFLOPs per image")
    best: BudgetMatch | None = None
    cheapest: BudgetMatch | None = None
    for _ in range(steps):
        knob = (low + high) / 2
        method = method_factory(knob)
        g = mean_gflops(model, method, batches, **patch_kwargs)
        candidate = BudgetMatch(knob, method, g, g <= target_gflops)
        if cheapest is None or g < cheapest.gflops:
            cheapest = candidate
        if g <= target_gflops:
            if best is None or g > best.gflops:
                best = candidate
            low = knob
        else:
            high = knob
    if best is None:
        low_method = method_factory(low)
        g = mean_gflops(model, low_method, batches, **patch_kwargs)
        best = BudgetMatch(low, low_method, g, g <= target_gflops)
        if not best.within_budget and cheapest.gflops < g:
            best = cheapest
    patch(model, best.method, **patch_kwargs)
    return best
