"""Per-block thresholds and merge counts: Eq. (1) of the ATM paper and batch-adaptive r.

Pure functions on numbers and tensors; no model code. Blocks are counted from 1 in the
paper's formulas (``layer``) and from 0 in Python lists (``block``).
"""

from __future__ import annotations

import math

import torch


def layer_threshold(layer: int, alpha: float, beta: float, theta_min: float) -> float:
    """θˡ = max(α − (e^{β(l−1)} − 1), θ_min), Eq. (1), for layer ``l`` counted from 1."""
    if layer < 1:
        raise ValueError(f"layer is counted from 1, got {layer}")
    return max(alpha - (math.exp(beta * (layer - 1)) - 1.0), theta_min)


def threshold_schedule(depth: int, alpha: float, beta: float, theta_min: float) -> list[float]:
    """Thresholds of all ``depth`` blocks (Eq. 1), index 0 = first block (l = 1)."""
    return [layer_threshold(layer, alpha, beta, theta_min) for layer in range(1, depth + 1)]


def count_above(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Number of A tokens per image whose best score is strictly above ``threshold``.

    scores: [B, Na] best cosine of each A token to set B.  Returns [B] (int64).
    """
    return (scores > threshold).sum(dim=-1)


def batch_adaptive_r(scores: torch.Tensor, threshold: float) -> int:
    """r of a batch (Section 3.4): the mean over images of the per-image count above θ.

    The mean is rounded half up (``floor(mean + 0.5)``), so a batch of one image merges exactly
    its own count, and the result is clipped to the size of set A.  scores: [B, Na].
    """
    num_a, batch = scores.shape[-1], scores.shape[0]
    if num_a == 0 or batch == 0:
        return 0
    mean = int((scores > threshold).sum()) / batch  # one read of the batch's total count: the mean of the counts
    return int(min(math.floor(mean + 0.5), num_a))


def tome_r_schedule(depth: int, r: int | list[int] | tuple[int, float]) -> list[int]:
    """ToMe's per-block merge counts: an int (same r everywhere), a list (one per block, padded
    with zeros), or (r, inflection): a linear ramp with mean r from r(1 − inflection) in the first
    block to r(1 + inflection) in the last (inflection 0 = constant, > 0 increasing)."""
    if isinstance(r, list):
        if len(r) > depth:
            raise ValueError(f"r has {len(r)} entries for a model of {depth} blocks")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in r):
            raise ValueError(f"r must be a list of integers >= 0, got {r}")
        return list(r) + [0] * (depth - len(r))
    inflection = 0.0
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"r as a tuple must be (r, inflection), got {r}")
        r, inflection = r
        if isinstance(inflection, bool) or not isinstance(inflection, (int, float)) or not -1 <= inflection <= 1:
            raise ValueError(f"the inflection of r=(r, inflection) must be a number in [-1, 1], got {inflection!r}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be an integer >= 0, got {r!r}")
    first = int(r * (1.0 - inflection))
    last = 2 * r - first
    step = (last - first) / max(depth - 1, 1)
    return [int(first + step * i) for i in range(depth)]


def linear_r_schedule(depth: int, r: int, schedule: str) -> list[int]:
    """Figure 5's fixed-count schedules, r in the first block: 'constant' (r everywhere),
    'increasing' (r + l − 1) or 'decreasing' (max(r − (l − 1), 0)) for block l from 1."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be an integer >= 0, got {r!r}")
    step = {"constant": 0, "increasing": 1, "decreasing": -1}.get(schedule)
    if step is None:
        raise ValueError(f"schedule={schedule!r}; choose 'constant', 'increasing' or 'decreasing'")
    return [max(r + step * i, 0) for i in range(depth)]


def scaled_schedule(counts: list[int], scale: float) -> list[int]:
    """Per-block counts ``counts`` scaled by ``scale`` ≥ 0 and rounded so that the total is
    ⌊scale · Σ counts⌋ and each block keeps its share (error diffusion over the blocks): a merge
    count that moves one token at a time, for landing a fixed-count schedule on a budget.  An
    all-zero schedule scales as a constant one."""
    shape = counts if any(counts) else [1] * len(counts)
    total, out, done = 0, [], 0
    for c in shape:
        total += c
        cumulative = math.floor(scale * total + 1e-9)
        out.append(cumulative - done)
        done = cumulative
    return out
