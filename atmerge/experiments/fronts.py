"""The picture of a method comparison (`atmerge calibrate --method auto` or `--compare`): each
method's front of fidelity vs share of the unpatched GFLOPs with 95% intervals, its setting
confirmed on the held-out images, and the chosen one marked."""

from __future__ import annotations

import math
from pathlib import Path

from atmerge.fidelity import wilson_interval
from atmerge.experiments.analyze import _pyplot, _save
from atmerge.experiments.search import pareto_front


def interval_of(fidelity: float, fidelity_low: float, images: int, measure: str) -> tuple[float, float]:
    """Two-sided 95% interval of a measured fidelity: Wilson for agreement (from the share of
    ``images`` that agree), mean ± 1.96 SE for cosine (the SE recovered from the one-sided 95%
    lower bound ``fidelity_low``)."""
    if measure == "agreement":
        low, high = wilson_interval(round(fidelity * images), images)
    else:
        half = (fidelity - fidelity_low) * 1.959964 / 1.644854 if math.isfinite(fidelity_low) else 0.0
        low, high = fidelity - half, fidelity + half
    return min(low, fidelity), max(high, fidelity)  # never a negative error bar from rounding


def plot_fronts(entries: list[tuple[str, object]], out: str | Path, chosen=None, title: str | None = None) -> str:
    """``entries``: (label, Calibration) per method.  Draws per method the front of its finished
    trials on the searched images (fidelity vs GFLOPs share, 95% intervals as bars), its chosen
    setting as measured on the held-out images (a diamond with its interval), and ``chosen`` —
    the calibration picked among them (e.g. what ``method="auto"`` returned) — ringed; the goal
    as a line.  Returns the file written."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colours = iter(plt.get_cmap("tab10").colors)
    first = entries[0][1]
    measure, dense = first.measure, first.unpatched_gflops
    winner = next((label for label, c in entries if chosen is not None and repr(c.method) == repr(chosen.method)), None)
    for label, c in entries:
        colour = next(colours)
        front = pareto_front([r for r in c.trials if not r.get("pruned")], "fidelity")
        if front:
            shares = [r["gflops"] / dense for r in front]
            values = [r["fidelity"] for r in front]
            bounds = [interval_of(r["fidelity"], r["fidelity_low"], r["images"], measure) for r in front]
            ax.errorbar(
                shares,
                [100 * v for v in values],
                yerr=[
                    [100 * (v - lo) for v, (lo, _) in zip(values, bounds)],
                    [100 * (hi - v) for v, (_, hi) in zip(values, bounds)],
                ],
                fmt="-o",
                ms=3,
                lw=1,
                capsize=2,
                color=colour,
                alpha=0.7,
                label=f"{label}: front on {c.search_images} searched images",
            )
        low, high = interval_of(c.fidelity, c.fidelity_low, c.images, measure)
        ax.errorbar(
            [c.gflops_share],
            [100 * c.fidelity],
            yerr=[[100 * (c.fidelity - low)], [100 * (high - c.fidelity)]],
            fmt="D",
            ms=7,
            capsize=3,
            color=colour,
            markeredgecolor="k",
            label=f"{label}: chosen, on {c.images} held-out images" + (" (met)" if c.met else " (not met)"),
        )
        if label == winner:
            ax.scatter([c.gflops_share], [100 * c.fidelity], s=260, facecolors="none", edgecolors="k", lw=1.5, zorder=4)
    if first.goal == "budget":
        ax.axvline(first.target / dense, color="k", ls="--", lw=0.8, label=f"budget {first.target / dense:.0%}")
    else:
        ax.axhline(100 * first.target, color="k", ls="--", lw=0.8, label=f"floor {first.target:g} (lower bound)")
    ax.set_xlabel("share of the unpatched model's GFLOPs")
    ax.set_ylabel(f"{'agreement with' if measure == 'agreement' else 'output cosine to'} the unpatched model (%)")
    ax.legend(fontsize=6, loc="lower right")
    ax.set_title(title or (f"chosen: {winner}" if winner else "calibration"), fontsize=9)
    return _save(fig, out)
