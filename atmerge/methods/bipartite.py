"""Shared step of the bipartite-matching methods: split a block's tokens, score every A token
against set B, and turn a merge count into a Decision."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from atmerge.core.matching import alternate_split, best_match, center_keys, size_distinctive_split
from atmerge.core.merging import bipartite_merge
from atmerge.core.padding import (
    padded_alternate_split,
    padded_best_match,
    padded_bipartite_merge,
    padded_size_distinctive_split,
)
from atmerge.methods.base import BlockContext, Decision


@dataclass(frozen=True)
class Matching:
    """Sets A and B of a block and each A token's best B partner: scores, match [B, Na].
    a_real / b_real [B, Na] / [B, Nb]: which entries exist, for a padded batch of num_tokens
    tokens (None otherwise)."""

    a_idx: torch.Tensor
    b_idx: torch.Tensor
    scores: torch.Tensor
    match: torch.Tensor
    macs: float
    a_real: torch.Tensor | None = None
    b_real: torch.Tensor | None = None
    num_tokens: int = 0

    def decision(
        self, r: int | torch.Tensor, num_protected: int, threshold: float = math.nan, requested: int | None = None
    ) -> Decision:
        """Merge r pairs in every image, or r[b] in image b (r a tensor [B]: a padded batch)."""
        if isinstance(r, torch.Tensor):
            merge = padded_bipartite_merge(
                self.scores,
                self.match,
                self.a_idx,
                self.b_idx,
                self.a_real,
                self.b_real,
                r,
                num_protected,
                self.num_tokens,
            )
        else:
            merge = bipartite_merge(self.scores, self.match, self.a_idx, self.b_idx, r, num_protected)
        return Decision(merge, threshold, self.macs, requested)


def match_tokens(
    ctx: BlockContext, *, size_distinctive: bool = False, similarity: str = "raw", per_image: bool = False
) -> Matching:
    """Alternate (A = even, B = odd positions) or size-distinctive split, then cosine matching
    of the keys' head-mean ('raw') or of keys centred on the image's mean patch key.
    per_image: the batch may be padded (every image merges its own count; see
    :mod:`atmerge.core.padding`): padding takes no part, and ``decision`` takes r per image."""
    p, num_tokens = ctx.num_protected, ctx.metric.shape[1]
    metric = center_keys(ctx.metric, ctx.size, p) if similarity == "centered" else ctx.metric
    if per_image:
        split = padded_size_distinctive_split if size_distinctive else padded_alternate_split
        a_idx, b_idx, a_real, b_real = split(ctx.size, p)
        scores, match = padded_best_match(metric, a_idx, b_idx, a_real, b_real)
        macs = a_idx.shape[-1] * b_idx.shape[-1] * metric.shape[-1]
        return Matching(a_idx, b_idx, scores, match, float(macs), a_real, b_real, num_tokens)
    if size_distinctive:
        a_idx, b_idx = size_distinctive_split(ctx.size, p)
    else:
        a_idx, b_idx = alternate_split(num_tokens, p, ctx.metric.device)
    scores, match = best_match(metric, a_idx, b_idx)
    macs = a_idx.shape[-1] * b_idx.shape[-1] * metric.shape[-1]
    return Matching(a_idx, b_idx, scores, match, float(macs))
