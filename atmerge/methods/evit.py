"""EViT (Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via
Token Reorganizations", ICLR 2022), training-free."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from atmerge.core.importance import cls_attention
from atmerge.core.merging import Assignment
from atmerge.methods.base import BlockContext, Decision, Method, check_block_numbers, check_number, register_method
from atmerge.methods.space import SearchRange, floats, ints

if TYPE_CHECKING:
    from atmerge.score_profile import ScoreProfile


def attentive_fusion(score: torch.Tensor, keep: int, num_protected: int) -> Assignment:
    """Keep the ``keep`` unprotected tokens with the highest score (in token order) and fuse the
    rest into one token, Σ score_i · x_i over the inattentive tokens (EViT's fusion: a weighted
    sum, not divided by the weights; kept and protected tokens are unchanged).

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
    weight.scatter_(1, top, torch.ones_like(top, dtype=weight.dtype))
    return Assignment(assign, p + keep + 1, weight, weighted_sum=True)


@register_method("evit")
@dataclass(frozen=True)
class EViT(Method):
    """EViT without training, as released (youweiliang/evit, ``evit.py``): after attention in the
    blocks of ``locations`` (counted from 1), keep the ⌈keep_rate × n⌉ tokens (n = tokens after
    the protected ones, an earlier fused token included) that the CLS token attends to most
    (mean over heads) and fuse the others into one token, their sum weighted by that attention.

    keep_rate in (0, 1]; locations: blocks counted from 1.  Defaults are the release's for DeiT
    (``--base_keep_rate 0.7``, ``drop_loc`` (3, 6, 9) counted from 0).  No proportional attention
    (the release has no size bias; ``patch(..., prop_attn=True)`` turns it on).  Kept tokens stay
    in token order where the release orders them by attention: the same outputs, as attention
    and the MLP do not depend on token order.  Requires a CLS token.
    """

    keep_rate: float = 0.7
    locations: tuple[int, ...] = (4, 7, 10)
    attention = "current"
    proportional_attention = False
    needs_cls_token = True
    display_name = "EViT"
    prunes = True

    @classmethod
    def one_knob(cls, t: float, depth: int, num_patches: int, **fixed) -> "EViT":
        """keep rate t (at least 0.02) at blocks ≈ (4, 7, 10) × depth / 12."""
        locations = tuple(sorted({max(1, round(l * depth / 12)) for l in (4, 7, 10)}))
        return cls(**{"locations": locations, **fixed, "keep_rate": max(t, 0.02)})

    @classmethod
    def search_space(
        cls, depth: int, num_patches: int, profile: "ScoreProfile | None" = None
    ) -> dict[str, SearchRange]:
        """keep_rate, and three locations (first, first + every, first + 2·every) — the release's
        are 4, 7, 10 — within the depth."""
        return {
            "keep_rate": floats(0.3, 1.0, 0.05),
            "first": ints(2, max(2, depth // 2)),
            "every": ints(1, max(1, depth // 4)),
        }

    def with_params(self, params: dict) -> "EViT":
        params = dict(params)
        first, every = params.pop("first", None), params.pop("every", None)
        if first is not None:
            params["locations"] = tuple(first + i * (every or 1) for i in range(3))
        return replace(self, **params)

    def __post_init__(self) -> None:
        check_number("keep_rate", self.keep_rate, 0.0, 1.0, low_open=True)
        object.__setattr__(self, "locations", check_block_numbers("locations", self.locations))

    def check_depth(self, depth: int) -> None:
        if max(self.locations) > depth:
            raise ValueError(f"locations {self.locations} go beyond the model's depth; allowed 1..{depth}")

    def decide(self, ctx: BlockContext) -> Decision:
        n = ctx.metric.shape[1] - ctx.num_protected
        if ctx.layer not in self.locations:
            keep = n
        else:
            keep = math.ceil(self.keep_rate * n)
        return Decision(attentive_fusion(cls_attention(ctx.attention), keep, ctx.num_protected))
