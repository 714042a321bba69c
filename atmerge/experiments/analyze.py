"""`atmerge analyze`: the ATM paper's studies as library functions (Figures 2 and 6, Tables 3
and A1, Theorem 1 on real merges).  Each returns a JSON-ready dict; ``plot_*`` draw them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from atmerge.api import last_stats, patch, unpatch
from atmerge.budget import match_gflops
from atmerge.core.merging import Merge, merging_error, merging_error_bounds
from atmerge.evaluate import evaluate
from atmerge.methods.atm import ATM
from atmerge.methods.base import BlockContext, Decision, Method
from atmerge.methods.constant import ConstantThreshold
from atmerge.models.adapter import model_depth


def _images(batches) -> list[torch.Tensor]:
    return [b[0] if isinstance(b, (tuple, list)) else b for b in batches]


@torch.no_grad()
def _features(model: nn.Module, images: list[torch.Tensor]) -> torch.Tensor:
    """The final pooled feature (the CLS token after the last norm for CLS-pooled models)."""
    return torch.cat([model.forward_head(model.forward_features(x), pre_logits=True) for x in images])


@torch.no_grad()
def info_loss(model: nn.Module, batches, thresholds=(0.80, 0.85, 0.90, 0.95)) -> dict:
    """Figure 2: merge in one block only (constant threshold θ, alternate matching) and measure
    the cosine distance of the final CLS feature from the unmerged model's, per block, averaged
    over the images.  Returns {'thresholds', 'blocks', 'distance': {θ: [per block]}, 'mean'}."""
    images = _images(batches)
    unpatch(model)
    reference = _features(model, images)
    depth = model_depth(model)
    distance: dict[str, list[float]] = {}
    for theta in thresholds:
        row = []
        for layer in range(1, depth + 1):
            patch(model, ConstantThreshold(theta=theta, blocks=(layer,)))
            feats = _features(model, images)
            row.append(float((1 - F.cosine_similarity(feats, reference, dim=-1)).mean()))
        distance[f"{theta:g}"] = row
    unpatch(model)
    mean = [sum(col) / len(col) for col in zip(*distance.values())]
    return {"thresholds": list(thresholds), "blocks": list(range(1, depth + 1)), "distance": distance, "mean": mean}


def _mean_merged(model, method, images) -> tuple[list[float], float, list[float]]:
    patch(model, method)
    merged, gflops, n = None, 0.0, 0
    with torch.no_grad():
        for x in images:
            model(x)
            s = last_stats(model)
            m = [v * x.shape[0] for v in s.merged_per_block]
            merged = m if merged is None else [a + b for a, b in zip(merged, m)]
            gflops += s.gflops * x.shape[0]
            n += x.shape[0]
    thresholds = s.thresholds
    unpatch(model)
    return [v / n for v in merged], gflops / n, thresholds


def merge_profile(model: nn.Module, batches, method: ATM, steps: int = 10) -> dict:
    """Figure 6: merged tokens per block averaged over the images, for ``method`` and for a
    constant threshold tuned (bisection) to the same mean GFLOPs, with each block's threshold."""
    images = _images(batches)
    atm_merged, atm_gflops, atm_thresholds = _mean_merged(model, method, images)
    found = match_gflops(model, lambda t: ConstantThreshold(theta=t), atm_gflops, images, steps=steps)
    unpatch(model)
    const_merged, const_gflops, const_thresholds = _mean_merged(model, found.method, images)
    return {
        "blocks": list(range(1, model_depth(model) + 1)),
        "atm": {
            "settings": dataclasses.asdict(method),
            "merged": atm_merged,
            "gflops": atm_gflops,
            "thresholds": atm_thresholds,
        },
        "constant": {
            "theta": found.method.theta,
            "merged": const_merged,
            "gflops": const_gflops,
            "thresholds": const_thresholds,
        },
    }


def split_layer_sweep(model: nn.Module, batches, method: ATM) -> dict:
    """Table 3: top-1 and GFLOPs of ``method`` for every split layer l_s = 0..depth."""
    rows = []
    for ls in range(model_depth(model) + 1):
        patch(model, dataclasses.replace(method, split_layer=ls))
        res, _ = evaluate(model, batches)
        rows.append({"split_layer": ls, "top1": res.top1, "gflops": res.gflops})
    unpatch(model)
    return {"settings": dataclasses.asdict(method), "rows": rows}


def batch_size_sweep(
    model: nn.Module, dataset, method: Method, sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
) -> dict:
    """Table A1: top-1 and GFLOPs of ``method`` for each batch size, bounded by what fits: sizes
    above the number of images are skipped, and the sweep stops at the first size that runs out
    of memory (recorded in ``stopped``)."""
    rows = []
    stopped = None
    patch(model, method)
    try:
        for size in sizes:
            if size > len(dataset):
                break
            batches = torch.utils.data.DataLoader(dataset, batch_size=size, shuffle=False)
            try:
                res, _ = evaluate(model, batches)
            except (torch.OutOfMemoryError, MemoryError) as e:
                stopped = f"batch size {size}: out of memory ({type(e).__name__})"
                break
            rows.append({"batch_size": size, "top1": res.top1, "gflops": res.gflops})
    finally:
        unpatch(model)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"rows": rows, "images": len(dataset), "stopped": stopped}


