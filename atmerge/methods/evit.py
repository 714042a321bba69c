"""EViT (Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via
Token Reorganizations", ICLR 2022), training-free."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from atmerge.core.importance import cls_attention
from atmerge.core.merging import Assignment
from atmerge.methods.base import BlockContext, Decision, Method, check_number


def attentive_fusion(score: torch.Tensor, keep: int, num_protected: int) -> Assignment:
    """Keep the ``keep`` unprotected tokens with the highest score (in token order) and fuse the
    rest into one token, averaged with the scores as weights (EViT's inattentive-token fusion).

    score [B, N] (CLS attention).  Output: [protected, kept, fused].
    """
    batch, n = score.shape
    p = num_protected
    if keep >= n - p:
        return Assignment.identity(batch, n, score.device)
    top = score[:, p:].topk(keep, dim=1).indices.sort(dim=1).values + p
    assign = torch.full((batch, n), p + keep, dtype=torch.long, device=score.device)  # fused slot
    assign[:, :p] = torch.arange(p, device=score.device)
    assign.scatter_(1, top, torch.arange(p, p + keep, device=score.device).expand(batch, -1))
    weight = score.clone()
    weight[:, :p] = 1.0
    return Assignment(assign, p + keep + 1, weight)


@dataclass(frozen=True)
class EViT(Method):
    """EViT without training: after attention in the blocks of ``locations`` (counted from 1),
    keep the ⌈keep_rate × n⌉ patch tokens that the CLS token attends to most (mean over heads)
    and fuse the other ones into a single token, weighted by that attention (Eq. 3 of the paper).

    keep_rate in (0, 1]; locations: blocks counted from 1 (DeiT default: 4, 7, 10).  EViT keeps
    every remaining token to the end.  Requires a CLS token.
    """

    keep_rate: float = 0.7
    locations: tuple[int, ...] = (4, 7, 10)
    prune_last_block = False
    attention = "current"

    def __post_init__(self) -> None:
        check_number("keep_rate", self.keep_rate, 0.0, 1.0, low_open=True)
        locations = tuple(self.locations)
        if not locations or any(isinstance(l, bool) or not isinstance(l, int) or l < 1 for l in locations):
            raise ValueError(f"locations must be block numbers counted from 1, got {self.locations!r}")
        object.__setattr__(self, "locations", locations)

    def check_depth(self, depth: int) -> None:
        if max(self.locations) > depth:
            raise ValueError(f"locations {self.locations} go beyond the model's depth; allowed 1..{depth}")

    def decide(self, ctx: BlockContext) -> Decision:
        n = ctx.metric.shape[1] - ctx.num_protected
        if ctx.layer not in self.locations or ctx.num_protected == 0:
            keep = n
        else:
            keep = math.ceil(self.keep_rate * n)
        return Decision(attentive_fusion(cls_attention(ctx.attention), keep, ctx.num_protected))
