"""Adaptive Token Merging (Lee & Choi, "Lossless Token Merging Even Without Fine-Tuning in Vision
Transformers", arXiv 2505.15160): Algorithm 1 with Eq. (1), Sections 3.2–3.4."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from atmerge.core.matching import SIMILARITIES
from atmerge.core.schedules import batch_adaptive_r, count_above, layer_threshold, threshold_schedule
from atmerge.methods.base import BlockContext, Decision, Method, check_number, register_method
from atmerge.methods.bipartite import match_tokens
from atmerge.methods.space import SearchRange, choice, floats, ints

if TYPE_CHECKING:
    from atmerge.score_profile import ScoreProfile


@register_method("atm")
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
        count, in one batched pass padded to the batch's longest image
        (:mod:`atmerge.core.padding`; equal to running the images one at a time).
    """

    alpha: float = 0.99
    beta: float = 0.04
    theta_min: float = 0.88
    split_layer: int | None = None
    similarity: str = "raw"
    batch_adaptive: bool = True
    display_name = "ATM"
    adaptive = True

    @classmethod
    def one_knob(cls, t: float, depth: int, num_patches: int, **fixed) -> "ATM":
        """θ_min = 0.5 + 0.5 t, with α = 1 and β = 0.04 unless given."""
        return cls(**{"alpha": 1.0, "beta": 0.04, **fixed, "theta_min": 0.5 + 0.5 * t})

    @classmethod
    def search_space(
        cls, depth: int, num_patches: int, profile: "ScoreProfile | None" = None
    ) -> dict[str, SearchRange]:
        """Without ``profile``: the paper's sweep (Appendix A: α ∈ [0.945, 1], β ∈ [0.015, 0.05],
        θ_min ∈ [0.80, 0.945] on a 0.005 grid) with θ_min extended to 1, so that light budgets
        are reachable too.

        With the model's :class:`~atmerge.score_profile.ScoreProfile`, a space that fits the model:
        the thresholds are searched as score quantile levels of the chosen similarity —
        ``alpha_level`` in [0.5, 1] of block 1's scores, ``theta_min_level`` in [0, 1] of the
        per-block median quantile curve — so that a level means the same share of set A on any
        model (:meth:`from_search` turns them into α and θ_min); β log-uniform from the decay
        that moves θ by 0.005 over the whole depth to 0.5 (e.g. β ≈ 0.002 for DINOv2-S's raw
        keys, 0.04 for DeiT; the paper's range inside); the similarities the profile measured;
        split_layer from depth/2 to depth."""
        if profile is None:
            return {
                "alpha": floats(0.945, 1.0, 0.005),
                "beta": floats(0.015, 0.05, 0.005),
                "theta_min": floats(0.80, 1.0, 0.005),
            }
        beta_low = min(math.log1p(0.005) / max(depth - 1, 1), 0.015)
        return {
            "similarity": choice(*profile.similarities),
            "alpha_level": floats(0.5, 1.0, 0.01),
            "theta_min_level": floats(0.0, 1.0, 0.01),
            "beta": floats(beta_low, 0.5, log=True),
            "split_layer": ints(depth // 2, depth),
        }

    @classmethod
    def from_search(cls, params: dict, profile: "ScoreProfile | None" = None) -> dict:
        """Quantile levels (of a fitted space) → α (block 1's scores) and θ_min (the per-block
        median curve) of the searched similarity; other values pass through."""
        if profile is None or "alpha_level" not in params:
            return params
        settings = dict(params)
        similarity = settings.get("similarity", "raw")
        settings["alpha"] = round(
            min(max(profile.quantile(settings.pop("alpha_level"), similarity, block=0), 0.0), 1.0), 4
        )
        level = settings.pop("theta_min_level")
        settings["theta_min"] = round(min(max(profile.quantile(level, similarity, over_blocks="median"), 0.0), 1.0), 4)
        return settings

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
        per_image = not self.batch_adaptive
        m = match_tokens(ctx, size_distinctive=size_distinctive, similarity=self.similarity, per_image=per_image)
        theta = layer_threshold(ctx.layer, self.alpha, self.beta, self.theta_min)
        r = count_above(m.scores, theta) if per_image else batch_adaptive_r(m.scores, theta)
        return m.decision(r, ctx.num_protected, theta)
