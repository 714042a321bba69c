"""`atmerge eval`: a method against the unpatched model on the same images, in one run."""

from __future__ import annotations

import torch
from torch import nn

from atmerge.api import last_stats, patch, unpatch
from atmerge.distributed import reduce_eval
from atmerge.evaluate import evaluate
from atmerge.experiments.setup import count_params
from atmerge.methods.base import Method
from atmerge.methods.registry import method_settings
from atmerge.models.adapter import is_classifier


def run_eval(
    model: nn.Module,
    method: Method,
    batches,
    *,
    device: str = "cpu",
    progress: bool = True,
    prop_attn: bool | None = None,
    prune_last_block: bool | None = None,
) -> dict:
    """Evaluate the unpatched model, then ``model`` patched with ``method``, on ``batches``
    (a re-iterable of (images, labels)); returns both results and their differences.

    The baseline's outputs are kept so that the merged model's output cosine to them is reported;
    a feature model (no class head) has no top-1 / top-5 (None), only that cosine.
    Under torchrun each process passes its shard of the batches and gets the results over all
    images (:func:`atmerge.distributed.reduce_eval`).
    prop_attn, prune_last_block: patch options (None = defaults, see :func:`atmerge.patch`); the
    values used are reported.
    """
    model = model.to(device).eval()
    unpatch(model)
    base, ref = evaluate(model, batches, keep_outputs=True, progress=progress, desc="baseline", device=device)
    patch(model, method, prop_attn=prop_attn, prune_last_block=prune_last_block)
    try:
        merged, _ = evaluate(model, batches, reference=ref, progress=progress, desc="merged", device=device)
        used = last_stats(model)
    finally:
        unpatch(model)
    base, merged = reduce_eval(base), reduce_eval(merged)
    if not is_classifier(model):  # features (num_classes=0, an HF *Model): no classes, judged by the cosine only
        for r in (base, merged):
            r.top1 = r.top5 = None
    diff = {
        "gflops": merged.gflops - base.gflops,
        "gflops_ratio": merged.gflops / base.gflops,
        "speedup": merged.images_per_second / base.images_per_second,
        "top1": None if base.top1 is None else merged.top1 - base.top1,
        "top5": None if base.top5 is None else merged.top5 - base.top5,
    }
    return {
        "method": method_settings(method),
        "prop_attn": used.prop_attn,
        "prune_last_block": used.prune_last_block,
        "device": str(device),
        "params_m": count_params(model),
        "images": base.images,
        "baseline": base.to_dict(),
        "merged": merged.to_dict(),
        "difference": diff,
    }


def eval_rows(result: dict) -> list[dict]:
    """Two table/CSV rows: the baseline and the merged model."""
    rows = []
    for name in ("baseline", "merged"):
        r = result[name]
        rows.append(
            {
                "run": name if name == "baseline" else result["method"]["method"],
                "top1": r["top1"],
                "top5": r["top5"],
                "gflops": r["gflops"],
                "params_m": result["params_m"],
                "images_per_s": r["images_per_second"],
                "output_cosine": r["output_cosine"],
                "tokens_per_block": [round(t, 2) for t in r["tokens_per_block"]],
            }
        )
    return rows
