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
    num_a = scores.shape[-1]
    if num_a == 0 or scores.shape[0] == 0:
        return 0
    mean = count_above(scores, threshold).double().mean().item()
    return int(min(math.floor(mean + 0.5), num_a))
