"""Data parallelism with ``torchrun``: the process group, shards of the data, and results
reduced across processes so that they equal what one process would report.

Launched by ``torchrun --nproc_per_node N ...`` (which sets WORLD_SIZE, RANK, LOCAL_RANK), every
function here sees N processes; launched plainly, one process and no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from atmerge.evaluate import EvalResult


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes."""

    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Whether this process is the one that prints and writes (rank 0)."""
        return self.rank == 0


def parse_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)`` with a one-line ValueError naming a device that cannot be used."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA device is available; use 'cpu'")
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    return parsed


def init(device: str | torch.device = "cpu") -> World:
    """Join the process group that ``torchrun`` describes (gloo on CPU, nccl on CUDA; each
    process takes the GPU of its LOCAL_RANK), or describe the single process when not launched
    by torchrun.  A process group that is already initialised is reused."""
    parsed = parse_device(device)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 and not dist.is_initialized():
        return World(0, 1, parsed)
    if parsed.type == "cuda":
        parsed = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(parsed)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if parsed.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), parsed)


def active() -> bool:
    """Whether more than one process takes part."""
    return dist.is_initialized() and dist.get_world_size() > 1


def gather(obj: object) -> list[object]:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not active():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait until every process gets here (e.g. until rank 0 has written its files)."""
    if active():
        dist.barrier()


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sums over the processes (float64)."""
    return [float(sum(column)) for column in zip(*gather([float(v) for v in values]))]


def batch_shard(num_items: int, batch_size: int, rank: int, size: int) -> list[list[int]]:
    """The index batches of process ``rank``: the items cut in order into batches of
    ``batch_size`` (the last one shorter), batch i going to process i mod size.  Each batch is the
    one a single process would run, so merges that depend on the batch (batch-adaptive r) match."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    starts = range(0, num_items, batch_size)
    return [list(range(s, min(s + batch_size, num_items))) for s in starts][rank::size]


def shard_loader(dataset, batch_size: int, workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over this process's :func:`batch_shard` of ``dataset`` (no shuffling)."""
    rank, size = (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)
    batches = batch_shard(len(dataset), batch_size, rank, size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers)


def reduce_eval(result: EvalResult | None) -> EvalResult:
    """Combine the :class:`EvalResult` of every process's shard (None for a process without
    images) into the result over all images: means weighted by images, top-1/top-5 from the exact
    counts of correct images; ``seconds`` is the slowest process's (they run side by side) and
    images/s is all images over it.  Without other processes, ``result`` itself."""
    parts = [r for r in gather(result) if r is not None]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        raise ValueError("no images to evaluate")
    images = sum(r.images for r in parts)

    def mean(field: str) -> float | None:
        values = [getattr(r, field) for r in parts]
        if any(v is None for v in values):
            return None
        if field in ("top1", "top5"):  # exact counts of correct images
            return sum(round(v * r.images) for v, r in zip(values, parts)) / images
        return sum(v * r.images for v, r in zip(values, parts)) / images

    tokens = [
        sum(t * r.images for t, r in zip(column, parts)) / images
        for column in zip(*(r.tokens_per_block for r in parts))
    ]
    seconds = max(r.seconds for r in parts)
    return EvalResult(
        images=images,
        gflops=mean("gflops"),
        matching_gflops=mean("matching_gflops"),
        tokens_per_block=tokens,
        seconds=seconds,
        images_per_second=images / seconds if seconds > 0 else float("inf"),
        top1=mean("top1"),
        top5=mean("top5"),
        output_cosine=mean("output_cosine"),
    )
