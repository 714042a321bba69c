"""Threshold merging with one θ for every block (the ATM paper's Figures 5 and 6)."""

from __future__ import annotations

from dataclasses import dataclass

from atmerge.core.schedules import batch_adaptive_r
from atmerge.methods.base import BlockContext, Decision, Method, check_number
from atmerge.methods.bipartite import match_tokens


@dataclass(frozen=True)
class ConstantThreshold(Method):
    """Merge the alternate-matching pairs whose cosine is above ``theta`` in every block, r =
    batch mean of the per-image counts (rounded half up), as ATM but without Eq. (1)'s decay
    and without size-distinctive matching.  theta in [0, 1]."""

    theta: float = 0.9

    def __post_init__(self) -> None:
        check_number("theta", self.theta, 0.0, 1.0)

    def decide(self, ctx: BlockContext) -> Decision:
        m = match_tokens(ctx)
        return m.decision(batch_adaptive_r(m.scores, self.theta), ctx.num_protected, self.theta)
