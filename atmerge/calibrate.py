"""Calibrate a method for the user's own model from unlabeled images.

Fidelity needs no labels: agreement of the predicted class with the unpatched model's for a
classifier, cosine of the outputs for a feature model (``num_classes=0``).  Goals:
  * budget: the most faithful setting whose mean GFLOPs on the calibration images is within a
    share of the unpatched model's (or an absolute figure);
  * floor: the cheapest setting whose fidelity's one-sided 95% lower bound (Wilson for
    agreement, normal approximation for the mean cosine) is at least the floor — the label-free
    stress test.
Every method is searched over its own settings (``Method.search_space``), fitted to the model's
own similarity scores (:mod:`atmerge.profile`), with Optuna (multivariate TPE, seeded); each
trial runs on growing shares of the images and stops once it cannot win.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable

import torch
from torch import nn

from atmerge.api import patch, unpatch
from atmerge.data import IMAGE_SUFFIXES, folder_batches, image_files  # noqa: F401  (kept importable from here)
from atmerge.evaluate import run_batches
from atmerge.fidelity import FIDELITY_MEASURES, fidelity_interval, paired_fidelity, per_image_fidelity
from atmerge.methods.base import Method
from atmerge.methods.registry import build_method
from atmerge.models.adapter import is_classifier, model_depth, model_patches
from atmerge.tuning import (  # noqa: F401  (the engine's names stay importable from here)
    CONFIRM_TRIES,
    COST_SLACK,
    ONE_SIDED_95,
    RUNGS,
    Goal,
    agreement_lower_bound,
    confirm,
    hopeless,
    split_holdout,
    staged_trials,
)


@dataclass
class Calibration:
    """What :func:`calibrate` chose and why.

    method: the chosen method.  goal: 'budget' or 'floor'; target: the GFLOPs budget (per image)
    or the fidelity floor.  met: whether a trial met the goal (if not, ``method`` is the
    closest: the cheapest trial for a budget, the most faithful for a floor).
    The search runs on ``search_images`` of the calibration images; the chosen setting is then
    measured on the ``images`` held out from it (confirmation), and these numbers are reported:
    measure: 'agreement' or 'cosine'; fidelity: its mean; fidelity_low: its one-sided 95% lower
    bound; gflops / gflops_share: mean per-image cost, and its share of the unpatched model's;
    details: the paired fidelity (agreement and its interval, top-5 agreement, mean KL, cosine;
    only the cosine for a feature model).  search: the same trial's numbers on the search
    images.  trials: every trial of the search; space: the searched ranges; profile: the
    model's score profile they were fitted to.
    """

    method: Method
    goal: str
    target: float
    met: bool
    measure: str
    gflops: float
    gflops_share: float
    fidelity: float
    fidelity_low: float
    images: int
    unpatched_gflops: float
    details: dict = field(default_factory=dict)
    trials: list[dict] = field(default_factory=list)
    space: dict = field(default_factory=dict)
    profile: dict | None = None
    search_images: int = 0
    search: dict = field(default_factory=dict)

    @property
    def agreement(self) -> float | None:
        """Top-1 agreement with the unpatched model on the calibration images (None for a
        feature model)."""
        return self.details.get("agreement")


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


def fidelity_measure(model: nn.Module, fidelity: str | None) -> str:
    """'agreement' for a classifier, 'cosine' for a feature model (``num_classes == 0``), unless
    ``fidelity`` names one; agreement on a feature model is refused."""
    features = not is_classifier(model)
    if fidelity is None:
        return "cosine" if features else "agreement"
    if fidelity not in FIDELITY_MEASURES:
        raise ValueError(f"fidelity={fidelity!r} is not supported; choose one of {FIDELITY_MEASURES}")
    if fidelity == "agreement" and features:
        raise ValueError(
            "fidelity='agreement' needs a classifier; this model outputs features (num_classes=0): use 'cosine'"
        )
    return fidelity


def resolve_goal(
    unpatched_gflops: float, *, budget=None, budget_gflops=None, min_agreement=None, min_cosine=None
) -> Goal:
    """Exactly one goal, checked; budget shares become GFLOPs per image."""
    goals = {"budget": budget, "budget_gflops": budget_gflops, "min_agreement": min_agreement, "min_cosine": min_cosine}
    given = [k for k, v in goals.items() if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one goal of {', '.join(goals)}; got {given or 'none'}")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if budget is not None:
        if not (number(budget) and 0 < budget < 1):
            raise ValueError(f"budget={budget!r} is a share of the unpatched GFLOPs; allowed (0, 1)")
        return Goal("budget", budget * unpatched_gflops)
    if budget_gflops is not None:
        if not (number(budget_gflops) and budget_gflops > 0):
            raise ValueError(f"budget_gflops={budget_gflops!r} must be a positive number of GFLOPs per image")
        return Goal("budget", float(budget_gflops))
    name, floor = given[0], goals[given[0]]
    if not (number(floor) and 0 < floor <= 1):
        raise ValueError(f"{name}={floor!r} is out of range; allowed (0, 1]")
    return Goal("floor", float(floor))


def calibrate(
    model: nn.Module,
    images,
    *,
    budget: float | None = None,
    budget_gflops: float | None = None,
    min_agreement: float | None = None,
    min_cosine: float | None = None,
    **options,
) -> Calibration:
    """Choose a method's settings for ``model`` from unlabeled ``images`` (a folder, searched
    recursively with the model's timm preprocessing or ``transform``; a tensor [N, C, H, W]; or
    a loader of batches — labels ignored).

    Exactly one goal: ``budget`` (a share in (0, 1) of the unpatched model's mean GFLOPs on these
    images) or ``budget_gflops`` (GFLOPs per image), or a floor in (0, 1] on the one-sided 95%
    lower bound of ``min_agreement`` (classifiers) or ``min_cosine`` (any model).
    options: those of :func:`calibrate_goals` (method='atm', fidelity, trials=40, seed, ...).
    """
    goal = dict(budget=budget, budget_gflops=budget_gflops, min_agreement=min_agreement, min_cosine=min_cosine)
    return calibrate_goals(model, images, [goal], **options)[0]


def calibrate_goals(
    model: nn.Module,
    images,
    goals: list[dict],
    *,
    method: Method | str = "atm",
    fidelity: str | None = None,
    trials: int = 40,
    seed: int = 0,
    batch_size: int = 64,
    transform=None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    early_stop: bool = True,
    fit_space: bool = True,
    paired: bool = True,
    holdout: float = 0.25,
) -> list[Calibration]:
    """:func:`calibrate` for several goals, e.g. ``[{"budget": 0.6}, {"min_agreement": 0.99}]``.

    method: a registry name or a method whose other settings stay fixed.  fidelity: 'agreement'
    or 'cosine' for budget goals (None: agreement for a classifier, cosine for a feature model).
    early_stop: run each trial on growing shares of the images (1/8, 1/4, 1/2, all) and stop it
    once it cannot win; False: every trial sees every image.  Only trials that saw every image
    are chosen.  fit_space: fit the search ranges to the model's own similarity scores on (up
    to 256 of) these images (:mod:`atmerge.profile`); False: the methods' default ranges (the
    ATM paper's grid).  cache_dir: where the unpatched outputs are kept between runs.
    With one goal (and ``early_stop``) the search is directed at it and stops hopeless trials;
    with several, one search of the (fidelity, GFLOPs) front serves them all, every trial on
    every image (the same trials for every goal).  paired: also measure each chosen setting's
    paired details (top-5 agreement, KL, ...; False: ``details`` stays empty).  holdout: the
    share of the images kept out of the search (every k-th image) on which the chosen setting
    must meet its goal again (:func:`confirm`); 0: confirm on the searched images themselves."""
    from atmerge.trials import trial_method, unpatched_outputs
    from atmerge.profile import score_profile

    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ValueError(f"trials={trials!r} must be an integer >= 1")
    if not goals:
        raise ValueError("give at least one goal: budget, budget_gflops, min_agreement or min_cosine")
    from atmerge.models.adapter import check_supported

    check_supported(model)  # before any image is read
    base = build_method(method) if isinstance(method, str) else method
    floors = {k for g in goals for k in ("min_agreement", "min_cosine") if g.get(k) is not None}
    if fidelity is None and floors == {"min_agreement"}:
        fidelity = "agreement"
    elif fidelity is None and floors == {"min_cosine"}:
        fidelity = "cosine"
    measure = fidelity_measure(model, fidelity)
    for floor in floors:
        if floor != f"min_{measure}":
            raise ValueError(f"{floor} does not fit fidelity measure {measure!r}; give min_{measure}")
    for g in goals:  # bad goals fail before any image is read
        resolve_goal(1.0, **g)
    batches, _ = _image_batches(images, model, batch_size, transform)
    pairs = [(x, None) for x in batches]
    summary, reference, _ = unpatched_outputs(model, pairs, cache_dir)
    dense = summary["gflops"]
    resolved = [resolve_goal(dense, **g) for g in goals]
    search_set, search_ref, confirm_set, confirm_ref = split_holdout(batches, reference, holdout, batch_size)
    depth, patches = model_depth(model), model_patches(model)
    profile = score_profile(model, search_set, limit=256) if fit_space else None
    space = type(base).search_space(depth, patches, profile)
    one = resolved[0] if len(resolved) == 1 and early_stop else None
    rows = staged_trials(
        model,
        search_set,
        base,
        search_ref,
        measure=measure,
        goal=one,
        trials=trials,
        seed=seed,
        rungs=RUNGS if early_stop else (1.0,),
        profile=profile,
        progress=progress,
    )
    measured: dict[int, dict] = {}

    def on_holdout(row: dict) -> dict:
        if row["trial"] not in measured:
            method = trial_method(base, row, depth, patches, profile)
            measured[row["trial"]] = _measure(model, confirm_set, method, confirm_ref, measure, paired)
        return measured[row["trial"]]

    results = []
    for goal in resolved:
        chosen, met = confirm(rows, goal, on_holdout)
        numbers = on_holdout(chosen)
        results.append(
            Calibration(
                method=trial_method(base, chosen, depth, patches, profile),
                goal=goal.kind,
                target=goal.target,
                met=met,
                measure=measure,
                gflops=numbers["gflops"],
                gflops_share=numbers["gflops"] / dense,
                fidelity=numbers["fidelity"],
                fidelity_low=numbers["fidelity_low"],
                images=numbers["images"],
                unpatched_gflops=dense,
                details=numbers["details"],
                trials=rows,
                search_images=sum(x.shape[0] for x in search_set),
                search={
                    "gflops": chosen["gflops"],
                    "fidelity": chosen["fidelity"],
                    "fidelity_low": chosen["fidelity_low"],
                },
                space={k: knob.describe() for k, knob in space.items()},
                profile=profile.as_dict() if profile is not None else None,
            )
        )
    return results


def _measure(
    model: nn.Module, batches: list[torch.Tensor], method: Method, reference: torch.Tensor, measure: str, paired: bool
) -> dict:
    """``method`` on ``batches``: mean GFLOPs, fidelity with its one-sided 95% lower bound, and
    (``paired``) the paired details — agreement and its interval, top-5 agreement, KL, cosine;
    only the cosine for a feature model."""
    patch(model, method)
    try:
        run = run_batches(model, batches)
    finally:
        unpatch(model)
    outputs = run.outputs
    values = per_image_fidelity(outputs, reference, measure)
    numbers = {
        "images": run.images,
        "gflops": run.gflops,
        "fidelity": float(values.mean()),
        "fidelity_low": fidelity_interval(values, measure, ONE_SIDED_95)[0],
        "details": {},
    }
    if paired and not is_classifier(model):
        cosine = per_image_fidelity(outputs, reference, "cosine")
        low, high = fidelity_interval(cosine, "cosine")
        numbers["details"] = {
            "images": run.images,
            "cosine": float(cosine.mean()),
            "cosine_low": low,
            "cosine_high": high,
        }
    elif paired:
        numbers["details"] = paired_fidelity(outputs, reference)
    return numbers
