"""Top-r: the fixed-count schedules of the ATM paper's Figure 5 (constant, increasing or
decreasing r), an ablation of ATM's threshold schedule."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from atmerge.core.schedules import linear_r_schedule, scaled_schedule, tome_r_schedule
from atmerge.methods.base import BlockContext, Decision, Method, knob_r, register_method
from atmerge.methods.bipartite import match_tokens
from atmerge.methods.space import SearchRange, choice, fixed_count_limit, ints

if TYPE_CHECKING:
    from atmerge.score_profile import ScoreProfile


@register_method("topr")
@dataclass(frozen=True)
class TopR(Method):
    """Fixed-count schedules of the ATM paper (Figure 5): 'constant', 'increasing' or
    'decreasing' r (by one per block, starting from ``r``), alternate matching, as an ablation of
    ATM's threshold schedule (so, like ATM, only CLS reaches the last MLP).

    r: the first block's count, or a list of per-block counts (padded with zeros; what the cost
    dial gives, :meth:`dial`), which ``schedule`` then no longer shapes."""

    schedule: str = "constant"
    r: int | list[int] = 8
    display_name = "top-r"

    @classmethod
    def one_knob(cls, t: float, depth: int, num_patches: int, **fixed) -> "TopR":
        """An increasing schedule from r_max (1 − t) / 2."""
        return cls(**{"schedule": "increasing", **fixed, "r": knob_r(t, num_patches, share=0.5)})

    @classmethod
    def search_space(
        cls, depth: int, num_patches: int, profile: "ScoreProfile | None" = None
    ) -> dict[str, SearchRange]:
        return {
            "schedule": choice("constant", "increasing", "decreasing"),
            "r": ints(0, fixed_count_limit(depth, num_patches)),
        }

    def dial(self, depth: int, num_patches: int):
        """A fine cost dial through this setting, as ToMe's: t → the per-block counts scaled by
        2(1 − t) (t = 0.5: these counts; t = 1: nothing merges), rounded one token at a time
        (:func:`scaled_schedule`), so a budget can be landed to within a token."""
        counts = self.counts(depth)
        return lambda t: replace(self, r=scaled_schedule(counts, 2.0 * (1.0 - t)))

    def __post_init__(self) -> None:
        if isinstance(self.r, list):
            tome_r_schedule(len(self.r), self.r)  # validates the counts
            linear_r_schedule(1, 0, self.schedule)  # and the schedule's name
        else:
            linear_r_schedule(1, self.r, self.schedule)  # validates

    def counts(self, depth: int) -> list[int]:
        if isinstance(self.r, list):
            return tome_r_schedule(depth, self.r)
        return linear_r_schedule(depth, self.r, self.schedule)

    def check_depth(self, depth: int) -> None:
        self.counts(depth)

    def decide(self, ctx: BlockContext) -> Decision:
        r = self.counts(ctx.depth)[ctx.block]
        return match_tokens(ctx).decision(r, ctx.num_protected, requested=r)
