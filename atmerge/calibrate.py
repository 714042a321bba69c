"""Calibrate a method for the user's own model from unlabeled images.

Fidelity needs no labels: agreement of the predicted class with the unpatched model's for a
classifier, cosine of the outputs for a feature model (``num_classes=0``).  Goals:
  * budget: the most faithful setting whose mean GFLOPs on the calibration images is within a
    share of the unpatched model's (or an absolute figure);
  * floor: the cheapest setting whose fidelity's one-sided 95% lower bound (Wilson for
    agreement, normal approximation for the mean cosine) is at least the floor — the label-free
    stress test.
Every method is searched over its own settings (``Method.search_space``), fitted to the model's
own similarity scores (:mod:`atmerge.score_profile`), with Optuna (multivariate TPE, seeded); each
trial runs on growing shares of the images and stops once it cannot win.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from statistics import NormalDist
from pathlib import Path
from collections.abc import Iterable

import torch
from torch import nn

from atmerge.api import patch, unpatch
from atmerge.data import IMAGE_SUFFIXES, folder_batches, image_files  # noqa: F401  (kept importable from here)
from atmerge.evaluate import run_batches
from atmerge.fidelity import (
    FIDELITY_MEASURES,
    fidelity_interval,
    paired_fidelity,
    per_image_fidelity,
    wilson_interval,
)
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
    staged_trials_together,
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
    bound; gflops / gflops_share: mean per-image cost, and its share of the unpatched model's —
    pooled over the held-out images and the searched ones it was measured on (a trial is not
    chosen for its cost beyond the budget line, so every image measures it; an adaptive
    setting's cost moves by about a point between two sets of 500 images); held_out_gflops: the
    held-out images' alone.  held_out_values: the per-image fidelities on the held-out images
    (paired comparisons between methods).  details: the paired fidelity (agreement and its
    interval, top-5 agreement, mean KL, cosine; only the cosine for a feature model).  search:
    the same setting's numbers on the search images (a landed setting's fidelity there is None
    unless a comparison needed it).  trials: every trial of the search; space: the searched
    ranges; profile: the model's score profile they were fitted to.  landing: where the chosen
    trial's setting was moved along its cost dial and whether that was kept (None: not landed).
    compared: with ``method="auto"``, every method's confirmed numbers and which was chosen
    (:func:`_winner`'s rule); alternatives: the same methods' own calibrations (or the reason one
    has none), in that order.
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
    landing: dict | None = None
    compared: list[dict] = field(default_factory=list)
    alternatives: list = field(default_factory=list, repr=False)
    held_out_gflops: float | None = None
    held_out_values: torch.Tensor | None = field(default=None, repr=False, compare=False)

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


class TrainedOnWarning(UserWarning):
    """The calibration images overlap the images the model (e.g. its head) was trained on."""


def warn_if_trained_on(model: nn.Module, images) -> int:
    """Warn when ``images`` (a folder) holds files the model was trained on, as far as it records
    them (``model.atmerge_trained_on``: a set of image paths — e.g. the shared DINOv2 probe's
    training split).  A head is more certain on its own training images, so fidelity measured
    there overstates what new images see.  Returns how many overlap."""
    trained_on = getattr(model, "atmerge_trained_on", None)
    if not trained_on or not isinstance(images, (str, Path)):
        return 0

    files = image_files(images)
    seen = {Path(p).resolve() for p in trained_on}
    overlap = sum(f.resolve() in seen for f in files)
    if overlap:
        warnings.warn(
            f"{overlap} of the {len(files)} calibration images under {images} are images this model was "
            "trained on (model.atmerge_trained_on); fidelity measured on them may not transfer to new "
            "images: calibrate on other images",
            TrainedOnWarning,
            stacklevel=3,
        )
    return overlap


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


AUTO = "auto"


def auto_methods(names=None) -> list[Method]:
    """The methods ``method="auto"`` compares: ``names`` (registry names or methods), or every
    registered method with settings to tune that merges tokens (pruning methods such as EViT and
    Zero-TP only when named)."""
    from atmerge.methods.registry import METHODS

    if names is None:
        return [
            cls()
            for cls in METHODS.values()
            if cls.compared_by_auto and not cls.prunes and cls.search_space(12, 196) and _constructible(cls)
        ]
    if isinstance(names, (str, Method)) or not names:
        raise ValueError(
            f"methods={names!r}: give a non-empty list of method names for method='auto' "
            f"(allowed: {', '.join(METHODS)})"
        )
    return [build_method(m) if isinstance(m, str) else m for m in names]


def _constructible(cls) -> bool:
    try:
        cls()
    except TypeError:  # a method whose settings have no defaults is compared only when named
        return False
    return True


def calibrate_goals(
    model: nn.Module,
    images,
    goals: list[dict],
    *,
    method: Method | str = "atm",
    methods: list | None = None,
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
    land: bool = True,
) -> list[Calibration]:
    """:func:`calibrate` for several goals, e.g. ``[{"budget": 0.6}, {"min_agreement": 0.99}]``.

    method: a registry name or a method whose other settings stay fixed; ``"auto"``: calibrate
    each of ``methods`` (default :func:`auto_methods`: every merging method) with the same
    trials and image stages, and choose per goal on the held-out images (:func:`_winner`): for a
    budget, of the methods whose held-out fidelity is within one paired standard error of the
    best one's, the most faithful over every calibration image; for a floor, the cheapest whose
    held-out lower bound clears it at a risk shared by the methods compared
    (``Calibration.compared`` holds every method's confirmed numbers).  fidelity: 'agreement' or 'cosine' for budget goals
    (None: agreement for a classifier, cosine for a feature model).
    early_stop: run each trial on growing shares of the images (1/8, 1/4, 1/2, all) and stop it
    once it cannot win (with ``"auto"``: the methods' trials taken in turn, once it cannot beat
    the best trial of any method so far); False: every trial sees every image.  Only trials that saw every image
    are chosen.  fit_space: fit the search ranges to the model's own similarity scores on (up
    to 256 of) these images (:mod:`atmerge.score_profile`); False: the methods' default ranges (the
    ATM paper's grid).  cache_dir: where the unpatched outputs are kept between runs.
    With one goal (and ``early_stop``) the search is directed at it and stops hopeless trials;
    with several, one search of the (fidelity, GFLOPs) front serves them all, every trial on
    every image (the same trials for every goal).  paired: also measure each chosen setting's
    paired details (top-5 agreement, KL, ...; False: ``details`` stays empty).  holdout: the
    share of the images kept out of the search (every k-th image) on which the chosen setting
    must meet its goal again (:func:`confirm`); 0: confirm on the searched images themselves.
    land: move the chosen setting along its method's cost dial (:mod:`atmerge.landing`) so that
    a budget is used up to within a point, or a floor met more cheaply; kept only where it is at
    least as faithful on the searched images and still meets the goal on the held-out ones."""
    from atmerge.score_profile import score_profile
    from atmerge.trials import unpatched_outputs

    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ValueError(f"trials={trials!r} must be an integer >= 1")
    if not goals:
        raise ValueError("give at least one goal: budget, budget_gflops, min_agreement or min_cosine")
    from atmerge.models.adapter import check_supported

    check_supported(model)  # before any image is read
    if isinstance(method, str) and method == AUTO:
        bases = auto_methods(methods)
    elif methods is not None:
        raise ValueError(f"methods= is for method='auto'; got method={method!r}")
    else:
        bases = [build_method(method) if isinstance(method, str) else method]
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
    warn_if_trained_on(model, images)
    batches, _ = _image_batches(images, model, batch_size, transform)
    summary, reference, _ = unpatched_outputs(model, [(x, None) for x in batches], cache_dir)
    dense = summary["gflops"]
    resolved = [resolve_goal(dense, **g) for g in goals]
    split = split_holdout(batches, reference, holdout, batch_size)
    profile = score_profile(model, split[0], limit=256) if fit_space else None
    run = _Run(model, *split, measure, dense, profile, paired)
    one = resolved[0] if len(resolved) == 1 and early_stop else None
    if one is not None and len(bases) > 1:  # the methods' trials in turn, each stopped against every method's best
        searched = staged_trials_together(
            model,
            run.search_set,
            bases,
            run.search_ref,
            measure=measure,
            goal=one,
            trials=trials,
            seed=seed,
            profile=profile,
        )
    else:
        searched = [
            staged_trials(
                model,
                run.search_set,
                base,
                run.search_ref,
                measure=measure,
                goal=one,
                trials=trials,
                seed=seed,
                rungs=RUNGS if early_stop else (1.0,),
                profile=profile,
                progress=progress,
            )
            for base in bases
        ]
    per_method = [
        [run.choose(base, rows, goal, land, trials, len(bases) > 1) for goal in resolved]
        for base, rows in zip(bases, searched)
    ]
    results = []
    for g, goal in enumerate(resolved):
        found = [m[g] for m in per_method]
        if len(bases) == 1:
            if isinstance(found[0], str):
                raise ValueError(found[0])
            results.append(found[0])
            continue
        results.append(_winner(goal, found, bases, run.pooled))
    return results


FAMILY_RISK = 0.05  # a floor auto marks met: one-sided, shared (Bonferroni) by the methods compared


def paired_gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of the per-image differences ``a − b`` of two settings' fidelities on the same images,
    and its standard error."""
    d = (a - b).double()
    se = float(d.std(unbiased=True) / math.sqrt(d.numel())) if d.numel() > 1 else 0.0
    return float(d.mean()), se


