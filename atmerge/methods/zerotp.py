"""Zero-TPrune (Wang, Dedhia & Jha, "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of
the Attention Graph in Pre-Trained Transformers", CVPR 2024), training-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from atmerge.core.importance import weighted_pagerank
from atmerge.core.matching import best_match
from atmerge.core.merging import Assignment
from atmerge.core.schedules import tome_r_schedule
from atmerge.methods.base import BlockContext, Decision, Method, check_number, knob_r, register_method
from atmerge.methods.space import SearchRange, fixed_count_limit, floats, ints

if TYPE_CHECKING:
    from atmerge.score_profile import ScoreProfile


def importance_then_similarity_pruning(
    importance: torch.Tensor, metric: torch.Tensor, r_importance: int, r_similarity: int, num_protected: int
) -> Assignment:
    """Prune ``r_importance`` least important tokens (I-stage), then split the rest by importance
    rank (alternately: ranks 0, 2, 4… are the anchors, ranks 1, 3, 5… the candidates) and prune the
    ``r_similarity`` candidates most similar to an anchor (S-stage).  Kept tokens stay in order.

    importance [B, N], metric [B, N, C].
    """
    batch, n = importance.shape
    p = num_protected
    device = importance.device
    free = n - p
    r_importance = min(r_importance, free)
    ranked = torch.sort(importance[:, p:], dim=1, descending=True, stable=True).indices + p
    survivors = ranked[:, : free - r_importance]
    anchors, candidates = survivors[:, 0::2], survivors[:, 1::2]
    scores, _ = best_match(metric, candidates, anchors)
    r_similarity = min(r_similarity, candidates.shape[1] if anchors.shape[1] else 0)
    pruned_candidates = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :r_similarity]
    pruned = candidates.gather(1, pruned_candidates)
    keep_mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    keep_mask[:, :p] = True
    keep_mask.scatter_(1, survivors, torch.ones_like(survivors, dtype=torch.bool))
    keep_mask.scatter_(1, pruned, torch.zeros_like(pruned, dtype=torch.bool))
    slots = keep_mask.long().cumsum(dim=1) - 1
    num_out = n - r_importance - r_similarity  # the same in every image (also in an empty batch)
    return Assignment(torch.where(keep_mask, slots, torch.full_like(slots, -1)), num_out)


@register_method("zerotp")
@dataclass(frozen=True)
class ZeroTP(Method):
    """Zero-TP (simplified): Zero-TPrune's two stages, training-free token pruning in every block.

    Importance: Weighted PageRank on the block's attention graph (mean over heads, ``iterations``
    power steps from the uniform distribution).  I-stage: prune the ⌊importance_share × r⌋ least
    important tokens; S-stage: among the rest, alternate by importance rank into anchors and
    candidates and prune the candidates most similar (key cosine) to an anchor, r in all.

    Simplified from the paper: no Emphasizing-Informative-Region step and no variance-based head
    filter (all heads are averaged), a uniform PageRank start, and the I- and S-stages run in the
    same blocks; pruned tokens are dropped (no fusion), so proportional attention has nothing to
    do.  The paper publishes no code and its text is not available to this project, so these
    steps cannot be followed exactly here; results name it "Zero-TP (simplified)"
    (``display_name``).
    r: tokens pruned per block (int, list or (r, inflection)); importance_share in [0, 1].
    """

    r: int | list[int] | tuple[int, float] = 8
    importance_share: float = 0.5
    iterations: int = 30
    attention = "current"
    display_name = "Zero-TP (simplified)"
    prunes = True

    @classmethod
    def one_knob(cls, t: float, depth: int, num_patches: int, **fixed) -> "ZeroTP":
        """r = r_max (1 − t) (:func:`knob_r`)."""
        return cls(r=knob_r(t, num_patches), **fixed)

    @classmethod
    def search_space(
        cls, depth: int, num_patches: int, profile: "ScoreProfile | None" = None
    ) -> dict[str, SearchRange]:
        return {"r": ints(0, fixed_count_limit(depth, num_patches)), "importance_share": floats(0.0, 1.0, 0.1)}

    def __post_init__(self) -> None:
        tome_r_schedule(1 if not isinstance(self.r, list) else len(self.r), self.r)
        check_number("importance_share", self.importance_share, 0.0, 1.0)
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {self.iterations!r}")

    def check_depth(self, depth: int) -> None:
        tome_r_schedule(depth, self.r)

    def decide(self, ctx: BlockContext) -> Decision:
        r = tome_r_schedule(ctx.depth, self.r)[ctx.block]
        n = ctx.metric.shape[1]
        if r == 0:
            return Decision(Assignment.identity(ctx.metric.shape[0], n, ctx.metric.device), requested=0)
        r_importance = int(self.importance_share * r)
        importance = weighted_pagerank(ctx.attention, self.iterations)
        reduction = importance_then_similarity_pruning(
            importance, ctx.metric, r_importance, r - r_importance, ctx.num_protected
        )
        survivors = n - ctx.num_protected - min(r_importance, n - ctx.num_protected)
        # PageRank: iterations × [N, N] @ [N, 1]; S-stage: candidates × anchors cosines
        macs = self.iterations * n * n + (survivors // 2) * (survivors - survivors // 2) * ctx.metric.shape[-1]
        return Decision(reduction, matching_macs=float(macs), requested=r)
