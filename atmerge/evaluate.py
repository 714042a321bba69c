"""Run a (patched or unpatched) model over a data loader: accuracy, mean GFLOPs, tokens per
block, fidelity to reference outputs and throughput, measured in one pass."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from atmerge.api import gflops as dense_gflops
from atmerge.api import is_patched, last_stats
from atmerge.models.adapter import adapter_for, check_model_images


@dataclass
class EvalResult:
    """Means over all images.  gflops: per image (1e9 multiply-adds), each batch weighted by its
    images.  images_per_second: images / seconds spent in forward passes (data loading excluded).
    top1/top5: None without labels.  output_cosine: mean cosine of each output to the reference
    output (e.g. the unmerged model's CLS feature or logits), None without a reference."""

    images: int
    gflops: float
    matching_gflops: float
    tokens_per_block: list[float]
    seconds: float
    images_per_second: float
    top1: float | None = None
    top5: float | None = None
    output_cosine: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    *,
    reference: list[torch.Tensor] | None = None,
    keep_outputs: bool = False,
    progress: bool = False,
    desc: str = "eval",
    device: str | torch.device | None = None,
) -> tuple[EvalResult, list[torch.Tensor]]:
    """Evaluate ``model`` on ``batches`` of images or (images, labels).

    reference: outputs of another model on the same batches (same order) to compare against.
    device: where to run (the batches are moved there); None = where they are.
    Returns (result, outputs per batch if keep_outputs else []).
    """
    adapter = adapter_for(model)
    model.eval()
    images = correct1 = correct5 = 0
    labelled = True
    seconds = gflops_sum = matching_sum = cosine_sum = 0.0
    tokens: list[float] = []
    outputs: list[torch.Tensor] = []
    for i, batch in enumerate(_progress(batches, progress, desc)):
        x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
        if device is not None:
            x = x.to(device)
            y = None if y is None else y.to(device)
        gh, gw = check_model_images(model, x)
        n = x.shape[0]
        if reference is not None and (i >= len(reference) or reference[i].shape[0] != n):
            raise ValueError(f"reference does not match batch {i} ({n} images); pass the outputs of the same batches")
        _sync(x.device)
        start = time.perf_counter()
        out = adapter.main_output(model, model(x))
        _sync(x.device)
        seconds += time.perf_counter() - start
        if is_patched(model):
            s = last_stats(model)
            g, mg, tok = s.gflops, s.matching_gflops, s.tokens_per_block
        else:
            g, mg = dense_gflops(model, tuple(x.shape[1:])), 0.0
            tok = [float(gh * gw + adapter.num_protected(model))] * len(adapter.blocks(model))
        gflops_sum += g * n
        matching_sum += mg * n
        tokens = [t * n for t in tok] if not tokens else [a + t * n for a, t in zip(tokens, tok)]
        if y is None:
            labelled = False
        else:
            top5 = out.topk(min(5, out.shape[-1]), dim=-1).indices
            correct1 += (top5[:, 0] == y).sum().item()
            correct5 += (top5 == y[:, None]).any(-1).sum().item()
        if reference is not None:
            cosine_sum += F.cosine_similarity(out.flatten(1), reference[i].flatten(1), dim=-1).sum().item()
        if keep_outputs:
            outputs.append(out)
        images += n
    if images == 0:
        raise ValueError("no images to evaluate")
    tokens_per_block = [t / images for t in tokens]
    return (
        EvalResult(
            images=images,
            gflops=gflops_sum / images,
            matching_gflops=matching_sum / images,
            tokens_per_block=tokens_per_block,
            seconds=seconds,
            images_per_second=images / seconds if seconds > 0 else float("inf"),
            top1=correct1 / images if labelled else None,
            top5=correct5 / images if labelled else None,
            output_cosine=cosine_sum / images if reference is not None else None,
        ),
        outputs,
    )


@dataclass
class PatchedRun:
    """What :func:`run_batches` measured.  outputs: [images, K] float32 on the CPU (logits, or the
    pooled feature); gflops: mean per image; merged_per_block: mean tokens merged (or pruned) in
    each block per image (zeros for an unpatched model); images: how many."""

    outputs: torch.Tensor
    gflops: float
    merged_per_block: list[float]
    images: int


@torch.no_grad()
def run_batches(model: nn.Module, batches: Iterable[torch.Tensor]) -> PatchedRun:
    """Run ``model`` (patched or not) over image ``batches`` [B, C, H, W]: its outputs, mean
    GFLOPs and merge counts per image, each batch weighted by its images.  The one loop that
    tuning, freezing and budget matching share."""
    adapter = adapter_for(model)
    outputs: list[torch.Tensor] = []
    gflops_sum, merged_sum, images = 0.0, None, 0
    for x in batches:
        n = x.shape[0]
        if n == 0:
            continue
        outputs.append(adapter.main_output(model, model(x)).float().cpu())
        if is_patched(model):
            stats = last_stats(model)
            g, merged = stats.gflops, stats.merged_per_block
        else:
            g, merged = dense_gflops(model, tuple(x.shape[1:])), [0.0] * len(adapter.blocks(model))
        gflops_sum += g * n
        merged_sum = [m * n for m in merged] if merged_sum is None else [a + m * n for a, m in zip(merged_sum, merged)]
        images += n
    if images == 0:
        raise ValueError("no images to run the model on; pass at least one non-empty batch")
    return PatchedRun(torch.cat(outputs), gflops_sum / images, [m / images for m in merged_sum], images)
