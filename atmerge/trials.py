"""What one tuning trial needs, shared by calibration and search: a trial's method from its
searched settings, and the unpatched model's outputs on the calibration images (computed once,
optionally kept on disk by a digest of the weights and images)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from atmerge.api import unpatch
from atmerge.evaluate import evaluate
from atmerge.methods.base import Method


def trial_method(base: Method, trial: dict, num_blocks: int, num_patches: int, profile=None) -> Method:
    """The method of one trial row: ``base`` with the trial's searched settings (``profile``:
    the score profile the search space was fitted to, if any)."""
    space = type(base).search_space(num_blocks, num_patches, profile)
    return base.searched({k: trial[k] for k in space}, profile)


def _digest(model: nn.Module, batches: list) -> str:
    """sha256 of the model's class, weights and buffers and of the images and labels."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    tensors = sorted(model.state_dict().items()) + [
        (f"batch{i}.{j}", t) for i, b in enumerate(batches) for j, t in enumerate(b) if t is not None
    ]
    for name, t in tensors:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def unpatched_outputs(
    model: nn.Module, batches: list, cache_dir: str | Path | None = None
) -> tuple[dict, torch.Tensor, bool]:
    """The unpatched model's top-1, top-5, GFLOPs and outputs (logits, or features for a model
    without head) on ``batches`` — computed, or read from ``cache_dir`` when this model and
    these images were seen before (a safetensors file named by their digest, the summary in
    its metadata).

    Returns (summary, outputs [images, classes or features] float32, whether it came from the
    cache)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    unpatch(model)
    path = Path(cache_dir) / f"unpatched-{_digest(model, batches)[:24]}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "summary" in meta and "outputs" in f.keys():  # else: not ours, written over below
                return json.loads(meta["summary"]), f.get_tensor("outputs"), True
    res, outputs = evaluate(model, batches, keep_outputs=True)
    summary = {"top1": res.top1, "top5": res.top5, "gflops": res.gflops, "images": res.images}
    outputs = torch.cat([o.detach().float().cpu() for o in outputs])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"outputs": outputs.contiguous()}, str(path), metadata={"summary": json.dumps(summary)})
    return summary, outputs, False
