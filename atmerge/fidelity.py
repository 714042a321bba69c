"""Paired fidelity of a reduced model's outputs to the unpatched model's on the same images:
agreement of predicted classes (with a Wilson interval), top-5 agreement, mean KL, output
cosine, and top-1 change with its paired standard error."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (default: two-sided 95%)."""
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    p = successes / total
    centre = p + z * z / (2 * total)
    spread = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    denominator = 1 + z * z / total
    return max(0.0, (centre - spread) / denominator), min(1.0, (centre + spread) / denominator)


def paired_fidelity(outputs: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """outputs, reference: [images, classes] logits of the reduced and the unpatched model
    (or [images, features] for a feature model: then only the cosine is meaningful).
    labels: [images] class indices, for top-1 and its paired change.

    Returns agreement (share of images with the same predicted class) and its 95% Wilson
    interval, top-5 agreement (the unpatched prediction is in the reduced model's top 5),
    mean KL(unpatched ‖ reduced) in nats, mean cosine of the outputs, and with labels top-1 of
    both and the change with its paired standard error (SE of the mean per-image difference)."""
    if outputs.shape != reference.shape:
        raise ValueError(f"outputs {list(outputs.shape)} and reference {list(reference.shape)} differ in shape")
    n = outputs.shape[0]
    outputs, reference = outputs.double(), reference.double()
    ref_class = reference.argmax(-1)
    same = outputs.argmax(-1) == ref_class
    top5 = outputs.topk(min(5, outputs.shape[-1]), dim=-1).indices
    kl = F.kl_div(outputs.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    low, high = wilson_interval(int(same.sum()), n)
    result = {
        "images": n,
        "agreement": same.double().mean().item(),
        "agreement_low": low,
        "agreement_high": high,
        "top5_agreement": (top5 == ref_class[:, None]).any(-1).double().mean().item(),
        "kl": kl.mean().item(),
        "cosine": F.cosine_similarity(outputs, reference, dim=-1).mean().item(),
    }
    if labels is not None:
        correct = (outputs.argmax(-1) == labels).double()
        base = (ref_class == labels).double()
        diff = correct - base
        result.update(
            top1=correct.mean().item(),
            top1_unpatched=base.mean().item(),
            top1_change=diff.mean().item(),
            top1_change_se=(diff.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else math.nan,
        )
    return result


FIDELITY_MEASURES = ("agreement", "cosine")


def per_image_fidelity(outputs: torch.Tensor, reference: torch.Tensor, measure: str) -> torch.Tensor:
    """[images] float64: 1/0 whether the predicted class is the unpatched one ('agreement'), or
    the cosine of the two outputs ('cosine': for feature models, or logits)."""
    if measure == "agreement":
        return (outputs.argmax(-1) == reference.argmax(-1)).double()
    if measure == "cosine":
        return F.cosine_similarity(outputs.double(), reference.double(), dim=-1)
    raise ValueError(f"fidelity measure {measure!r} is not supported; choose one of {FIDELITY_MEASURES}")


def fidelity_interval(values: torch.Tensor, measure: str, z: float = 1.959964) -> tuple[float, float]:
    """Interval of the mean of per-image fidelities ``values`` [images]: Wilson for agreement
    (a proportion), mean ± z·SE (normal approximation) for cosine.  Default: two-sided 95%;
    z = 1.644854 gives one-sided 95% bounds."""
    n = values.numel()
    if n == 0:
        raise ValueError("no images: the fidelity interval needs at least one")
    if measure == "agreement":
        return wilson_interval(int(round(float(values.sum()))), n, z)
    mean = float(values.mean())
    se = float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.inf
    return mean - z * se, mean + z * se