def _within_noise(leader: Calibration, other: Calibration) -> bool:
    """Whether ``other``'s held-out fidelity is below ``leader``'s by at most one standard error of
    their paired difference on the held-out images (without per-image values: only a tie)."""
    if other is leader:
        return True
    a, b = leader.held_out_values, other.held_out_values
    if a is None or b is None or a.shape != b.shape:
        return other.fidelity >= leader.fidelity
    gap, se = paired_gap(a, b)
    return gap <= se


def _pooled_fidelity(c: Calibration) -> float:
    """The setting's fidelity over every calibration image: its held-out and searched numbers
    weighted by their images (the held-out one alone where the searched one is unknown)."""
    searched = c.search.get("fidelity")
    if searched is None or not c.search_images:
        return c.fidelity
    return (c.fidelity * c.images + searched * c.search_images) / (c.images + c.search_images)


def floor_bound(c: Calibration, z: float) -> float:
    """``c``'s held-out lower bound at ``z`` (from its per-image values; without them: Wilson of its
    agreement, or its one-sided 95% bound for cosine)."""
    if c.held_out_values is not None:
        return fidelity_interval(c.held_out_values, c.measure, z)[0]
    if c.measure == "agreement" and c.images:
        return wilson_interval(round(c.fidelity * c.images), c.images, z)[0]
    return c.fidelity_low


