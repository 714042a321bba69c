"""What :func:`atmerge.last_stats` returns: token counts, merges and GFLOPs of one forward pass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class BlockRecord:
    """One block of one forward pass (counts are per image; all images of a batch share them)."""

    tokens_in: int
    tokens_mlp: int
    merged: int
    threshold: float = math.nan
    matching_macs: float = 0.0
    requested: int | None = None
    tokens_attended: int | None = None  # after a reduction before attention (None: tokens_in)

    def __post_init__(self) -> None:
        if self.tokens_attended is None:
            object.__setattr__(self, "tokens_attended", self.tokens_in)


@dataclass(frozen=True)
class MergeStats:
    """Statistics of the last forward pass of a patched model.

    tokens_per_block: tokens entering each block (mean over the batch).
    merged_per_block: r of each block (tokens merged or pruned in it, before or after its
        attention; a mean over images when a method merges per image).
    tokens_mlp_per_block: tokens reaching each block's MLP (after merging, and after keeping only
        the CLS token in the last block where the method does so).
    thresholds: θ of each block (nan for methods without one).
    gflops: per-image GFLOPs of the forward (1e9 multiply-adds), from the token counts above.
    matching_gflops: per-image GFLOPs spent finding the pairs (not included in ``gflops``).
    batch_size: images in the batch.
    requested_per_block: r asked for by a fixed-count method (None elsewhere); see clipped_blocks.
    tokens_attended_per_block: tokens whose values and outputs each block's attention computes
        (fewer than tokens_per_block where a method merges before attention, as MCTF does).
    prune_last_block: whether only the protected tokens reached the last block's MLP.
    prop_attn: whether proportional attention (+log size) was on.
    executed_gflops: per-image GFLOPs of what actually ran: equal to ``gflops``, except where
        images merge their own counts in one padded batch — then attention's two matmuls ran on as
        many tokens as the batch's longest image (padding included), while the norms, linear
        layers and MLP ran on the real tokens only (packed, :mod:`atmerge.core.packing`), and
        ``gflops`` counts only real tokens.
    """

    tokens_per_block: list[float]
    merged_per_block: list[float]
    tokens_mlp_per_block: list[float]
    thresholds: list[float]
    gflops: float
    matching_gflops: float
    batch_size: int
    requested_per_block: list[int | None] | None = None
    tokens_attended_per_block: list[float] | None = None
    prune_last_block: bool = False
    prop_attn: bool = True
    executed_gflops: float | None = None

    @property
    def clipped_blocks(self) -> list[int]:
        """Blocks (from 0) where a fixed-count method asked for more than the block allowed."""
        requested = self.requested_per_block or [None] * len(self.merged_per_block)
        return [i for i, (q, m) in enumerate(zip(requested, self.merged_per_block)) if q is not None and q > m]

    def to_dict(self) -> dict:
        """JSON-ready dict (nan thresholds become None)."""
        d = asdict(self)
        d["thresholds"] = [None if math.isnan(t) else t for t in self.thresholds]
        return d
