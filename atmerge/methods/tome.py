"""ToMe: a fixed count r of bipartite merges per block (Bolya et al., ICLR 2023)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from atmerge.core.schedules import scaled_schedule, tome_r_schedule
from atmerge.methods.base import BlockContext, Decision, Method, knob_r, register_method
from atmerge.methods.bipartite import match_tokens
from atmerge.methods.space import SearchRange, choice, fixed_count_limit, ints

if TYPE_CHECKING:
    from atmerge.score_profile import ScoreProfile


@register_method("tome")
@dataclass(frozen=True)
class ToMe(Method):
    """Token Merging (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

    Bipartite soft matching in every block: A = even, B = odd token positions (CLS and the
    distillation token excluded), each A token's most similar B token by cosine of the keys'
    head-mean, the r best pairs merge by size-weighted average; proportional attention.
    r: an int, a per-block list, or (r, inflection) for ToMe's linear schedule.  r above |A|
    is clipped to |A|.  The release keeps every token to the end; atmerge's common last-block rule
    (``patch(..., prune_last_block=None)``: CLS only in the last MLP of CLS-pooled models) applies
    to it as to every method and changes no output.

    Token order as released (facebookresearch/ToMe ``tome/merge.py``): the merged tokens come out
    as [protected, unmerged A, B].  The release re-sorts the unmerged A tokens into token order
    only when the model has a class token; without one (no protected token here) they stay by
    descending best score.  The order matters because the next block's alternate split works on
    positions, so atmerge keeps it too.
    """

    r: int | list[int] | tuple[int, float] = 8
    display_name = "ToMe"

    @classmethod
    def one_knob(cls, t: float, depth: int, num_patches: int, **fixed) -> "ToMe":
        """r = r_max (1 − t) (:func:`knob_r`)."""
        return cls(r=knob_r(t, num_patches), **fixed)

    @classmethod
    def search_space(
        cls, depth: int, num_patches: int, profile: "ScoreProfile | None" = None
    ) -> dict[str, SearchRange]:
        """r and ToMe's schedule: inflection −1 (decreasing) … 0 (constant) … +1 (increasing)."""
        return {"r": ints(0, fixed_count_limit(depth, num_patches)), "inflection": choice(-1.0, -0.5, 0.0, 0.5, 1.0)}

    def with_params(self, params: dict) -> "ToMe":
        inflection = params.get("inflection", 0.0)
        return replace(self, r=params["r"] if not inflection else (params["r"], inflection))

    def dial(self, depth: int, num_patches: int):
        """A fine cost dial through this setting: t → the per-block schedule scaled by 2(1 − t)
        (t = 0.5: this schedule; t = 1: nothing merges), rounded one token at a time
        (:func:`scaled_schedule`), so a budget can be landed to within a token."""
        counts = self.schedule(depth)
        return lambda t: replace(self, r=scaled_schedule(counts, 2.0 * (1.0 - t)))

    def __post_init__(self) -> None:
        tome_r_schedule(1 if not isinstance(self.r, list) else len(self.r), self.r)  # validates

    def schedule(self, depth: int) -> list[int]:
        return tome_r_schedule(depth, self.r)

    def check_depth(self, depth: int) -> None:
        self.schedule(depth)

    def decide(self, ctx: BlockContext) -> Decision:
        r = self.schedule(ctx.depth)[ctx.block]
        matching = match_tokens(ctx)
        decision = matching.decision(r, ctx.num_protected, requested=r)
        merge = decision.merge
        if ctx.num_protected == 0 and merge.r > 0:  # no class token: the release's order (above)
            order = torch.sort(matching.scores, dim=-1, descending=True, stable=True).indices
            decision = replace(decision, merge=replace(merge, keep=order[:, merge.r :]))
        return decision