def _winner(goal: Goal, found: list, bases: list[Method], pooled=None) -> Calibration:
    """The setting auto ships for ``goal``, from every method's confirmed (held-out) result.

    budget: among the methods within the budget, the held-out images decide — a method stays in
    only if its held-out fidelity is below the best one's by at most one standard error of their
    paired difference (the same images; 500 images cannot separate methods closer than that);
    of those, the most faithful over every calibration image (searched and held-out pooled,
    ``pooled(c)``, measured only when more than one is left) wins, the dearer one on a tie.  floor: the cheapest method whose held-out lower
    bound clears the floor at the one-sided FAMILY_RISK shared by the k methods compared
    (z of 1 − 0.05/k), so that a floor marked met holds although the cheapest of k passing
    methods is taken.  If none meets the goal: the closest (the cheapest for a budget, the
    highest such bound for a floor), not met."""
    table = [_compared_row(b, c) for b, c in zip(bases, found)]
    calibrated = [c for c in found if isinstance(c, Calibration)]
    if not calibrated:
        reasons = "; ".join(f"{row['method']}: {row['note']}" for row in table)
        raise ValueError(f"no method has a setting for this goal ({reasons})")
    pooled = pooled or _pooled_fidelity
    met = [c for c in calibrated if c.met]
    if goal.kind == "budget":
        if met:
            leader = max(met, key=lambda c: (c.fidelity, c.gflops))
            contenders = [c for c in met if _within_noise(leader, c)]
            scores = {id(c): pooled(c) for c in contenders} if len(contenders) > 1 else {id(leader): None}
            best = max(contenders, key=lambda c: (scores[id(c)] or 0.0, c.gflops))
            for row, c in zip(table, found):
                row["contender"] = id(c) in scores
                row["pooled_fidelity"] = scores.get(id(c))
        else:
            best = min(calibrated, key=lambda c: c.gflops)
        ok = best.met
    else:
        z = NormalDist().inv_cdf(1 - FAMILY_RISK / len(calibrated))
        bounds = {id(c): floor_bound(c, z) for c in calibrated}
        for row, c in zip(table, found):
            row["family_bound"] = bounds.get(id(c))
        strict = [c for c in met if bounds[id(c)] >= goal.target]
        if strict:
            best = min(strict, key=lambda c: (c.gflops, -c.fidelity))
        else:
            best = max(calibrated, key=lambda c: (bounds[id(c)], -c.gflops))
        ok = bool(strict)
    for row, c in zip(table, found):
        row["chosen"] = c is best
    return dataclasses.replace(best, met=ok, compared=table, alternatives=list(found))


