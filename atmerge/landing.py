"""Land a tuned setting on its goal: move it along the method's own cost dial
(:meth:`atmerge.Method.dial`, its one-knob family through the setting) so that a budget is used
rather than left unspent, or a floor is met as cheaply as the dial allows.

Bisection runs on the searched images; the caller confirms the result on held-out images.
Costs grow with the dial's t, so a budget is landed on the largest t whose mean cost is within
it (never past it), a floor on the smallest t whose fidelity bound still clears it.  A fixed-count
method's cost does not depend on the images, so its dial is bisected on a handful of them; an
adaptive one's is searched by interpolation once bracketed, and stops once a cost lands within
``window`` below the budget.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from atmerge.api import patch, unpatch
from atmerge.evaluate import run_batches
from atmerge.methods.base import Method
from atmerge.tuning import ONE_SIDED_95, interval, per_image_values

LANDING_STEPS = 12  # bisection steps of a budget's cost at most: t to within 1/4096 of the dial's range
FLOOR_STEPS = 6  # bisection steps of a floor (each measures fidelity on the searched images)
FIRST_LOOK = 0.25  # share of the images a floor step sees first; it stops there if it cannot clear
COST_IMAGES = 1024  # images the cost of an adaptive setting is measured on while landing
FIXED_COST_IMAGES = 8  # images a fixed-count setting's cost is measured on (it is the same on any image)


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
    """The images a cost is measured on: FIXED_COST_IMAGES for a fixed-count method (its cost does
    not depend on the images), the first COST_IMAGES otherwise."""
    if not method.adaptive:
        return [batches[0][:FIXED_COST_IMAGES]]
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


def setting_cost(model: nn.Module, method: Method, batches: list[torch.Tensor]) -> float:
    """``method``'s mean GFLOPs per image on the images its cost is measured on
    (:func:`_cost_batches` of ``batches``)."""
    return _run(model, method, _cost_batches(method, batches)).gflops


def land_on_budget(
    model: nn.Module,
    dial: Callable[[float], Method],
    target: float,
    batches: list[torch.Tensor],
    *,
    window: float = 0.0,
    cost_of: Callable[[Method], float] | None = None,
) -> Landing | None:
    """The largest t (bisected, at most LANDING_STEPS steps) whose setting's mean GFLOPs per image
    on ``batches`` is at most ``target``; None when even t = 0 is above it.  window: stop as soon
    as a setting costs within ``window`` GFLOPs below ``target`` (0: bisect every step).
    cost_of: how a setting's cost is measured (default :func:`setting_cost` on ``batches``; a
    caller passes its own to share measurements between landings)."""
    seen: dict[str, float] = {}
    measure = cost_of or (lambda method: setting_cost(model, method, batches))

    def cost(t: float) -> tuple[Method, float]:
        method = dial(t)
        key = repr(method)
        if key not in seen:
            seen[key] = measure(method)
        return method, seen[key]

    low_method, low_cost = cost(0.0)
    if low_cost > target:
        return None
    best = Landing(0.0, low_method, low_cost)
    low, high = (0.0, low_cost), (1.0, None)  # (t, cost): within the budget, past it (cost unknown)
    sides: list[str] = []  # which end each step moved: the same one twice in a row → bisect once
    for _ in range(LANDING_STEPS):
        mid = (low[0] + high[0]) / 2
        stalled = len(sides) >= 2 and sides[-1] == sides[-2]
        if window and high[1] is not None and high[1] > low[1] and not stalled:
            # the cost is smooth in t: aim at the middle of the window by linear interpolation
            share = (target - window / 2 - low[1]) / (high[1] - low[1])
            mid = low[0] + (high[0] - low[0]) * min(max(share, 0.05), 0.95)
        method, gflops = cost(mid)
        sides.append("low" if gflops <= target else "high")
        if stalled:
            sides.append("bisected")
        if gflops <= target:
            low = (mid, gflops)
            if gflops >= best.gflops:
                best = Landing(mid, method, gflops)
            if window and gflops >= target - window:
                break
        else:
            high = (mid, gflops)
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
    seen: dict | None = None,
) -> Landing | None:
    """The smallest t (bisected) whose setting's fidelity on ``batches`` still clears ``floor``
    (its one-sided 95% lower bound, or its mean for ``bound='mean'``); None when even t = 1 does
    not.  seen: measurements by setting (repr) to reuse and add to, e.g. between the goals of one
    calibration."""
    seen = {} if seen is None else seen
    first = max(1, round(FIRST_LOOK * len(batches)))

    def numbers(method: Method, images: int, run) -> Landing:
        values = per_image_values(run.outputs, reference[:images], measure)
        return Landing(0.0, method, run.gflops, float(values.mean()), interval(values, measure, ONE_SIDED_95)[0])

    def measured(t: float) -> Landing:
        method = dial(t)
        key = repr(method)
        if key not in seen:  # a first look at FIRST_LOOK of the images (kept apart: another floor may need more)
            if (key, "first") not in seen:
                run = _run(model, method, batches[:first])
                values = per_image_values(run.outputs, reference[: run.images], measure)
                seen[key, "first"] = (interval(values, measure)[1], numbers(method, run.images, run))
                if first >= len(batches):
                    seen[key] = seen[key, "first"][1]
            upper, look = seen[key, "first"]
            if upper < floor:  # it cannot clear: the first look stands
                return dataclasses.replace(look, t=t)
            if key not in seen:  # it may clear: measure it on every image
                seen[key] = numbers(method, reference.shape[0], _run(model, method, batches))
        return dataclasses.replace(seen[key], t=t)

    def clears(landing: Landing) -> bool:
        return (landing.fidelity_low if bound == "low" else landing.fidelity) >= floor

    before = len(seen)
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
    best.steps = max(len(seen) - before, 1)
    return best
