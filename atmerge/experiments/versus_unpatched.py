"""`atmerge eval`: a method against the unpatched model on the same images, in one run (the
measuring itself is :func:`atmerge.evaluate.evaluate`)."""

from __future__ import annotations

import torch
from torch import nn

from atmerge.api import last_stats, patch, unpatch
from atmerge import distributed
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
    ``fidelity``: the merged model against the unpatched one on every image, labels or not:
    agreement (same predicted class) with its 95% Wilson interval, top-5 agreement, mean
    KL(unpatched ‖ merged) and mean output cosine (a feature model: the cosine only).
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
        merged, out = evaluate(
            model, batches, reference=ref, keep_outputs=True, progress=progress, desc="merged", device=device
        )
        used = last_stats(model)
    finally:
        unpatch(model)
    base, merged = reduce_eval(base), reduce_eval(merged)
    fidelity = eval_fidelity(
        torch.cat([o.float().cpu() for o in out]), torch.cat([r.float().cpu() for r in ref]), is_classifier(model)
    )
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
        "label": method.display_name or type(method).__name__,
        "prop_attn": used.prop_attn,
        "prune_last_block": used.prune_last_block,
        "device": str(device),
        "params_m": count_params(model),
        "images": base.images,
        "baseline": base.to_dict(),
        "merged": merged.to_dict(),
        "difference": diff,
        "fidelity": fidelity,
    }


def eval_fidelity(outputs: torch.Tensor, reference: torch.Tensor, classifier: bool) -> dict:
    """Agreement (and its 95% Wilson interval), top-5 agreement, mean KL and cosine of
    ``outputs`` to ``reference`` over every image of every process (summed under torchrun);
    a feature model: the cosine only."""
    from atmerge.fidelity import wilson_interval

    n = outputs.shape[0]
    cosine = torch.nn.functional.cosine_similarity(outputs.double(), reference.double(), dim=-1).sum().item()
    if not classifier:
        total, cosine = distributed.sum_floats([n, cosine])
        return {"images": int(total), "cosine": cosine / total}
    ref_class = reference.argmax(-1)
    same = (outputs.argmax(-1) == ref_class).sum().item()
    top5 = (outputs.topk(min(5, outputs.shape[-1]), dim=-1).indices == ref_class[:, None]).any(-1).sum().item()
    kl = torch.nn.functional.kl_div(
        outputs.double().log_softmax(-1), reference.double().log_softmax(-1), log_target=True, reduction="sum"
    ).item()
    total, same, top5, kl, cosine = distributed.sum_floats([n, same, top5, kl, cosine])
    low, high = wilson_interval(int(round(same)), int(total))
    return {
        "images": int(total),
        "agreement": same / total,
        "agreement_low": low,
        "agreement_high": high,
        "top5_agreement": top5 / total,
        "kl": kl / total,
        "cosine": cosine / total,
    }


def eval_rows(result: dict) -> list[dict]:
    """Two table/CSV rows: the baseline and the merged model."""
    rows = []
    for name in ("baseline", "merged"):
        r = result[name]
        rows.append(
            {
                "run": name if name == "baseline" else result.get("label", result["method"]["method"]),
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
