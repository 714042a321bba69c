"""The one tuning engine: Optuna trials over a method's settings, staged on growing shares of the
images, and the held-out confirmation of the setting a goal picks.

It serves :func:`atmerge.calibrate` (label-free goals on a share of the GFLOPs or a fidelity
floor), ``atmerge search`` (a study of one method or several, with labels or without) and the
method comparison of ``method="auto"``.  A trial is judged by one *measure*:

* ``agreement`` — 1/0 per image, whether the predicted class is the unpatched model's;
* ``cosine`` — per image, the cosine of the output to the unpatched output (feature models);
* ``top1`` — 1/0 per image, whether the predicted class is the label (needs labels).

A goal is a budget (the most faithful setting whose mean GFLOPs per image is at most the target)
or a floor (the cheapest setting whose measure's one-sided 95% lower bound — or mean, for
``bound="mean"`` — is at least the target).  No goal: the (measure, GFLOPs) front.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from atmerge.api import patch, unpatch
from atmerge.evaluate import run_batches
from atmerge.fidelity import fidelity_interval, per_image_fidelity, wilson_interval
from atmerge.methods.base import Method
from atmerge.methods.space import starting_point
from atmerge.models.adapter import model_depth, model_patches

ONE_SIDED_95 = 1.644854  # z of a one-sided 95% bound
RUNGS = (0.125, 0.25, 0.5, 1.0)  # shares of the images a trial must survive in turn
COST_SLACK = 1.05  # a partial GFLOPs estimate this far above a bar stops the trial
CONFIRM_TRIES = 5  # candidates tried on the held-out images, best first, before giving up
FIXED_COST_IMAGES = 8  # images a fixed-count trial's cost is read on before any stage (it is the same on any image)
MEASURES = ("agreement", "cosine", "top1")


@dataclass(frozen=True)
class Goal:
    """kind 'budget' (target: GFLOPs per image) or 'floor' (target: the measure's bar).
    bound: what a floor is checked on — 'low' (the one-sided 95% lower bound) or 'mean'."""

    kind: str
    target: float
    bound: str = "low"

    def met_by(self, row: dict) -> bool:
        """Whether a trial's (or a confirmation's) numbers meet the goal."""
        if self.kind == "budget":
            return row["gflops"] <= self.target
        return row["fidelity_low" if self.bound == "low" else "fidelity"] >= self.target


def agreement_lower_bound(agreement: float, images: int) -> float:
    """One-sided 95% Wilson lower bound of an agreement measured on ``images`` images."""
    successes = round(agreement * images)
    return wilson_interval(successes, images, z=ONE_SIDED_95)[0]


def per_image_values(outputs: torch.Tensor, reference: torch.Tensor, measure: str) -> torch.Tensor:
    """[images] float64 values of ``measure``: against the unpatched ``reference`` outputs
    [images, K] ('agreement', 'cosine'), or against labels [images] ('top1')."""
    if measure == "top1":
        return (outputs.argmax(-1) == reference.to(outputs.device)).double()
    return per_image_fidelity(outputs, reference, measure)


def interval(values: torch.Tensor, measure: str, z: float = 1.959964) -> tuple[float, float]:
    """Interval of the mean of per-image ``values``: Wilson for the proportions (agreement,
    top-1), mean ± z·SE for cosine."""
    return fidelity_interval(values, "agreement" if measure == "top1" else measure, z)


def hopeless(goal: Goal, upper: float, gflops: float, finished: list[dict]) -> bool:
    """Whether a trial measured on part of the images so far cannot win, so its remaining images
    are skipped (successive halving).  upper: the two-sided 95% upper bound of its measure so
    far; gflops: its mean cost so far.

    budget goal: its cost is above the budget (× COST_SLACK), or ``upper`` is below the best
    finished trial within the budget.  floor goal: ``upper`` is below the floor, or its cost is
    above the cheapest finished trial that clears the floor (× COST_SLACK)."""
    if goal.kind == "budget":
        best = max((t["fidelity"] for t in finished if t["gflops"] <= goal.target), default=None)
        return gflops > goal.target * COST_SLACK or (best is not None and upper < best)
    if goal.kind == "floor":
        cheapest = min((t["gflops"] for t in finished if goal.met_by(t)), default=None)
        return upper < goal.target or (cheapest is not None and gflops > cheapest * COST_SLACK)
    return False


def staged_trials(
    model: nn.Module,
    batches: list[torch.Tensor],
    base: Method,
    reference: torch.Tensor,
    *,
    measure: str,
    goal: Goal | None,
    trials: int,
    seed: int = 0,
    rungs: tuple[float, ...] = RUNGS,
    profile=None,
    progress: bool = False,
    labels: torch.Tensor | None = None,
    also: tuple[str, ...] = (),
    rivals: list[dict] | tuple = (),
) -> list[dict]:
    """Optuna (multivariate TPE, seeded) over ``base``'s search space (fitted to ``profile``;
    the first trial is ``base``'s own settings where they lie in it), each trial run on growing
    shares of the image ``batches`` (``rungs``) and stopped as soon as it is :func:`hopeless`
    for ``goal``.  goal None: one study for several goals — the front of (measure, GFLOPs),
    every trial on every image.

    reference: the unpatched model's outputs on all images [images, K]; labels: [images], needed
    for the measure 'top1'.  also: further measures recorded in each row under their own name
    (e.g. a search by top-1 also records agreement).  rivals: finished trials of other methods on
    the same images and measure, which a trial must be able to beat to go on (a comparison of
    methods stops a method's hopeless trials against the leader so far).  A fixed-count trial's
    cost is read on FIXED_COST_IMAGES images first (it is the same on every image): one that
    cannot win on cost alone is stopped before any stage (``images`` 0, fidelity None).  A
    setting drawn again (integer spaces repeat) is not run again: its row is repeated with
    ``same_as`` naming the trial that ran it.  Returns
    every trial's row: its settings, GFLOPs and ``fidelity`` — the mean of ``measure`` — with its
    one-sided 95% lower bound, on the images it ran on, ``images`` and ``pruned``."""
    study, objective, rows = _study(
        model, batches, base, reference, measure, goal, seed, rungs, profile, labels, also, rivals
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna_experimental())
            study.optimize(objective, n_trials=trials, show_progress_bar=progress)
    finally:
        unpatch(model)
    return rows


def staged_trials_together(
    model: nn.Module,
    batches: list[torch.Tensor],
    bases: list[Method],
    reference: torch.Tensor,
    *,
    measure: str,
    goal: Goal,
    trials: int,
    seed: int = 0,
    rungs: tuple[float, ...] = RUNGS,
    profile=None,
) -> list[list[dict]]:
    """:func:`staged_trials` of several methods for one goal, their trials taken in turn (trial 1
    of each method, then trial 2 of each, ...), each method's own study seeded alike: every
    trial is stopped as soon as it cannot beat the best finished trial of *any* method so far, so
    that no method's search runs long against a bar the others have already raised.  Every
    method gets ``trials`` trials.  Returns each method's rows, in the order of ``bases``."""
    shared: list[dict] = []  # the finished trials of every method, the bar each trial must beat
    studies = [
        _study(model, batches, base, reference, measure, goal, seed, rungs, profile, None, (), shared) for base in bases
    ]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna_experimental())
            for _ in range(trials):
                for study, objective, rows in studies:
                    before = len(rows)
                    study.optimize(objective, n_trials=1)
                    shared.extend(r for r in rows[before:] if not r["pruned"] and "same_as" not in r)
    finally:
        unpatch(model)
    return [rows for _, _, rows in studies]


