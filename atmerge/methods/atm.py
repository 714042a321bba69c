"""Adaptive Token Merging (Lee & Choi, "Lossless Token Merging Even Without Fine-Tuning in Vision
Transformers", arXiv 2505.15160): Algorithm 1 with Eq. (1), Sections 3.2–3.4."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from atmerge.core.matching import SIMILARITIES
from atmerge.core.schedules import batch_adaptive_r, layer_threshold, threshold_schedule
from atmerge.methods.base import BlockContext, Decision, Method, check_number
from atmerge.methods.bipartite import match_tokens
from atmerge.methods.space import Knob, choice, floats, ints

if TYPE_CHECKING:
    from atmerge.profile import ScoreProfile


@dataclass(frozen=True)
class ATM(Method):
    """Adaptive Token Merging.

    In block l (from 1) every token of set A is paired with its most similar token of set B
    (cosine of the attention keys averaged over heads); the pairs scoring above
    θˡ = max(α − (e^{β(l−1)} − 1), θ_min) (Eq. 1) are merged, r = the batch mean of the
    per-image counts (rounded half up).  Blocks l ≤ split_layer split tokens alternately,
    later blocks by merge size (size-distinctive matching).  Defaults: DeiT-S row of Table A2
    (3.26 GFLOPs, no accuracy drop in the paper).

    alpha: initial threshold, in [0, 1].  beta: decay rate, in [0, 1].
    theta_min: lower bound of the threshold, in [0, 1].
    split_layer: l_s, the last block with alternate matching; None = round(0.75 × depth);
        0 = size-distinctive everywhere; depth = alternate everywhere.
    similarity: 'raw' keys (the paper) or 'centered' keys (each image's mean patch key removed).
    batch_adaptive: True = one r per batch (Section 3.4); False = every image merges its own
        count (the patched model then runs the images of a batch one at a time; ablation).
    """

    alpha: float = 0.99
    beta: float = 0.04
    theta_min: float = 0.88
    split_layer: int | None = None
    similarity: str = "raw"
    batch_adaptive: bool = True
    display_name = "ATM"

    @classmethod
    def search_space(cls, depth: int, num_patches: int, profile: "ScoreProfile | None" = None) -> dict[str, Knob]:
        """Without ``profile``: the paper's sweep (Appendix A: α ∈ [0.945, 1], β ∈ [0.015, 0.05],
        θ_min ∈ [0.80, 0.945] on a 0.005 grid) with θ_min extended to 1, so that light budgets
        are reachable too.

        With the model's :class:`~atmerge.profile.ScoreProfile`, ranges that fit the model:
        α and θ_min from the lowest 5% score quantile of any block (where ~95% of set A would
        merge) up to 1 (nothing merges), on a 0.001 grid; β log-uniform from the decay that
        moves θ by 0.005 over the whole depth to the one that spans the score range within one
        block — e.g. β ≈ 0.002 for DINOv2-S's raw keys, 0.04 for DeiT; the paper's ranges are
        always inside.  Also searched: the similarities the profile measured and split_layer
        from depth/2 to depth."""
        if profile is None:
            return {"alpha": floats(0.945, 1.0, 0.005), "beta": floats(0.015, 0.05, 0.005),
                    "theta_min": floats(0.80, 1.0, 0.005)}
        low = min(round(profile.quantile(0.05), 3), 0.80)
        beta_low = min(math.log1p(0.005) / max(depth - 1, 1), 0.015)
        beta_high = max(math.log1p(1.0 - low), 0.05)
        return {"alpha": floats(low, 1.0, 0.001), "beta": floats(beta_low, beta_high, log=True),
                "theta_min": floats(low, 1.0, 0.001), "similarity": choice(*profile.similarities),
                "split_layer": ints(depth // 2, depth)}

    def __post_init__(self) -> None:
        check_number("alpha", self.alpha, 0.0, 1.0)
        check_number("beta", self.beta, 0.0, 1.0)
        check_number("theta_min", self.theta_min, 0.0, 1.0)
        if self.split_layer is not None and (
            isinstance(self.split_layer, bool) or not isinstance(self.split_layer, int) or self.split_layer < 0
        ):
            raise ValueError(f"split_layer must be None or an integer >= 0, got {self.split_layer!r}")
        if not isinstance(self.batch_adaptive, bool):
            raise ValueError(f"batch_adaptive must be True or False, got {self.batch_adaptive!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity={self.similarity!r} is not supported; choose one of {SIMILARITIES}")

    def resolved_split_layer(self, depth: int) -> int:
        """l_s for a model of ``depth`` blocks."""
        return round(0.75 * depth) if self.split_layer is None else self.split_layer

    def thresholds(self, depth: int) -> list[float]:
        """θˡ of every block, index 0 = block 1."""
        return threshold_schedule(depth, self.alpha, self.beta, self.theta_min)

    def check_depth(self, depth: int) -> None:
        if self.split_layer is not None and self.split_layer > depth:
            raise ValueError(f"split_layer={self.split_layer} is beyond the model's depth; allowed 0..{depth}")

    def decide(self, ctx: BlockContext) -> Decision:
        size_distinctive = ctx.layer > self.resolved_split_layer(ctx.depth)
        m = match_tokens(ctx, size_distinctive=size_distinctive, similarity=self.similarity)
        theta = layer_threshold(ctx.layer, self.alpha, self.beta, self.theta_min)
        return m.decision(batch_adaptive_r(m.scores, theta), ctx.num_protected, theta)
