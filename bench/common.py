"""Helpers shared by the benchmarks: tables, data batches, warm-up."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

import atmerge
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


def imagenet_photos(transform, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` shared ImageNet photos through ``transform`` [count, 3, H, W] and
    their ImageNet-1K class indices [count] (position of the wnid among the 1,000 sorted)."""
    files = sorted(data.imagenet_samples_folder().iterdir())
    wnids = sorted({f.name.split("_")[0] for f in files})
    files = files[:count]
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    return x, torch.tensor([wnids.index(f.name.split("_")[0]) for f in files])


def imagenet_batches(model, count: int, batch_size: int):
    return list(imagenet_photos(data.model_transform(model), count)[0].split(batch_size))


def cifar10_model():
    """The CIFAR-10 reference ViT and its preprocessing."""
    from atmerge import zoo

    return zoo.cifar10_reference_vit(), data.cifar10_transform()


def dinov2_probe_model():
    """DINOv2-S + its linear CIFAR-10 probe (trained first if missing, as `atmerge probe` does)
    and its preprocessing (224 px)."""
    from atmerge.experiments.probe import default_probe_path, load_probe_classifier, run_probe

    if not default_probe_path().exists():
        run_probe(2000, 1000, progress=False)
    model, _ = load_probe_classifier()
    return model, data.model_transform(model)


def write_json(report: dict, path: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


def alternate_timings(runs: dict, repeats: int, warmup: int = 2, sync=None) -> dict[str, float]:
    """Median seconds of each run, timed alternately (a, b, c, a, b, c, …: the machine's load
    drifts, so one run's timings are never taken in a block) after ``warmup`` rounds.
    runs: name → (prepare, run); ``prepare()`` (e.g. patching) is not timed, ``run()`` is.
    sync: called before each clock read (e.g. ``torch.cuda.synchronize``)."""
    sync = sync or (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for round_ in range(warmup + repeats):
            for name, (prepare, run) in runs.items():
                prepare()
                sync()
                start = time.perf_counter()
                run()
                sync()
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def method_runs(model, methods: dict, x) -> dict:
    """For :func:`alternate_timings`: ``model(x)`` patched with each method (None: unpatched)."""
    def prepare(method):
        return lambda: atmerge.patch(model, method) if method is not None else atmerge.unpatch(model)

    return {name: (prepare(method), lambda: model(x)) for name, method in methods.items()}