def optuna_experimental() -> type[Warning]:
    """Optuna's ExperimentalWarning (multivariate TPE, constraints), silenced around a study."""
    import optuna

    return optuna.exceptions.ExperimentalWarning


def _study(model, batches, base, reference, measure, goal, seed, rungs, profile, labels, also, rivals):
    """The Optuna study of :func:`staged_trials` and its objective, before any trial: (study,
    objective, rows — filled as trials run)."""
    import optuna

    if measure not in MEASURES or any(m not in MEASURES for m in also):
        raise ValueError(f"measure {measure!r} (also {also}) is not supported; choose from {MEASURES}")
    if "top1" in (measure, *also) and labels is None:
        raise ValueError("the measure 'top1' needs labels; these images have none: use 'agreement'")
    targets = {m: labels if m == "top1" else reference for m in (measure, *also)}
    space = type(base).search_space(model_depth(model), model_patches(model), profile)
    total = sum(x.shape[0] for x in batches)
    counts = torch.tensor([x.shape[0] for x in batches]).cumsum(0)
    rungs = rungs if goal is not None else (1.0,)
    bounds = sorted({int(torch.searchsorted(counts, math.ceil(share * total)).item()) + 1 for share in rungs})
    rows: list[dict] = []
    seen: dict[str, tuple[dict, object, float]] = {}  # each setting's row, value and constraint: never run twice

    def objective(trial):
        params = {name: knob.suggest(trial, name) for name, knob in space.items()}
        method = base.searched(params, profile)
        key = repr(method)
        if key in seen:  # a setting tried before (an integer space repeats): its outcome again
            row, value, broken = seen[key]
            rows.append({**row, "trial": trial.number, "same_as": row["trial"]})
            if goal is not None:
                trial.set_constraint("goal", broken)
            if row["pruned"]:
                raise optuna.TrialPruned()
            return value
        try:
            return ran(trial, params, method, key)
        except optuna.TrialPruned:
            seen[key] = (rows[-1], None, max(constraint[0], 1e-9))
            raise

    constraint = [0.0]

    def ran(trial, params, method, key):
        patch(model, method)
        if goal is not None and not method.adaptive and len(bounds) > 1:
            # a fixed count costs the same on every image: a handful tell whether it can win
            run = run_batches(model, [batches[0][:FIXED_COST_IMAGES]])
            if hopeless(goal, math.inf, run.gflops, [*rivals, *(r for r in rows if not r["pruned"])]):
                row = {"trial": trial.number, **params, **type(base).from_search(params, profile)}
                rows.append({**row, "gflops": run.gflops, "fidelity": None, "fidelity_low": None})
                rows[-1].update({**{m: None for m in also}, "images": 0, "pruned": True})
                constraint[0] = run.gflops - goal.target if goal.kind == "budget" else 1.0
                trial.set_constraint("goal", max(constraint[0], 1e-9))
                raise optuna.TrialPruned()
        values: dict[str, list[torch.Tensor]] = {m: [] for m in targets}
        images, gflops_sum, done = 0, 0.0, 0
        for step, bound in enumerate(bounds):
            run = run_batches(model, batches[done:bound])
            for m, target in targets.items():
                values[m].append(per_image_values(run.outputs, target[images : images + run.images], m))
            gflops_sum += run.gflops * run.images
            images += run.images
            done = bound
            per_image = torch.cat(values[measure])
            fidelity, gflops = float(per_image.mean()), gflops_sum / images
            row = {
                "trial": trial.number,
                **params,
                **type(base).from_search(params, profile),
                "gflops": gflops,
                "fidelity": fidelity,
                "fidelity_low": interval(per_image, measure, ONE_SIDED_95)[0],
                **{m: float(torch.cat(values[m]).mean()) for m in also},
                "images": images,
                "pruned": False,
            }
            if goal is None:
                continue
            value = fidelity if goal.kind == "budget" else gflops
            if goal.kind == "budget":
                broken = gflops - goal.target  # > 0: goal not met
            else:
                broken = goal.target - row["fidelity_low" if goal.bound == "low" else "fidelity"]
            if images < total:
                trial.report(value, step)
                upper = interval(per_image, measure)[1]
                if hopeless(goal, upper, gflops, [*rivals, *(r for r in rows if not r["pruned"])]):
                    rows.append({**row, "pruned": True})
                    constraint[0] = broken
                    trial.set_constraint("goal", max(broken, 1e-9))
                    raise optuna.TrialPruned()
        rows.append(row)
        if goal is None:
            seen[key] = (row, (fidelity, gflops), 0.0)
            return fidelity, gflops
        trial.set_constraint("goal", broken)
        seen[key] = (row, value, broken)
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if goal is None:
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    else:
        study = optuna.create_study(direction="maximize" if goal.kind == "budget" else "minimize", sampler=sampler)
    first = starting_point(base, space)
    if first:  # the method's own settings (for ATM: the paper's DeiT-S setting) are the first trial
        study.enqueue_trial(first)
    return study, objective, rows


