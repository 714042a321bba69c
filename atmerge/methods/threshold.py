"""Threshold merging with one θ for every block (the ATM paper's Figures 5 and 6)."""

from __future__ import annotations

from dataclasses import dataclass

from atmerge.core.merging import Assignment
from atmerge.core.schedules import batch_adaptive_r
from atmerge.methods.base import BlockContext, Decision, Method, check_number
from atmerge.methods.bipartite import match_tokens
from atmerge.methods.space import Knob, floats


@dataclass(frozen=True)
class ConstantThreshold(Method):
    """Merge the alternate-matching pairs whose cosine is above ``theta`` in every block, r =
    batch mean of the per-image counts (rounded half up), as ATM but without Eq. (1)'s decay
    and without size-distinctive matching.  theta in [0, 1].  blocks: merge only in these
    blocks (counted from 1; None = all), as in the paper's layer-wise information-loss study."""

    theta: float = 0.9
    blocks: tuple[int, ...] | None = None
    display_name = "constant θ"

    @classmethod
    def search_space(cls, depth: int, num_patches: int) -> dict[str, Knob]:
        return {"theta": floats(0.5, 1.0, 0.005)}

    def __post_init__(self) -> None:
        check_number("theta", self.theta, 0.0, 1.0)
        if self.blocks is not None:
            blocks = tuple(self.blocks)
            if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks):
                raise ValueError(f"blocks must be block numbers counted from 1, got {self.blocks!r}")
            object.__setattr__(self, "blocks", blocks)

    def check_depth(self, depth: int) -> None:
        if self.blocks and max(self.blocks) > depth:
            raise ValueError(f"blocks {self.blocks} go beyond the model's depth; allowed 1..{depth}")

    def decide(self, ctx: BlockContext) -> Decision:
        if self.blocks is not None and ctx.layer not in self.blocks:
            return Decision(Assignment.identity(ctx.metric.shape[0], ctx.metric.shape[1], ctx.metric.device))
        m = match_tokens(ctx)
        return m.decision(batch_adaptive_r(m.scores, self.theta), ctx.num_protected, self.theta)
