"""`atmerge search`: ATM's α, β, θ_min found with Optuna (TPE, seeded) on a calibration set.

The paper sweeps α ∈ [0.945, 1.0], β ∈ [0.015, 0.05], θ_min ∈ [0.80, 0.945] on a 0.005 grid.
Goals: 'budget' (best top-1 with mean GFLOPs ≤ budget), 'stress' (lowest GFLOPs with top-1 no
lower than the unpatched model's, Table 1), 'pareto' (the accuracy–GFLOPs front).

The unpatched model's predictions are computed once per study and, given ``cache_dir``, kept on
disk under a key made of the model's weights and the calibration images, so a second search on
the same model and images skips that pass.  Every trial reports its top-1 agreement with them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from atmerge.api import patch, unpatch
from atmerge.evaluate import evaluate
from atmerge.methods.atm import ATM
from atmerge.methods.registry import knob_factory

SPACE = {"alpha": (0.945, 1.0), "beta": (0.015, 0.05), "theta_min": (0.80, 0.945)}
GOALS = ("budget", "stress", "pareto")


def _materialise(batches: Iterable) -> list:
    return [(x, y) for x, y in batches]


def trial_method(base: ATM, trial: dict) -> ATM:
    """The ATM of one trial row: ``base`` with the trial's α, β, θ_min."""
    return replace(base, **{k: trial[k] for k in SPACE})


def _digest(model: nn.Module, batches: list) -> str:
    """sha256 of the model's class, weights and buffers and of the images and labels."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    tensors = sorted(model.state_dict().items()) + [(f"batch{i}.{j}", t) for i, b in enumerate(batches) for j, t in enumerate(b)]
    for name, t in tensors:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _predictions(outputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([o.argmax(-1).cpu() for o in outputs])


def unpatched_predictions(model: nn.Module, batches: list, cache_dir: str | Path | None = None) -> tuple[dict, torch.Tensor, bool]:
    """The unpatched model's top-1, top-5, GFLOPs and predicted classes on ``batches``
    (computed, or read from ``cache_dir`` when this model and these images were seen before).

    Returns (summary, predictions [images], whether it came from the cache)."""
    unpatch(model)
    path = Path(cache_dir) / f"unpatched-{_digest(model, batches)[:24]}.json" if cache_dir else None
    if path is not None and path.is_file():
        cached = json.loads(path.read_text())
        return cached["summary"], torch.tensor(cached["predictions"]), True
    res, outputs = evaluate(model, batches, keep_outputs=True)
    summary = {"top1": res.top1, "top5": res.top5, "gflops": res.gflops, "images": res.images}
    predictions = _predictions(outputs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"summary": summary, "predictions": predictions.tolist()}))
    return summary, predictions, False


def search(
    model: nn.Module,
    batches,
    *,
    goal: str = "pareto",
    budget: float | None = None,
    trials: int = 40,
    seed: int = 0,
    base: ATM | None = None,
    step: float = 0.005,
    progress: bool = False,
    cache_dir: str | Path | None = None,
) -> dict:
    """Run the Optuna study; returns the trials, the chosen trial(s) and the baseline.

    budget: GFLOPs per image (required for goal 'budget').  base: ATM settings kept fixed
    (split_layer, similarity).  Each trial is one evaluation of the calibration batches.
    cache_dir: where the unpatched model's predictions are kept between runs (None: not kept).
    """
    import optuna

    if goal not in GOALS:
        raise ValueError(f"goal={goal!r}; choose one of {GOALS}")
    if goal == "budget" and (budget is None or budget <= 0):
        raise ValueError("goal 'budget' needs a positive budget in GFLOPs (--budget)")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    batches = _materialise(batches)
    base = base or ATM()
    baseline, reference, cached = unpatched_predictions(model, batches, cache_dir)  # every trial compares with it
    rows: list[dict] = []

    def run(trial) -> tuple[float, float]:
        params = {k: round(trial.suggest_float(k, lo, hi, step=step), 6) for k, (lo, hi) in SPACE.items()}
        patch(model, replace(base, **params))
        res, outputs = evaluate(model, batches, keep_outputs=True)
        agreement = (_predictions(outputs) == reference).float().mean().item()
        feasible = {
            "budget": res.gflops <= (budget or 0),
            "stress": res.top1 >= baseline["top1"],
            "pareto": True,
        }[goal]
        if goal == "budget":
            trial.set_constraint("gflops_over_budget", res.gflops - budget)
        elif goal == "stress":
            trial.set_constraint("top1_drop", baseline["top1"] - res.top1)
        rows.append({"trial": trial.number, **params, "top1": res.top1, "gflops": res.gflops,
                     "agreement": agreement, "feasible": feasible})
        return res.top1, res.gflops

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

    front = pareto_front(rows)
    feasible = [r for r in rows if r["feasible"]]
    if goal == "budget":
        best = max(feasible, key=lambda r: (r["top1"], -r["gflops"]), default=None)
    elif goal == "stress":
        best = min(feasible, key=lambda r: (r["gflops"], -r["top1"]), default=None)
    else:
        best = None
    return {
        "goal": goal,
        "budget": budget,
        "trials": rows,
        "best": best,
        "pareto_front": front,
        "baseline": {"top1": baseline["top1"], "top5": baseline["top5"], "gflops": baseline["gflops"]},
        "baseline_from_cache": cached,
        "images": baseline["images"],
        "seed": seed,
        "space": {k: list(v) for k, v in SPACE.items()},
        "step": step,
        "fixed": {"split_layer": base.split_layer, "similarity": base.similarity},
    }


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows not dominated in (higher top-1, lower GFLOPs), sorted by GFLOPs."""
    front = [
        r for r in rows
        if not any(o["top1"] >= r["top1"] and o["gflops"] <= r["gflops"] and (o["top1"] > r["top1"] or o["gflops"] < r["gflops"]) for o in rows)
    ]
    return sorted(front, key=lambda r: r["gflops"])


