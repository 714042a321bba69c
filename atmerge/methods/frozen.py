"""A frozen setting: an adaptive method's matching rules with a fixed merge count per block, so
that every token count is known before the forward (one static graph; compile and export).
Made by :func:`atmerge.freeze` from the counts an adaptive method merged on calibration images."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from atmerge.core.matching import SIMILARITIES
from atmerge.core.merging import Assignment
from atmerge.methods.base import METHODS, BlockContext, Decision, Method, register_method
from atmerge.methods.bipartite import match_tokens
from atmerge.methods.space import SearchRange, floats

if TYPE_CHECKING:
    from atmerge.score_profile import ScoreProfile


@register_method("frozen")
@dataclass(frozen=True)
class Frozen(Method):
    """Bipartite matching with a fixed count r[l] per block: the r[l] A tokens most similar to
    their best B token merge into it (size-weighted average), as ATM merges its thresholded pairs.

    counts: r of every block, from the first (missing blocks merge nothing); clipped to
        the size of set A, the clipped blocks shown by ``last_stats(model).clipped_blocks``.
    split_layer: blocks l ≤ split_layer (counted from 1) split tokens alternately (A = even,
        B = odd positions), later blocks by merge size (ATM's size-distinctive matching); None =
        alternate everywhere (ToMe's and the constant threshold's matching).
    similarity: 'raw' or 'centered' keys (ATM's option).
    frozen_from: the registry name of the method it was frozen from ('atm', 'constant', ...), for
        labels only.

    ``Frozen(counts=s)`` with split_layer None merges exactly as ``ToMe(r=list(s))``; frozen from
    ATM on one batch it merges exactly what ATM merged on that batch.
    """

    counts: tuple[int, ...] = ()
    split_layer: int | None = None
    similarity: str = "raw"
    frozen_from: str = ""
    display_name = "frozen"
    compared_by_auto = False  # made from another calibration by atmerge.freeze, not calibrated itself

    def __post_init__(self) -> None:
        try:
            counts = tuple(self.counts)
        except TypeError:
            counts = None
        if counts is None or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counts):
            raise ValueError(f"counts must be a sequence of integers >= 0 (r of every block), got {self.counts!r}")
        object.__setattr__(self, "counts", counts)
        if self.split_layer is not None and (
            isinstance(self.split_layer, bool) or not isinstance(self.split_layer, int) or self.split_layer < 0
        ):
            raise ValueError(f"split_layer must be None or an integer >= 0, got {self.split_layer!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity={self.similarity!r} is not supported; choose one of {SIMILARITIES}")
        if not isinstance(self.frozen_from, str):
            raise ValueError(f"frozen_from must be a method name (a string), got {self.frozen_from!r}")

    def label(self, varied: tuple[str, ...] = ()) -> str:
        """'ATM (frozen)' for a setting frozen from ATM."""
        source = METHODS.get(self.frozen_from)
        name = (source.display_name or source.__name__) if source is not None else "fixed schedule"
        return f"{name} (frozen)"

    @classmethod
    def search_space(
        cls, depth: int, num_patches: int, profile: "ScoreProfile | None" = None
    ) -> dict[str, SearchRange]:
        """One knob: ``scale``, every block's count multiplied by it (rounded)."""
        return {"scale": floats(0.0, 2.0, 0.05)}

    def with_params(self, params: dict) -> "Frozen":
        params = dict(params)
        scale = params.pop("scale", None)
        if scale is not None:
            params["counts"] = tuple(int(round(c * scale)) for c in self.counts)
        return replace(self, **params)

    def check_depth(self, depth: int) -> None:
        if len(self.counts) > depth:
            raise ValueError(
                f"counts has {len(self.counts)} entries for a model of {depth} blocks; allowed at most {depth}"
            )
        if self.split_layer is not None and self.split_layer > depth:
            raise ValueError(f"split_layer={self.split_layer} is beyond the model's depth; allowed 0..{depth}")

    def count(self, block: int) -> int:
        """r of ``block`` (counted from 0)."""
        return self.counts[block] if block < len(self.counts) else 0

    def decide(self, ctx: BlockContext) -> Decision:
        r = self.count(ctx.block)
        if r == 0:  # nothing to match for
            return Decision(
                Assignment.identity(ctx.metric.shape[0], ctx.metric.shape[1], ctx.metric.device), requested=0
            )
        size_distinctive = self.split_layer is not None and ctx.layer > self.split_layer
        m = match_tokens(ctx, size_distinctive=size_distinctive, similarity=self.similarity)
        return m.decision(r, ctx.num_protected, requested=r)
