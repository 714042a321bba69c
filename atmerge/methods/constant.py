"""Threshold merging with one θ for every block (the ATM paper's Figures 5 and 6)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from atmerge.core.merging import Assignment
from atmerge.core.schedules import batch_adaptive_r, count_above
from atmerge.methods.base import BlockContext, Decision, Method, check_block_numbers, check_number, register_method
from atmerge.methods.bipartite import match_tokens
from atmerge.methods.space import SearchRange, floats

if TYPE_CHECKING:
    from atmerge.score_profile import ScoreProfile


@register_method("constant")
@dataclass(frozen=True)
class ConstantThreshold(Method):
    """Merge the alternate-matching pairs whose cosine is above ``theta`` in every block, r =
    batch mean of the per-image counts (rounded half up), as ATM but without Eq. (1)'s decay
    and without size-distinctive matching.  theta in [0, 1].  blocks: merge only in these
    blocks (counted from 1; None = all), as in the paper's layer-wise information-loss study.
    batch_adaptive: False = every image merges its own count (as ATM's option)."""

    theta: float = 0.9
    blocks: tuple[int, ...] | None = None
    batch_adaptive: bool = True
    display_name = "constant θ"
    adaptive = True

    @classmethod
    def one_knob(cls, t: float, depth: int, num_patches: int, **fixed) -> "ConstantThreshold":
        """θ = 0.5 + 0.5 t."""
        return cls(theta=0.5 + 0.5 * t, **fixed)

    @classmethod
    def search_space(
        cls, depth: int, num_patches: int, profile: "ScoreProfile | None" = None
    ) -> dict[str, SearchRange]:
        """θ on a 0.005 grid from 0.5 — or, with the model's score profile, from the lowest 5%
        raw-score quantile of any block — to 1."""
        low = 0.5
        if profile is not None:
            low = min(
                math.floor(200 * profile.quantile(0.05, "raw" if "raw" in profile.similarities else None)) / 200, 0.5
            )
        return {"theta": floats(low, 1.0, 0.005)}

    def __post_init__(self) -> None:
        check_number("theta", self.theta, 0.0, 1.0)
        if self.blocks is not None:
            object.__setattr__(self, "blocks", check_block_numbers("blocks", self.blocks))
        if not isinstance(self.batch_adaptive, bool):
            raise ValueError(f"batch_adaptive must be True or False, got {self.batch_adaptive!r}")

    def check_depth(self, depth: int) -> None:
        if self.blocks and max(self.blocks) > depth:
            raise ValueError(f"blocks {self.blocks} go beyond the model's depth; allowed 1..{depth}")

    def decide(self, ctx: BlockContext) -> Decision:
        if self.blocks is not None and ctx.layer not in self.blocks:
            return Decision(Assignment.identity(ctx.metric.shape[0], ctx.metric.shape[1], ctx.metric.device))
        per_image = not self.batch_adaptive
        m = match_tokens(ctx, per_image=per_image)
        r = count_above(m.scores, self.theta) if per_image else batch_adaptive_r(m.scores, self.theta)
        return m.decision(r, ctx.num_protected, self.theta)