@torch.no_grad()
def baseline_curves(model: nn.Module, batches, methods=("tome", "evit", "mctf", "zerotp"), points: int = 5) -> dict:
    """Accuracy–GFLOPs curves of baseline methods: each method's knob at ``points`` values."""
    batches = _materialise(batches)
    depth = len(model.blocks)
    num_patches = model.patch_embed.num_patches
    curves = {}
    for name in methods:
        factory = knob_factory(name, depth, num_patches)
        curve = []
        for i in range(points):
            t = i / max(points - 1, 1)
            patch(model, factory(0.2 + 0.8 * t))
            res, _ = evaluate(model, batches)
            curve.append({"knob": 0.2 + 0.8 * t, "top1": res.top1, "gflops": res.gflops})
        curves[name] = sorted(curve, key=lambda r: r["gflops"])
    unpatch(model)
    return curves


def plot_search(result: dict, out, curves: dict | None = None, title: str | None = None) -> str:
    """Figure 4-style: top-1 vs GFLOPs, ATM trials with their Pareto front and baseline curves."""
    from atmerge.experiments.analyze import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    colours = iter(plt.get_cmap("tab10").colors[1:])
    ax.scatter([r["gflops"] for r in result["trials"]], [100 * r["top1"] for r in result["trials"]],
               s=8, alpha=0.35, color="#1f77b4", label="ATM trials")
    front = result["pareto_front"]
    ax.plot([r["gflops"] for r in front], [100 * r["top1"] for r in front], "-o", ms=3, color="#1f77b4", label="ATM")
    for name, curve in (curves or {}).items():
        ax.plot([r["gflops"] for r in curve], [100 * r["top1"] for r in curve], "-s", ms=3, label=name,
                color=next(colours))
    b = result["baseline"]
    ax.scatter([b["gflops"]], [100 * b["top1"]], marker="*", s=80, color="k", label="unpatched", zorder=3)
    if result.get("best"):
        ax.scatter([result["best"]["gflops"]], [100 * result["best"]["top1"]], marker="D", s=40, color="red",
                   label=f"best ({result['goal']})", zorder=3)
    ax.set_xlabel("GFLOPs per image"), ax.set_ylabel("top-1 (%)"), ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, out)
