"""Helpers shared by the benchmarks: tables, data batches, warm-up, and the header that every
bench JSON starts with (:func:`run_header`: how the numbers were made)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

import atmerge
from atmerge import data
from atmerge.results_io import format_table

TARGETS = (0.85, 0.75, 0.65)  # shares of the unpatched model's GFLOPs for matched comparisons
WARMUP = 2  # untimed rounds before every timing (alternate_timings)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, sysctl on macOS; else what platform says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The checkout's commit, '+dirty' when tracked files differ from it; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_info() -> dict | None:
    """The GPU the run used (None without CUDA): name, compute capability, count, NVIDIA driver
    (nvidia-smi) and the CUDA / cuDNN versions torch runs with."""
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    driver = None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={index}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        driver = done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return dict(
        name=torch.cuda.get_device_name(index),
        capability=".".join(map(str, torch.cuda.get_device_capability(index))),
        count=torch.cuda.device_count(),
        driver=driver,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
    )


def _plain(value):
    """``value`` as JSON: paths and other objects as text, containers element by element."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def run_header(args=None, **chosen) -> dict:
    """How a bench's numbers were made, the head of its JSON: the command line as typed
    (``sys.argv``) and every parsed option (``args``, defaults included); the machine (CPU model,
    cores, the torch threads in use now — call this after setting them —, and the GPU: name,
    driver, CUDA); python / torch / timm / transformers / atmerge versions and the git commit;
    the time (UTC); and ``chosen``: every setting the bench chose itself (bisected knobs,
    warm-up and repeat counts, dtype, which epoch was timed, ...)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return dict(
        command=shlex.join(["python", *sys.argv]),
        argv=list(sys.argv),
        python_executable=sys.executable,
        arguments=_plain(vars(args)) if args is not None else None,
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=dict(
            cpu=cpu_model(),
            cores=os.cpu_count(),
            cores_usable=usable,
            torch_threads=torch.get_num_threads(),
            torch_interop_threads=torch.get_num_interop_threads(),
            platform=platform.platform(),
        ),
        gpu=gpu_info(),
        versions=dict(
            python=platform.python_version(),
            torch=torch.__version__,
            timm=_version("timm"),
            transformers=_version("transformers"),
            fvcore=_version("fvcore"),
            numpy=_version("numpy"),
            atmerge=_version("atmerge"),
            git_commit=_git_commit(),
        ),
        chosen=_plain(chosen),
    )


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
    from atmerge import checkpoints

    return checkpoints.cifar10_reference_vit(), data.cifar10_transform()


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


def alternate_timings(runs: dict, repeats: int, warmup: int = WARMUP, sync=None) -> dict[str, float]:
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