def _compared_row(base: Method, c) -> dict:
    name = base.display_name or type(base).__name__
    if isinstance(c, str):
        return {"method": name, "setting": None, "met": False, "note": c}
    return {
        "method": name,
        "setting": repr(c.method),
        "met": c.met,
        "gflops": c.gflops,
        "gflops_share": c.gflops_share,
        "fidelity": c.fidelity,
        "fidelity_low": c.fidelity_low,
        "landed": bool(c.landing and c.landing.get("kept")),
        "search_fidelity": c.search.get("fidelity"),
        "note": "",
    }


@dataclass
class _Run:
    """What every method's calibration in one call shares: the split images and the unpatched
    outputs on them, the measure, the unpatched cost, the score profile, and every measurement
    made (by setting and image set), so that no setting is run twice on the same images —
    between goals, methods, confirmation and landing."""

    model: nn.Module
    search_set: list[torch.Tensor]
    search_ref: torch.Tensor
    confirm_set: list[torch.Tensor]
    confirm_ref: torch.Tensor
    measure: str
    dense: float
    profile: object
    paired: bool
    cache: dict = field(default_factory=dict)

    @property
    def held_apart(self) -> bool:
        return self.confirm_set is not self.search_set

    def measured(self, method: Method, where: str = "held") -> dict:
        """``method``'s numbers on the held-out images (``where='held'``) or the searched ones
        ('search'), measured once."""
        key = (repr(method), where)
        if key not in self.cache:
            if where == "held":
                batches, reference, paired = self.confirm_set, self.confirm_ref, self.paired
            else:
                batches, reference, paired = self.search_set, self.search_ref, False
            self.cache[key] = _measure(self.model, batches, method, reference, self.measure, paired)
        return self.cache[key]

    def cost(self, method: Method) -> float:
        """``method``'s mean GFLOPs on the searched images its cost is measured on, once."""
        from atmerge.landing import setting_cost

        key = (repr(method), "cost")
        if key not in self.cache:
            self.cache[key] = setting_cost(self.model, method, self.search_set)
        return self.cache[key]

    def on_holdout(self, method: Method, search_gflops: float | None = None, search_images: int = 0) -> dict:
        """``method``'s held-out numbers; its cost pooled with ``search_gflops`` measured on
        ``search_images`` searched images (a cost is not what a trial is chosen for beyond the
        budget line, so every image measures it; 500 held-out images alone move an adaptive
        setting's cost by about a point); ``held_out_gflops`` keeps the held-out cost alone."""
        numbers = dict(self.measured(method))
        numbers["held_out_gflops"] = numbers["gflops"]
        if self.held_apart and search_gflops is not None and search_images:
            held = numbers["images"]
            numbers["gflops"] = (numbers["gflops"] * held + search_gflops * search_images) / (held + search_images)
        return numbers

    def pooled(self, c: Calibration) -> float:
        """``c``'s fidelity over every calibration image (its searched fidelity measured if the
        landing left it unknown)."""
        if self.held_apart and c.search.get("fidelity") is None:
            c.search["fidelity"] = self.measured(c.method, "search")["fidelity"]
        return _pooled_fidelity(c) if self.held_apart else c.fidelity

    def choose(self, base: Method, rows: list[dict], goal: Goal, land: bool, trials: int, compared: bool):
        """The calibration of ``base`` for ``goal`` from its trials ``rows``: confirmed on the
        held-out images, then landed; a one-line reason (str) when no trial can be chosen and
        several methods are compared."""
        from atmerge.trials import trial_method

        depth, patches = model_depth(self.model), model_patches(self.model)

        def on_holdout(row: dict) -> dict:
            method = trial_method(base, row, depth, patches, self.profile)
            return self.on_holdout(method, row["gflops"], row["images"])

        try:
            chosen, met = confirm(rows, goal, on_holdout)
        except ValueError as error:
            if not compared:
                raise
            if "out of this method's reach" in str(error):
                return str(error)
            return "every trial was stopped early: none could beat the best setting of the other methods"
        method = trial_method(base, chosen, depth, patches, self.profile)
        numbers = on_holdout(chosen)
        search = {k: chosen[k] for k in ("gflops", "fidelity", "fidelity_low")}
        landing = self.land(method, goal, search, numbers) if land else None
        if landing and landing["kept"]:
            method, numbers, met, search = landing.pop("method"), landing.pop("numbers"), True, dict(landing["search"])
        elif landing:
            landing.pop("method"), landing.pop("numbers")
        space = type(base).search_space(depth, patches, self.profile)
        return Calibration(
            method=method,
            goal=goal.kind,
            target=goal.target,
            met=met,
            measure=self.measure,
            gflops=numbers["gflops"],
            gflops_share=numbers["gflops"] / self.dense,
            fidelity=numbers["fidelity"],
            fidelity_low=numbers["fidelity_low"],
            images=numbers["images"],
            unpatched_gflops=self.dense,
            details=numbers["details"],
            trials=rows,
            search_images=sum(x.shape[0] for x in self.search_set),
            search=search,
            space={k: knob.describe() for k, knob in space.items()},
            profile=self.profile.as_dict() if self.profile is not None else None,
            landing=landing,
            held_out_gflops=numbers["held_out_gflops"],
            held_out_values=numbers["values"],
        )

    def land(self, method: Method, goal: Goal, search: dict, numbers: dict) -> dict | None:
        """Move ``method`` along its dial toward ``goal`` (:mod:`atmerge.landing`); the result
        records where it landed and whether it is kept.  budget: kept where its cost (pooled
        over the searched images it was measured on and the held-out ones) meets the budget and
        its held-out fidelity is below the unlanded setting's by at most one standard error of
        their paired difference (a dearer setting on the dial is expected to be more faithful;
        the searched images, on which the unlanded trial won, are no fair judge); a setting that
        missed the budget (no trial met it) is landed down into it and kept where it meets it.  floor: kept
        where it is cheaper (or the unlanded one missed the floor) on the searched images and
        meets the floor on the held-out ones."""
        from atmerge.landing import _cost_batches, land_on_budget, land_on_floor

        dial = method.dial(model_depth(self.model), model_patches(self.model))
        if dial is None:
            return None
        if goal.kind == "budget":
            adaptive = method.adaptive
            aim = goal.target - (LANDING_MARGIN * self.dense if adaptive else 0.0)
            window = LANDING_WINDOW * self.dense if adaptive else 0.0
            landing = land_on_budget(self.model, dial, aim, self.search_set, window=window, cost_of=self.cost)
            over = not goal.met_by(numbers)  # the closest trial cost more than the budget: landed down into it
            if (
                landing is None
                or repr(landing.method) == repr(method)
                or (landing.gflops <= search["gflops"] and not over)
            ):
                return None
            cost_images = sum(x.shape[0] for x in _cost_batches(landing.method, self.search_set))
            on_search = {"gflops": landing.gflops, "fidelity": None, "fidelity_low": None}
            confirmed = self.on_holdout(landing.method, landing.gflops, cost_images)
            gap, se = paired_gap(numbers["values"], confirmed["values"])
            kept = goal.met_by(confirmed) and (over or gap <= se)
        else:
            landing = land_on_floor(
                self.model,
                dial,
                goal.target,
                self.search_set,
                self.search_ref,
                self.measure,
                seen=self.cache.setdefault("floor landings", {}),
            )
            if landing is None or repr(landing.method) == repr(method):
                return None
            on_search = {"gflops": landing.gflops, "fidelity": landing.fidelity, "fidelity_low": landing.fidelity_low}
            better = landing.gflops < search["gflops"] or search["fidelity_low"] < goal.target
            confirmed = self.on_holdout(landing.method, landing.gflops, sum(x.shape[0] for x in self.search_set))
            confirmed = confirmed if better else None
            kept = bool(confirmed is not None and goal.met_by(confirmed))
        return {
            "t": landing.t,
            "setting": repr(landing.method),
            "steps": landing.steps,
            "search": on_search,
            "held_out": None
            if confirmed is None
            else {k: confirmed[k] for k in ("gflops", "held_out_gflops", "fidelity", "fidelity_low")},
            "kept": kept,
            "method": landing.method,
            "numbers": confirmed,
        }


LANDING_MARGIN = 0.003  # an adaptive setting's budget is landed this share of the unpatched GFLOPs below it
LANDING_WINDOW = 0.004  # ... and its bisection stops once it costs within this share below that


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
        "values": values,
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
