"""Helpers shared by the benchmarks: tables, data batches, warm-up."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from atmerge import data
from atmerge.experiments.io import format_table

TARGETS = (0.85, 0.75, 0.65)  # shares of the unpatched model's GFLOPs for matched comparisons


def describe(method) -> str:
    """The method's settings as 'k=v, ...' (its repr without the class name)."""
    text = repr(method)
    return text[len(type(method).__name__) + 1 : -1]


def table(rows: list[dict], cols: list[str]) -> str:
    return format_table(rows, cols)


def loader_batches(dataset, batch_size: int):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    return [batch for batch in loader]


def warm_up(model, batches) -> None:
    first = batches[0][0] if isinstance(batches[0], (tuple, list)) else batches[0]
    with torch.no_grad():
        model(first)


def imagenet_batches(model, count: int, batch_size: int):
    tf = data.model_transform(model)
    files = sorted(data.imagenet_samples_folder().iterdir())[:count]
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    return list(x.split(batch_size))


def write_json(report: dict, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")