class _MergeRecorder(Method):
    """Wraps a bipartite-merging method and records, for every merged pair, the merging error
    and Theorem 1's bounds computed on the real tokens and sizes."""

    def __init__(self, inner: Method) -> None:
        self.inner = inner
        self.proportional_attention = inner.proportional_attention
        self.attention = inner.attention
        self.batch_adaptive = inner.batch_adaptive
        self.rows: list[dict] = []

    def check_depth(self, depth: int) -> None:
        self.inner.check_depth(depth)

    def decide(self, ctx: BlockContext) -> Decision:
        decision = self.inner.decide(ctx)
        merge = decision.merge
        if isinstance(merge, Merge) and merge.r > 0:
            batch = ctx.tokens.shape[0]
            a_idx = merge.a_idx.expand(batch, -1) if merge.a_idx.dim() == 1 else merge.a_idx
            b_idx = merge.b_idx.expand(batch, -1) if merge.b_idx.dim() == 1 else merge.b_idx
            i, j = a_idx.gather(1, merge.src), b_idx.gather(1, merge.dst)
            xi = ctx.tokens.gather(1, i[..., None].expand(-1, -1, ctx.tokens.shape[-1])).double()
            xj = ctx.tokens.gather(1, j[..., None].expand(-1, -1, ctx.tokens.shape[-1])).double()
            ni, nj = ctx.size.gather(1, i).double(), ctx.size.gather(1, j).double()
            err = merging_error(xi, xj, ni, nj)
            low, high = merging_error_bounds(xi, xj, ni, nj)
            for e, lo, hi, a, b in zip(err.flatten(), low.flatten(), high.flatten(), ni.flatten(), nj.flatten()):
                self.rows.append(
                    {
                        "block": ctx.layer,
                        "n_i": float(a),
                        "n_j": float(b),
                        "error": float(e),
                        "lower": float(lo),
                        "upper": float(hi),
                    }
                )
        return decision


@torch.no_grad()
def merging_error_study(model: nn.Module, batches, method: Method) -> dict:
    """Theorem 1 on real merges: every merged pair's merging error against its bounds."""
    recorder = _MergeRecorder(method)
    patch(model, recorder)
    for x in _images(batches):
        model(x)
    unpatch(model)
    rows = recorder.rows
    tol = 1e-9
    inside = sum(
        1
        for r in rows
        if r["lower"] - tol * (r["n_i"] + r["n_j"]) <= r["error"] <= r["upper"] + tol * (r["n_i"] + r["n_j"])
    )
    return {"pairs": len(rows), "within_bounds": inside, "rows": rows}


# ----------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out) -> str:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return str(out)


def plot_info_loss(result: dict, out) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(result["blocks"], result["mean"], color="#cfd8e3", label="mean")
    for theta, row in result["distance"].items():
        ax.plot(result["blocks"], row, marker="o", ms=3, label=f"θ = {theta}")
    ax.set_xlabel("block merged (only)"), ax.set_ylabel("cosine distance of final CLS")
    ax.set_yscale("log"), ax.legend(fontsize=7)
    return _save(fig, out)


def plot_merge_profile(result: dict, out) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    for ax, key, title in ((axes[0], "constant", "constant threshold"), (axes[1], "atm", "ATM")):
        r = result[key]
        ax.bar(result["blocks"], r["merged"], color="#7fbf7f")
        ax.set_title(f"{title} ({r['gflops']:.3g} GFLOPs)", fontsize=9), ax.set_xlabel("block")
        twin = ax.twinx()
        twin.plot(result["blocks"], r["thresholds"], color="#e08a1e", marker="o", ms=3)
        twin.set_ylim(0, 1.05)
        ax.tick_params(labelleft=True)  # sharey hides the right panel's token scale otherwise
    axes[0].set_ylabel("merged tokens (mean, bars)")
    twin.set_ylabel("threshold (line)")
    return _save(fig, out)


def plot_merging_error(result: dict, out) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    lo = [r["lower"] for r in result["rows"]]
    err = [r["error"] for r in result["rows"]]
    ax.scatter(lo, err, s=4, alpha=0.4, label="merged pairs")
    top = max(lo + [1e-9])
    ax.plot([0, top], [0, top], "k--", lw=1, label="lower bound")
    ax.plot([0, top], [0, 2 * top], "r--", lw=1, label="upper bound")
    ax.set_xlabel("n_i n_j/(n_i+n_j) · δ(x_i, x_j)"), ax.set_ylabel("merging error E_m"), ax.legend(fontsize=7)
    return _save(fig, out)
