"""Calibrate a method for the user's own model from unlabeled images (issue 9, first part).

Goals, judged by agreement with the unpatched model's own predictions (no labels needed):
  * budget: the most faithful setting whose mean GFLOPs on the calibration images is within a
    share of the unpatched model's (or an absolute figure);
  * floor: the cheapest setting whose agreement's one-sided 95% Wilson lower bound is at least
    the floor (the label-free stress test).
Every setting comes from the same Optuna search over the method's own space
(:func:`atmerge.experiments.search.search`), so every method is calibrated the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from atmerge.fidelity import wilson_interval
from atmerge.methods.base import Method
from atmerge.methods.registry import build_method

ONE_SIDED_95 = 1.644854  # z of a one-sided 95% bound
RUNGS = (0.125, 0.25, 0.5, 1.0)  # shares of the calibration images a trial must survive in turn
COST_SLACK = 1.05  # a partial GFLOPs estimate this far above a bar stops the trial
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Calibration:
    """What :func:`calibrate` chose and why.

    method: the chosen method.  goal: 'budget' or 'floor'; target: the GFLOPs budget (per image)
    or the agreement floor.  met: whether a trial met the goal (if not, ``method`` is the
    closest: the cheapest trial for a budget, the most faithful for a floor).
    gflops / gflops_share: mean per-image cost on the calibration images, and its share of the
    unpatched model's.  agreement: share of calibration images whose predicted class is the
    unpatched model's; agreement_low: its one-sided 95% Wilson lower bound.  trials: every
    trial of the search.
    """

    method: Method
    goal: str
    target: float
    met: bool
    gflops: float
    gflops_share: float
    agreement: float
    agreement_low: float
    images: int
    unpatched_gflops: float
    trials: list[dict] = field(default_factory=list)


def agreement_lower_bound(agreement: float, images: int) -> float:
    """One-sided 95% Wilson lower bound of an agreement measured on ``images`` images."""
    successes = round(agreement * images)
    return wilson_interval(successes, images, z=ONE_SIDED_95)[0]


def choose_within_budget(trials: list[dict], budget_gflops: float) -> tuple[dict, bool]:
    """The trial with the highest agreement (then the lowest GFLOPs) among those whose GFLOPs are
    within the budget; (the cheapest trial, False) when none is."""
    within = [t for t in trials if t["gflops"] <= budget_gflops]
    if not within:
        return min(trials, key=lambda t: t["gflops"]), False
    return max(within, key=lambda t: (t["agreement"], -t["gflops"])), True


def choose_above_floor(trials: list[dict], floor: float, images: int) -> tuple[dict, bool]:
    """The cheapest trial whose agreement's one-sided 95% lower bound is at least ``floor``;
    (the most faithful trial, False) when none is."""
    above = [t for t in trials if agreement_lower_bound(t["agreement"], images) >= floor]
    if not above:
        return max(trials, key=lambda t: (t["agreement"], -t["gflops"])), False
    return min(above, key=lambda t: (t["gflops"], -t["agreement"])), True


def hopeless(goal: str, target: float, agreement: float, images: int, gflops: float, finished: list[dict]) -> bool:
    """Whether a trial measured on ``images`` of the calibration images so far cannot win, so its
    remaining images are skipped (successive halving).

    budget goal: its cost estimate is above the budget (× COST_SLACK), or the 95% upper bound of
    its agreement is below the best finished trial within the budget.  floor goal: the upper
    bound is below the floor, or its cost is above the cheapest finished trial that clears the
    floor (× COST_SLACK)."""
    upper = wilson_interval(round(agreement * images), images)[1]
    if goal == "budget":
        best = max((t["agreement"] for t in finished if t["gflops"] <= target), default=None)
        return gflops > target * COST_SLACK or (best is not None and upper < best)
    cheapest = min((t["gflops"] for t in finished if t["agreement_low"] >= target), default=None)
    return upper < target or (cheapest is not None and gflops > cheapest * COST_SLACK)


def staged_trials(
    model: nn.Module,
    batches: list[torch.Tensor],
    base: Method,
    predictions: torch.Tensor,
    *,
    goal: str,
    target: float,
    trials: int,
    seed: int = 0,
    rungs: tuple[float, ...] = RUNGS,
    progress: bool = False,
) -> list[dict]:
    """Optuna (TPE, seeded, constrained) over ``base``'s search space, each trial run on growing
    shares of the calibration ``batches`` (``rungs``) and stopped as soon as it is
    :func:`hopeless`.  predictions: the unpatched model's classes on all images.  Returns every
    trial's row: its settings, GFLOPs and agreement on the images it ran on, ``images`` and
    ``pruned``."""
    import optuna

    from atmerge.api import last_stats, patch, unpatch

    space = type(base).search_space(len(model.blocks), model.patch_embed.num_patches)
    total = sum(x.shape[0] for x in batches)
    counts = torch.tensor([x.shape[0] for x in batches]).cumsum(0)
    bounds = sorted({int(torch.searchsorted(counts, math.ceil(share * total)).item()) + 1 for share in rungs})
    rows: list[dict] = []

    def objective(trial) -> float:
        params = {name: knob.suggest(trial, name) for name, knob in space.items()}
        patch(model, base.with_params(params))
        agree = images = 0
        gflops_sum, done = 0.0, 0
        for step, bound in enumerate(bounds):
            with torch.no_grad():
                for x in batches[done:bound]:
                    n = x.shape[0]
                    agree += int((model(x).argmax(-1).cpu() == predictions[images : images + n]).sum())
                    gflops_sum += last_stats(model).gflops * n
                    images += n
            done = bound
            agreement, gflops = agree / images, gflops_sum / images
            low = agreement_lower_bound(agreement, images)
            row = {"trial": trial.number, **params, "gflops": gflops, "agreement": agreement, "agreement_low": low,
                   "images": images, "pruned": False}
            value = agreement if goal == "budget" else gflops
            broken = gflops - target if goal == "budget" else target - low  # > 0: goal not met
            if images < total:
                trial.report(value, step)
                if hopeless(goal, target, agreement, images, gflops, [r for r in rows if not r["pruned"]]):
                    rows.append({**row, "pruned": True})
                    trial.set_constraint("goal", max(broken, 1e-9))
                    raise optuna.TrialPruned()
        rows.append(row)
        trial.set_constraint("goal", broken)
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(direction="maximize" if goal == "budget" else "minimize", sampler=sampler)
    study.optimize(objective, n_trials=trials, show_progress_bar=progress)
    unpatch(model)
    return rows


def image_files(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, any layout), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def folder_batches(
    folder: str | Path, transform, batch_size: int, limit: int | None = None, seed: int = 0
) -> tuple[list[torch.Tensor], int]:
    """Batches [B, C, H, W] of the images under ``folder`` (a seeded random ``limit`` of them);
    unreadable files are skipped and counted.  Returns (batches, skipped)."""
    from PIL import Image, UnidentifiedImageError

    files = image_files(folder)
    if limit is not None and limit < len(files):
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:limit]
        files = [files[i] for i in sorted(order.tolist())]
    images, skipped = [], 0
    for path in files:
        try:
            with Image.open(path) as img:
                images.append(transform(img.convert("RGB")))
        except (UnidentifiedImageError, OSError):
            skipped += 1
    if not images:
        raise ValueError(f"none of the images under {folder} could be read ({skipped} skipped)")
    return list(torch.stack(images).split(batch_size)), skipped


def _image_batches(images, model: nn.Module, batch_size: int, transform) -> tuple[list[torch.Tensor], int]:
    if isinstance(images, (str, Path)):
        if transform is None:
            from atmerge.data import model_transform

            transform = model_transform(model)
        return folder_batches(images, transform, batch_size)
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"images must be a non-empty [N, C, H, W] tensor, got shape {list(images.shape)}")
        return list(images.split(batch_size)), 0
    if isinstance(images, Iterable):
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in images]
        if not batches:
            raise ValueError("the image loader yielded no batches")
        return batches, 0
    raise TypeError(f"images must be a folder path, a tensor or a loader of batches, got {type(images).__name__}")


def calibrate(
    model: nn.Module,
    images,
    *,
    method: Method | str = "atm",
    budget: float | None = None,
    budget_gflops: float | None = None,
    min_agreement: float | None = None,
    trials: int = 40,
    seed: int = 0,
    batch_size: int = 64,
    transform=None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    early_stop: bool = True,
) -> Calibration:
    """Choose ``method``'s settings for ``model`` from unlabeled ``images`` (a folder, searched
    recursively with the model's timm preprocessing or ``transform``; a tensor [N, C, H, W]; or
    a loader of batches — labels ignored).

    Exactly one goal: ``budget`` (a share in (0, 1) of the unpatched model's mean GFLOPs on these
    images) or ``budget_gflops`` (GFLOPs per image), or ``min_agreement`` in (0, 1] (the floor).
    early_stop: run each trial on growing shares of the images (1/8, 1/4, 1/2, all) and stop it
    once it cannot win (:func:`staged_trials`); False: every trial sees every image (the Pareto
    search of :func:`atmerge.experiments.search.search`).  Only trials that saw every image are
    chosen.
    """
    from atmerge.experiments.search import search, trial_method, unpatched_predictions

    goals = {"budget": budget, "budget_gflops": budget_gflops, "min_agreement": min_agreement}
    given = [k for k, v in goals.items() if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one goal of budget, budget_gflops, min_agreement; got {given or 'none'}")
    if budget is not None and not (isinstance(budget, (int, float)) and 0 < budget < 1):
        raise ValueError(f"budget={budget!r} is a share of the unpatched GFLOPs; allowed (0, 1)")
    if budget_gflops is not None and not (isinstance(budget_gflops, (int, float)) and budget_gflops > 0):
        raise ValueError(f"budget_gflops={budget_gflops!r} must be a positive number of GFLOPs per image")
    if min_agreement is not None and not (isinstance(min_agreement, (int, float)) and 0 < min_agreement <= 1):
        raise ValueError(f"min_agreement={min_agreement!r} is out of range; allowed (0, 1]")
    if getattr(model, "num_classes", 1) == 0:
        raise ValueError("calibrate judges agreement of predicted classes: it needs a classifier (num_classes > 0)")
    base = build_method(method) if isinstance(method, str) else method
    batches, _ = _image_batches(images, model, batch_size, transform)
    pairs = [(x, None) for x in batches]
    reference = unpatched_predictions(model, pairs, cache_dir)
    dense, n = reference[0]["gflops"], reference[0]["images"]
    goal = "budget" if min_agreement is None else "floor"
    target = min_agreement if goal == "floor" else (budget * dense if budget is not None else budget_gflops)
    if early_stop:
        rows = staged_trials(model, batches, base, reference[1], goal=goal, target=target, trials=trials, seed=seed,
                             progress=progress)
    else:
        rows = search(model, pairs, method=base, goal="pareto", metric="agreement", trials=trials, seed=seed,
                      reference=reference, progress=progress)["trials"]
    finished = [r for r in rows if not r.get("pruned")]
    if goal == "budget":
        chosen, met = choose_within_budget(finished, target)
    else:
        chosen, met = choose_above_floor(finished, target, n)
    return Calibration(
        method=trial_method(base, chosen, len(model.blocks), model.patch_embed.num_patches),
        goal=goal,
        target=float(target),
        met=met,
        gflops=chosen["gflops"],
        gflops_share=chosen["gflops"] / dense,
        agreement=chosen["agreement"],
        agreement_low=agreement_lower_bound(chosen["agreement"], n),
        images=n,
        unpatched_gflops=dense,
        trials=rows,
    )
