"""Helpers shared by the benchmarks: tables, data batches, warm-up."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

import atmerge
from atmerge import data
from atmerge.experiments.io import format_table
from atmerge.methods.registry import knob_factory, method_settings

TARGETS = (0.85, 0.75, 0.65)  # shares of the unpatched model's GFLOPs for matched comparisons

# Every method variant, as (label, registry name, fixed settings) for knob_factory.
METHOD_VARIANTS = (
    ("ATM", "atm", {}),
    ("ATM centred", "atm", {"similarity": "centered"}),
    ("ConstantThreshold", "constant", {}),
    ("ToMe", "tome", {}),
    ("TopR increasing", "topr", {}),
    ("EViT", "evit", {}),
    ("MCTF", "mctf", {}),
    ("ZeroTP", "zerotp", {}),
)


def factories(depth: int, num_patches: int) -> dict:
    """One knob t in [0, 1] per method variant (atmerge.methods.registry.knob_factory)."""
    return {label: knob_factory(name, depth, num_patches, **fixed) for label, name, fixed in METHOD_VARIANTS}


def describe(method) -> str:
    """The method's settings as 'k=v, ...' (its repr without the class name)."""
    text = repr(method)
    return text[len(type(method).__name__) + 1 : -1]


def matched_rows(name: str, model, methods: dict, base, calib_images, evaluation, targets, *, steps: int,
                 reference=None, timed: bool = False) -> list[dict]:
    """Every method bisected (atmerge.match_gflops, on ``calib_images``) to each share of the
    unpatched model's GFLOPs in ``targets``, then evaluated on ``evaluation``.

    base: the unpatched model's EvalResult on ``evaluation``; reference: its outputs, for the
    cosine fidelity column when there are no labels.  timed: warm up before each evaluation so
    that images/s is comparable between rows."""
    rows = []
    for share in targets:
        for label, factory in methods.items():
            found = atmerge.match_gflops(model, factory, share * base.gflops, calib_images, steps=steps)
            if timed:
                warm_up(model, evaluation)
            res, _ = atmerge.evaluate(model, evaluation, reference=reference)
            atmerge.unpatch(model)
            rows.append(dict(
                model=name, target=f"{share:.0%}", method=label, setting=describe(found.method),
                settings=method_settings(found.method), gflops=res.gflops, gflops_share=res.gflops / base.gflops,
                top1=res.top1, top1_change=None if res.top1 is None else res.top1 - base.top1,
                cls_cosine=res.output_cosine, images_per_s=res.images_per_second if timed else None,
                calib_gflops=found.gflops, within_budget_on_calibration=found.within_budget,
            ))
            print(f"  {name} {share:.0%} {label}: {res.gflops:.4f} GFLOPs ({res.gflops / base.gflops:.0%}) "
                  f"top1={res.top1} cos={res.output_cosine}", flush=True)
    return rows


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
