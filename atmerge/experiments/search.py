"""`atmerge search`: any method's settings found with Optuna (TPE, seeded) on a calibration set.

Each method declares its search space (``Method.search_space``; ATM: the paper's sweep of α,
β, θ_min on a 0.005 grid), so every method is tuned by the same machinery with the same number
of trials.  Goals: 'budget' (best quality with mean GFLOPs ≤ budget), 'stress' (lowest GFLOPs
with top-1 no lower than the unpatched model's, Table 1), 'pareto' (the quality–GFLOPs front).
Quality is top-1 or, without labels, agreement with the unpatched model's predictions.

The unpatched model's predictions are computed once per study and, given ``cache_dir``, kept on
disk under a key made of the model's weights and the calibration images, so a second search on
the same model and images skips that pass.  Every trial reports its top-1 agreement with them.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from atmerge.api import patch, unpatch
from atmerge.evaluate import evaluate
from atmerge.methods.base import Method
from atmerge.methods.registry import build_method, method_settings
from atmerge.models.adapter import model_depth, model_patches
from atmerge.trials import trial_method, unpatched_outputs  # noqa: F401  (re-exported: callers import them from here)

GOALS = ("budget", "stress", "pareto")
METRICS = ("top1", "agreement")


def _materialise(batches: Iterable) -> list:
    return [(x, y) for x, y in batches]


def search(
    model: nn.Module,
    batches,
    *,
    method: Method | str = "atm",
    goal: str = "pareto",
    budget: float | None = None,
    trials: int = 40,
    seed: int = 0,
    metric: str = "top1",
    progress: bool = False,
    cache_dir: str | Path | None = None,
    reference: tuple[dict, torch.Tensor, bool] | None = None,
    profile=None,
) -> dict:
    """Run an Optuna study (TPE, seeded) over ``method``'s own search space
    (``type(method).search_space``); returns the trials, the chosen trial(s) and the baseline.

    method: a registry name or a method whose other settings stay fixed.  metric: what a trial's quality is — 'top1' (needs labels)
        or 'agreement' (share of images whose predicted class is the unpatched model's; no
        labels needed).  goal 'budget': best quality with mean GFLOPs ≤ budget; 'stress':
        lowest GFLOPs with top-1 no lower than the unpatched model's; 'pareto': the front of
        (quality, GFLOPs).  Each trial is one evaluation of the calibration batches.
    cache_dir: where the unpatched model's predictions are kept between runs (None: not kept);
    reference: what :func:`unpatched_outputs` returned for these batches, to skip that pass.
    profile: the model's :class:`~atmerge.profile.ScoreProfile`, to fit the search space to it.
    """
    import optuna

    if goal not in GOALS:
        raise ValueError(f"goal={goal!r}; choose one of {GOALS}")
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; choose one of {METRICS}")
    if goal == "budget" and (budget is None or budget <= 0):
        raise ValueError("goal 'budget' needs a positive budget in GFLOPs (--budget)")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    base = build_method(method) if isinstance(method, str) else method
    batches = _materialise(batches)
    baseline, reference_outputs, cached = reference if reference else unpatched_outputs(model, batches, cache_dir)
    predictions = reference_outputs.argmax(-1)
    if (goal == "stress" or metric == "top1") and baseline["top1"] is None:
        raise ValueError("these images have no labels: use metric='agreement' (and goal 'pareto' or 'budget')")
    space = type(base).search_space(model_depth(model), model_patches(model), profile)
    rows: list[dict] = []

    def run(trial) -> tuple[float, float]:
        params = {name: knob.suggest(trial, name) for name, knob in space.items()}
        patch(model, base.searched(params, profile))
        res, outputs = evaluate(model, batches, keep_outputs=True)
        agreement = (torch.cat([o.argmax(-1).cpu() for o in outputs]) == predictions).float().mean().item()
        quality = res.top1 if metric == "top1" else agreement
        feasible = {
            "budget": res.gflops <= (budget or 0),
            "stress": res.top1 is not None and res.top1 >= baseline["top1"],
            "pareto": True,
        }[goal]
        if goal == "budget":
            trial.set_constraint("gflops_over_budget", res.gflops - budget)
        elif goal == "stress":
            trial.set_constraint("top1_drop", baseline["top1"] - res.top1)
        rows.append(
            {
                "trial": trial.number,
                **params,
                "top1": res.top1,
                "gflops": res.gflops,
                "agreement": agreement,
                "quality": quality,
                "feasible": feasible,
            }
        )
        return quality, res.gflops

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed)
    if goal == "pareto":
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
        study.optimize(run, n_trials=trials, show_progress_bar=progress)
    else:
        study = optuna.create_study(direction="maximize" if goal == "budget" else "minimize", sampler=sampler)
        objective = (lambda t: run(t)[0]) if goal == "budget" else (lambda t: run(t)[1])
        study.optimize(objective, n_trials=trials, show_progress_bar=progress)
    unpatch(model)

    feasible = [r for r in rows if r["feasible"]]
    if goal == "budget":
        best = max(feasible, key=lambda r: (r["quality"], -r["gflops"]), default=None)
    elif goal == "stress":
        best = min(feasible, key=lambda r: (r["gflops"], -r["top1"]), default=None)
    else:
        best = None
    return {
        "method": method_settings(base),
        "label": base.label(tuple(space)),
        "goal": goal,
        "metric": metric,
        "budget": budget,
        "trials": rows,
        "best": best,
        "pareto_front": pareto_front(rows, "quality"),
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
    metric = first["metric"]
    for label, result in results.items():
        colour = next(colours)
        ax.scatter(
            [r["gflops"] for r in result["trials"]],
            [100 * r["quality"] for r in result["trials"]],
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
    ax.set_ylabel("top-1 (%)" if metric == "top1" else "agreement with the unpatched model (%)")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, out)
