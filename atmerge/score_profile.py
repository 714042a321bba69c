"""The model's own similarity scores: per block, the distribution of each set-A token's best
cosine to set B, measured on images with nothing merged.

Threshold methods compare these scores with θ, so their useful θ range is a property of the
model, not a constant: the CIFAR-10 reference ViT's raw-key scores spread over [0.3, 1], DINOv2-S's
sit above 0.9 in most blocks.  :func:`score_profile` measures them once on calibration images;
``Method.search_space(..., profile=...)`` derives its ranges from them (see ``ATM.search_space``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from atmerge.core.matching import SIMILARITIES
from atmerge.core.merging import Assignment
from atmerge.methods.base import BlockContext, Decision, Method
from atmerge.methods.bipartite import match_tokens

LEVELS = tuple(i / 20 for i in range(21))  # quantile levels 0, 0.05, ..., 1 kept per block


@dataclass(frozen=True)
class ScoreProfile:
    """quantiles[similarity]: [depth, len(levels)] quantiles of the best-partner cosine of the
    set-A tokens (alternate split, nothing merged) in every block, pooled over ``images``."""

    levels: tuple[float, ...]
    quantiles: dict[str, torch.Tensor]
    images: int

    @property
    def depth(self) -> int:
        return next(iter(self.quantiles.values())).shape[0]

    @property
    def similarities(self) -> tuple[str, ...]:
        return tuple(self.quantiles)

    def quantile(
        self, level: float, similarity: str | None = None, block: int | None = None, over_blocks: str = "min"
    ) -> float:
        """The score below which a share ``level`` of the A tokens lie, in block ``block``
        (counted from 0), or over the blocks (None: their ``over_blocks`` — 'min' or 'median' —
        at that level), for ``similarity`` (None: the lowest over the measured similarities).
        Interpolated between the kept levels."""
        sims = self.similarities if similarity is None else (similarity,)
        values = []
        for s in sims:
            q = self.quantiles[s] if block is None else self.quantiles[s][block : block + 1]
            grid = torch.tensor(self.levels, dtype=q.dtype)
            i = int(torch.searchsorted(grid, torch.tensor(level, dtype=q.dtype)).clamp(1, len(self.levels) - 1))
            w = (level - self.levels[i - 1]) / (self.levels[i] - self.levels[i - 1])
            per_block = q[:, i - 1] * (1 - w) + q[:, i] * w
            values.append(float(per_block.median() if over_blocks == "median" else per_block.min()))
        return min(values)

    def as_dict(self) -> dict:
        return {
            "levels": list(self.levels),
            "images": self.images,
            "quantiles": {s: [[round(v, 5) for v in row] for row in q.tolist()] for s, q in self.quantiles.items()},
        }


class _ScoreRecorder(Method):
    """Merges nothing; keeps the best-partner scores of every block for each similarity."""

    proportional_attention = False

    def __init__(self, similarities: tuple[str, ...]) -> None:
        self.similarities = similarities
        self.scores: dict[str, dict[int, list[torch.Tensor]]] = {s: {} for s in similarities}

    def decide(self, ctx: BlockContext) -> Decision:
        for s in self.similarities:
            scores = match_tokens(ctx, similarity=s).scores
            self.scores[s].setdefault(ctx.block, []).append(scores.detach().float().reshape(-1).cpu())
        return Decision(Assignment.identity(ctx.metric.shape[0], ctx.metric.shape[1], ctx.metric.device))


@torch.no_grad()
def score_profile(
    model: nn.Module, batches, *, limit: int = 512, similarities: tuple[str, ...] = SIMILARITIES
) -> ScoreProfile:
    """Measure ``model``'s per-block score distribution on the first ``limit`` images of
    ``batches`` (tensors [B, C, H, W] or (images, labels) pairs).  The model is left unpatched."""
    from atmerge.api import patch, unpatch

    unknown = [s for s in similarities if s not in SIMILARITIES]
    if unknown or not similarities:
        raise ValueError(f"similarities={similarities!r}; choose from {SIMILARITIES}")
    recorder = _ScoreRecorder(tuple(similarities))
    patch(model, recorder, prune_last_block=False)
    seen = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            x = x[: limit - seen]
            model(x)
            seen += x.shape[0]
            if seen >= limit:
                break
    finally:
        unpatch(model)
    if seen == 0:
        raise ValueError("score_profile needs at least one image")
    levels = torch.tensor(LEVELS)
    quantiles = {}
    for s, per_block in recorder.scores.items():
        rows = []
        for block in sorted(per_block):
            scores = torch.cat(per_block[block])
            scores = scores[torch.isfinite(scores)]
            rows.append(torch.quantile(scores, levels) if scores.numel() else torch.ones(len(LEVELS)))
        quantiles[s] = torch.stack(rows)
    return ScoreProfile(LEVELS, quantiles, seen)
