"""Shared step of the bipartite-matching methods: split a block's tokens, score every A token
against set B, and turn a merge count into a Decision."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from atmerge.core.matching import alternate_split, best_match, center_keys, size_distinctive_split
from atmerge.core.merging import bipartite_merge
from atmerge.methods.base import BlockContext, Decision


@dataclass(frozen=True)
class Matching:
    """Sets A and B of a block and each A token's best B partner: scores, match [B, Na]."""

    a_idx: torch.Tensor
    b_idx: torch.Tensor
    scores: torch.Tensor
    match: torch.Tensor
    macs: float

    def decision(
        self, r: int, num_protected: int, threshold: float = math.nan, requested: int | None = None
    ) -> Decision:
        merge = bipartite_merge(self.scores, self.match, self.a_idx, self.b_idx, r, num_protected)
        return Decision(merge, threshold, self.macs, requested)


def match_tokens(ctx: BlockContext, *, size_distinctive: bool = False, similarity: str = "raw") -> Matching:
    """Alternate (A = even, B = odd positions) or size-distinctive split, then cosine matching
    of the keys' head-mean ('raw') or of keys centred on the image's mean patch key."""
    p, num_tokens = ctx.num_protected, ctx.metric.shape[1]
    if size_distinctive:
        a_idx, b_idx = size_distinctive_split(ctx.size, p)
    else:
        a_idx, b_idx = alternate_split(num_tokens, p, ctx.metric.device)
    metric = center_keys(ctx.metric, ctx.size, p) if similarity == "centered" else ctx.metric
    scores, match = best_match(metric, a_idx, b_idx)
    macs = a_idx.shape[-1] * b_idx.shape[-1] * metric.shape[-1]
    return Matching(a_idx, b_idx, scores, match, float(macs))