def spread_order(count: int) -> list[int]:
    """The order in which ``count`` batches are staged: every prefix of 1/2, 1/4, 1/8, ... of them is
    spread evenly over all of them (the bit-reversal order of their indices), so that
    a trial's first image stages and a landing's cost images sample every part of the images —
    calibration images often come sorted (a folder by class), and the first 1/8 of them would be
    one class."""
    bits = max(count - 1, 0).bit_length()

    def reversed_bits(i: int) -> int:
        return int(format(i, f"0{bits}b")[::-1], 2) if bits else 0

    return sorted(range(count), key=reversed_bits)


def spread(batches: list[torch.Tensor], reference: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``batches`` and their ``reference`` rows in :func:`spread_order` (each batch kept whole: a
    batch-adaptive method's cost depends on which images share a batch)."""
    starts = [0, *torch.tensor([x.shape[0] for x in batches]).cumsum(0).tolist()]
    order = spread_order(len(batches))
    rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in order]) if order else torch.arange(0)
    return [batches[i] for i in order], reference[rows]


def split_holdout(
    batches: list[torch.Tensor], reference: torch.Tensor, share: float, batch_size: int
) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Every k-th image (k = round(1 / share)) is held out to confirm the chosen setting; the
    others are searched on, their batches in :func:`spread_order` (the first shares a trial is
    staged on, and the images a landing measures cost on, sample all of them).  Returns (search
    batches, their reference outputs, held-out batches, theirs); with ``share`` 0 (or too few
    images) both are all the images (spread)."""
    images = torch.cat(batches)
    if not share or round(1 / share) > images.shape[0]:
        batches, reference = spread(batches, reference)
        return batches, reference, batches, reference
    held = torch.arange(images.shape[0]) % round(1 / share) == round(1 / share) - 1
    search, search_ref = spread(list(images[~held].split(batch_size)), reference[~held])
    return search, search_ref, list(images[held].split(batch_size)), reference[held]


def ranked_candidates(rows: list[dict], goal: Goal) -> tuple[list[dict], list[dict]]:
    """The finished trials best first for ``goal`` (budget: the most faithful within budget,
    then the cheapest; floor: the cheapest that clears it, then the most faithful), and those
    of them that meet it on the images they were searched on (a repeated setting counts once)."""
    finished = [t for t in rows if not t.get("pruned") and "same_as" not in t]
    meets = [t for t in finished if goal.met_by(t)]
    if goal.kind == "budget":
        ranked = sorted(meets, key=lambda t: (-t["fidelity"], t["gflops"])) or sorted(
            finished, key=lambda t: t["gflops"]
        )
    else:
        ranked = sorted(meets, key=lambda t: (t["gflops"], -t["fidelity"]))
        ranked += sorted([t for t in finished if t not in meets], key=lambda t: (-t["fidelity"], t["gflops"]))
    return ranked, meets


def confirm(rows: list[dict], goal: Goal, on_holdout: Callable[[dict], dict]) -> tuple[dict, bool]:
    """The trial to ship for ``goal``: the search's candidates, best first (:func:`ranked_candidates`),
    each measured on the held-out images (``on_holdout(row)`` → its gflops, fidelity,
    fidelity_low) until one still meets the goal there — so that picking the best of many
    trials does not overstate the result.  If none of the first CONFIRM_TRIES does: the closest
    of them, not met."""
    if not any(not t.get("pruned") for t in rows):
        cheapest = min((t["gflops"] for t in rows), default=None)
        if goal.kind == "budget" and cheapest is not None and cheapest > goal.target:
            raise ValueError(
                f"the budget of {goal.target:.4g} GFLOPs per image is out of this method's reach: its "
                f"cheapest setting tried cost {cheapest:.4g} (on the first calibration images); "
                f"ask for a budget above that, or another method"
            )
        raise ValueError(
            "every trial was stopped early as hopeless for this goal; a looser goal, or another method, can be reached"
        )
    ranked, meets = ranked_candidates(rows, goal)
    if goal.kind == "budget":
        closest = lambda h: -h["gflops"]  # noqa: E731
    else:
        closest = lambda h: h["fidelity_low" if goal.bound == "low" else "fidelity"]  # noqa: E731
    tried = ranked[:CONFIRM_TRIES]
    for row in tried:
        if row in meets and goal.met_by(on_holdout(row)):
            return row, True
    return max(tried, key=lambda t: closest(on_holdout(t))), False
