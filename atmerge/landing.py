"""Land a tuned setting on its goal: move it along the method's own cost dial
(:meth:`atmerge.Method.dial`, its one-knob family through the setting) so that a budget is used
rather than left unspent, or a floor is met as cheaply as the dial allows.

Bisection runs on the searched images; the caller confirms the result on held-out images.
Costs grow with the dial's t, so a budget is landed on the largest t whose mean cost is within
it (never past it), a floor on the smallest t whose fidelity bound still clears it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from atmerge.api import patch, unpatch
from atmerge.evaluate import run_batches
from atmerge.methods.base import Method
from atmerge.tuning import ONE_SIDED_95, interval, per_image_values

LANDING_STEPS = 8  # bisection steps of a budget's cost: t to within 1/256 of the dial's range
FLOOR_STEPS = 6  # bisection steps of a floor (each measures fidelity on the searched images)
FIRST_LOOK = 0.25  # share of the images a floor step sees first; it stops there if it cannot clear
COST_IMAGES = 2048  # images the cost of an adaptive setting is bisected on (a fixed count needs one batch)


@dataclass
class Landing:
    """Where a setting landed: the dial's ``t``, the ``method`` there and its numbers on the
    searched images (``gflops``; for a floor also ``fidelity`` and ``fidelity_low``);
    ``steps``: the settings tried."""

    t: float
    method: Method
    gflops: float
    fidelity: float | None = None
    fidelity_low: float | None = None
    steps: int = 0


def _cost_batches(method: Method, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The images a cost is measured on: one batch for a fixed-count method (its cost does not
    depend on the images), the first COST_IMAGES otherwise."""
    if not method.adaptive:
        return batches[:1]
    kept, images = [], 0
    for x in batches:
        if images >= COST_IMAGES:
            break
        kept.append(x)
        images += x.shape[0]
    return kept


@torch.no_grad()
def _run(model: nn.Module, method: Method, batches: list[torch.Tensor]):
    patch(model, method)
    try:
        return run_batches(model, batches)
    finally:
        unpatch(model)


def land_on_budget(
    model: nn.Module, dial: Callable[[float], Method], target: float, batches: list[torch.Tensor]
) -> Landing | None:
    """The largest t (bisected, LANDING_STEPS steps) whose setting's mean GFLOPs per image on
    ``batches`` is at most ``target``; None when even t = 0 is above it."""
    seen: dict[str, float] = {}

    def cost(t: float) -> tuple[Method, float]:
        method = dial(t)
        key = repr(method)
        if key not in seen:
            seen[key] = _run(model, method, _cost_batches(method, batches)).gflops
        return method, seen[key]

    low_method, low_cost = cost(0.0)
    if low_cost > target:
        return None
    best = Landing(0.0, low_method, low_cost)
    low, high = 0.0, 1.0
    for _ in range(LANDING_STEPS):
        mid = (low + high) / 2
        method, gflops = cost(mid)
        if gflops <= target:
            low = mid
            if gflops >= best.gflops:
                best = Landing(mid, method, gflops)
        else:
            high = mid
    best.steps = len(seen)
    return best


def land_on_floor(
    model: nn.Module,
    dial: Callable[[float], Method],
    floor: float,
    batches: list[torch.Tensor],
    reference: torch.Tensor,
    measure: str,
    *,
    bound: str = "low",
) -> Landing | None:
    """The smallest t (bisected) whose setting's fidelity on ``batches`` still clears ``floor``
    (its one-sided 95% lower bound, or its mean for ``bound='mean'``); None when even t = 1 does
    not."""
    seen: dict[str, Landing] = {}
    first = max(1, round(FIRST_LOOK * len(batches)))

    def measured(t: float) -> Landing:
        method = dial(t)
        key = repr(method)
        if key not in seen:
            run = _run(model, method, batches[:first])
            values = per_image_values(run.outputs, reference[: run.images], measure)
            upper = interval(values, measure)[1]
            if upper >= floor and first < len(batches):  # it may clear: measure it on every image
                run = _run(model, method, batches)
                values = per_image_values(run.outputs, reference, measure)
            seen[key] = Landing(t, method, run.gflops, float(values.mean()), interval(values, measure, ONE_SIDED_95)[0])
        return seen[key]

    def clears(landing: Landing) -> bool:
        return (landing.fidelity_low if bound == "low" else landing.fidelity) >= floor

    top = measured(1.0)
    if not clears(top):
        return None
    best, low, high = top, 0.0, 1.0
    for _ in range(FLOOR_STEPS):
        mid = (low + high) / 2
        landing = measured(mid)
        if clears(landing):
            high = mid
            if landing.gflops <= best.gflops:
                best = landing
        else:
            low = mid
    best.steps = len(seen)
    return best
