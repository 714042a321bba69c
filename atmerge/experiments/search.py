"""`atmerge search`: a study of any method's settings on a calibration set, with the one tuning
engine that calibration uses (:mod:`atmerge.tuning`: Optuna, multivariate TPE, seeded; staged
trials that stop once they cannot win).

Each method declares its search space (``Method.search_space``; ATM: the paper's sweep of α,
β, θ_min on a 0.005 grid), so every method is tuned by the same machinery with the same number
of trials.  Goals: 'budget' (best measure with mean GFLOPs ≤ budget), 'stress' (lowest GFLOPs
with top-1 no lower than the unpatched model's, Table 1), 'pareto' (the measure–GFLOPs front).
The measure is top-1 (labels) or, without labels, agreement with the unpatched model's
predictions (or the cosine of the outputs).

The unpatched model's outputs are computed once per study and, given ``cache_dir``, kept on
disk under a key made of the model's weights and the calibration images, so a second search on
the same model and images skips that pass.  Every trial also records its top-1 (with labels)
and its agreement (classifiers).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from atmerge.methods.base import Method
from atmerge.methods.registry import build_method, method_settings
from atmerge.models.adapter import is_classifier, model_depth, model_patches
from atmerge.trials import trial_method, unpatched_outputs  # noqa: F401  (re-exported: callers import them from here)
from atmerge.tuning import MEASURES, RUNGS, Goal, spread, spread_order, staged_trials

GOALS = ("budget", "stress", "pareto")
METRICS = ("top1", "agreement")  # the old name of the measures a search offered (``metric=``)


def _materialise(batches: Iterable) -> list:
    return [(x, y) for x, y in batches]


def _measure_name(measure: str | None, metric: str | None) -> str:
    if metric is not None:
        warnings.warn(
            "search(metric=...) is deprecated and will be removed in the next release; use measure=...",
            DeprecationWarning,
            stacklevel=3,
        )
        if measure is not None and measure != metric:
            raise ValueError(f"measure={measure!r} and metric={metric!r} disagree; give measure only")
        measure = metric
    measure = "top1" if measure is None else measure
    if measure not in MEASURES:
        raise ValueError(f"measure={measure!r}; choose one of {MEASURES}")
    return measure


def search(
    model: nn.Module,
    batches,
    *,
    method: Method | str = "atm",
    goal: str = "pareto",
    budget: float | None = None,
    trials: int = 40,
    seed: int = 0,
    measure: str | None = None,
    metric: str | None = None,
    progress: bool = False,
    cache_dir: str | Path | None = None,
    reference: tuple[dict, torch.Tensor, bool] | None = None,
    profile=None,
    early_stop: bool = True,
) -> dict:
    """A study over ``method``'s own search space (``type(method).search_space``) on ``batches``
    of (images, labels or None), run by the tuning engine; returns the trials, the chosen trial
    and the baseline.

    method: a registry name or a method whose other settings stay fixed.  measure: what a
    trial is judged by — 'top1' (the default; needs labels), 'agreement' (share of images whose
    predicted class is the unpatched model's; no labels needed) or 'cosine' (of the outputs).
    ``metric`` is its deprecated old name.  goal 'budget': the best measure with mean GFLOPs ≤
    ``budget`` (GFLOPs per image); 'stress': the lowest GFLOPs with top-1 no lower than the
    unpatched model's (its measure is top-1); 'pareto': the front of (measure, GFLOPs), every
    trial on every image.  early_stop: for the budget and stress goals, trials run on growing
    shares of the images and stop once they cannot win (stopped trials are not feasible).
    cache_dir: where the unpatched model's outputs are kept between runs (None: not kept);
    reference: what :func:`unpatched_outputs` returned for these batches, to skip that pass.
    profile: the model's :class:`~atmerge.score_profile.ScoreProfile`, to fit the search space to it.
    """
    measure = _measure_name(measure, metric)
    if goal not in GOALS:
        raise ValueError(f"goal={goal!r}; choose one of {GOALS}")
    if goal == "budget" and (budget is None or budget <= 0):
        raise ValueError("goal 'budget' needs a positive budget in GFLOPs per image")
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an integer >= 1, got {trials}")
    base = build_method(method) if isinstance(method, str) else method
    batches = _materialise(batches)
    baseline, reference_outputs, cached = reference if reference else unpatched_outputs(model, batches, cache_dir)
    labelled = baseline["top1"] is not None
    if (goal == "stress" or measure == "top1") and not labelled:
        raise ValueError("these images have no labels: use measure='agreement' (and goal 'pareto' or 'budget')")
    if goal == "stress":
        measure = "top1"
    order = spread_order(len(batches))  # staged shares sample every part of a folder sorted by class
    images, reference_outputs = spread([x for x, _ in batches], reference_outputs)
    labels = torch.cat([batches[i][1].cpu() for i in order]) if labelled else None
    also = tuple(m for m in ("top1", "agreement") if m != measure and (m != "top1" or labelled))
    if not is_classifier(model):
        also = tuple(m for m in also if m != "agreement")
    target = {
        "budget": lambda: Goal("budget", float(budget)),
        "stress": lambda: Goal("floor", baseline["top1"], "mean"),
    }
    engine_goal = target[goal]() if goal in target else None
    rows = staged_trials(
        model,
        images,
        base,
        reference_outputs,
        measure=measure,
        goal=engine_goal,
        trials=trials,
        seed=seed,
        rungs=RUNGS if early_stop else (1.0,),
        profile=profile,
        progress=progress,
        labels=labels,
        also=also,
    )
    for row in rows:
        row["quality"] = row["fidelity"]
        row.setdefault(measure, row["fidelity"])
        row.setdefault("top1", None)  # no labels
        row.setdefault("agreement", None)  # a feature model
        row["feasible"] = not row["pruned"] and (engine_goal is None or engine_goal.met_by(row))
    feasible = [r for r in rows if r["feasible"]]
    if goal == "budget":
        best = max(feasible, key=lambda r: (r["quality"], -r["gflops"]), default=None)
    elif goal == "stress":
        best = min(feasible, key=lambda r: (r["gflops"], -r["quality"]), default=None)
    else:
        best = None
    space = type(base).search_space(model_depth(model), model_patches(model), profile)
    finished = [r for r in rows if not r["pruned"]]
    return {
        "method": method_settings(base),
        "label": base.label(tuple(space)),
        "goal": goal,
        "measure": measure,
        "metric": measure,
        "budget": budget,
        "trials": rows,
        "best": best,
        "cheapest": min(rows, key=lambda r: r["gflops"], default=None),
        "pareto_front": pareto_front(finished, "quality"),
        "baseline": {"top1": baseline["top1"], "top5": baseline["top5"], "gflops": baseline["gflops"]},
        "baseline_from_cache": cached,
        "images": baseline["images"],
        "seed": seed,
        "space": {name: knob.describe() for name, knob in space.items()},
    }


def search_methods(model: nn.Module, batches, methods: Sequence[Method | str], **options) -> dict[str, dict]:
    """:func:`search` for several methods with the same options and number of trials (equal
    tuning effort); the unpatched model runs once for all.  Returns {label: result}."""
    batches = _materialise(batches)
    reference = options.pop("reference", None)
    if reference is None:
        reference = unpatched_outputs(model, batches, options.get("cache_dir"))
    results = {}
    for m in methods:
        result = search(model, batches, method=m, reference=reference, **options)
        results[result["label"]] = result
    return results


def pareto_front(rows: list[dict], key: str = "top1") -> list[dict]:
    """Rows not dominated in (higher ``key``, lower GFLOPs), sorted by GFLOPs."""
    front = [
        r
        for r in rows
        if not any(
            o[key] >= r[key] and o["gflops"] <= r["gflops"] and (o[key] > r[key] or o["gflops"] < r["gflops"])
            for o in rows
        )
    ]
    return sorted(front, key=lambda r: r["gflops"])


def plot_search(results: dict[str, dict], out, title: str | None = None) -> str:
    """Figure 4-style: quality (top-1 or agreement, %) vs GFLOPs; per method its trials (dots)
    and their Pareto front (line), all searched with the same number of trials."""
    from atmerge.experiments.analyze import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    colours = iter(plt.get_cmap("tab10").colors)
    first = next(iter(results.values()))
    metric = first["measure"]
    for label, result in results.items():
        colour = next(colours)
        ax.scatter(
            [r["gflops"] for r in result["trials"] if not r.get("pruned")],
            [100 * r["quality"] for r in result["trials"] if not r.get("pruned")],
            s=6,
            alpha=0.25,
            color=colour,
        )
        front = result["pareto_front"]
        ax.plot(
            [r["gflops"] for r in front],
            [100 * r["quality"] for r in front],
            "-o",
            ms=3,
            color=colour,
            label=f"{label} ({len(result['trials'])} trials)",
        )
        if result.get("best"):
            ax.scatter(
                [result["best"]["gflops"]],
                [100 * result["best"]["quality"]],
                marker="D",
                s=40,
                color=colour,
                edgecolors="k",
                zorder=3,
            )
    b = first["baseline"]
    ax.scatter(
        [b["gflops"]],
        [100 * (b["top1"] if metric == "top1" else 1.0)],
        marker="*",
        s=80,
        color="k",
        label="unpatched",
        zorder=3,
    )
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel(
        {"top1": "top-1 (%)", "cosine": "output cosine to the unpatched model (%)"}.get(
            metric, "agreement with the unpatched model (%)"
        )
    )
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, out)
