"""MCTF (Lee, Choi & Kim, "Multi-criteria Token Fusion with One-step-ahead Attention for Efficient
Vision Transformers", CVPR 2024), training-free."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from atmerge.core.importance import attention_received
from atmerge.core.matching import alternate_split, take_tokens
from atmerge.core.merging import Assignment
from atmerge.core.schedules import scaled_schedule, tome_r_schedule
from atmerge.methods.base import (
    BlockContext,
    Decision,
    Method,
    check_block_numbers,
    check_number,
    knob_r,
    register_method,
)
from atmerge.methods.space import SearchRange, fixed_count_limit, floats, ints

if TYPE_CHECKING:
    from atmerge.score_profile import ScoreProfile


def multi_criteria_weights(
    tokens: torch.Tensor,
    informativeness: torch.Tensor,
    size: torch.Tensor,
    a_idx: torch.Tensor,
    b_idx: torch.Tensor,
    tau_sim: float,
    tau_info: float,
    tau_size: float,
) -> torch.Tensor:
    """W = W_sim^{1/τ_sim} · W_info^{1/τ_info} · W_size^{1/τ_size} between sets A and B: [B, Na, Nb].

    W_sim = (cos + 1)/2 of the tokens; W_info = ĩ_a ĩ_b with ĩ = (1/informativeness)/max (tokens
    that receive little attention are preferred for fusion); W_size = s̃_a s̃_b with
    s̃ = (1/size)/max (small tokens preferred).  A τ of 0 switches its criterion off.
    """
    x = F.normalize(tokens, dim=-1)
    w = (take_tokens(x, a_idx) @ take_tokens(x, b_idx).transpose(1, 2) + 1) / 2
    w = w ** (1 / tau_sim) if tau_sim else torch.ones_like(w)
    for value, tau in ((informativeness, tau_info), (size.to(w.dtype), tau_size)):
        if tau:
            inv = 1.0 / value.clamp_min(1e-12)
            inv = inv / inv.amax(dim=1, keepdim=True)
            ia = take_tokens(inv.unsqueeze(-1), a_idx)
            ib = take_tokens(inv.unsqueeze(-1), b_idx)
            w = w * (ia * ib.transpose(1, 2)) ** (1 / tau)
    return w


def bidirectional_assignment(
    weights: torch.Tensor, a_idx, b_idx, r: int, num_protected: int, num_tokens: int
) -> Assignment:
    """MCTF's bidirectional bipartite matching: ⌊r/2⌋ A tokens fuse into their best B tokens,
    then the remaining ⌈r/2⌉ B tokens (with what they received) fuse into their best unmerged A
    tokens.  weights [B, Na, Nb].

    Output layout, as the release (``utils/mctf.py``) leaves it: [protected, unmerged A in token
    order, unmerged B by descending best score of the B→A step].  The release re-sorts the A side
    but not the B side; the order matters because the next block's alternate split works on
    positions.  Ties keep token order (stable sort)."""
    batch, num_a, num_b = weights.shape
    device = weights.device
    r = min(r, num_a, num_b)
    if r == 0:
        return Assignment.identity(batch, num_tokens, device)
    r1, r2 = r // 2, r - r // 2
    a_idx = a_idx.expand(batch, -1) if a_idx.dim() == 1 else a_idx
    b_idx = b_idx.expand(batch, -1) if b_idx.dim() == 1 else b_idx
    best, best_b = weights.max(dim=-1)
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    src1, keep_a = order[:, :r1], order[:, r1:].sort(dim=-1).values  # positions within A
    # B tokens choose among the unmerged A tokens.
    w2 = weights.gather(1, keep_a.unsqueeze(-1).expand(-1, -1, num_b)).transpose(1, 2)  # [B, Nb, Na-r1]
    best2, best_a2 = w2.max(dim=-1)
    order2 = torch.sort(best2, dim=-1, descending=True, stable=True).indices
    src2, keep_b = order2[:, :r2], order2[:, r2:]  # positions within B; keep_b by descending score
    # Slots: protected, unmerged A (token order), unmerged B (descending score, as released).
    slot_a = torch.full((batch, num_a), -1, dtype=torch.long, device=device)
    slot_a.scatter_(
        1, keep_a, torch.arange(num_protected, num_protected + keep_a.shape[1], device=device).expand(batch, -1)
    )
    start_b = num_protected + keep_a.shape[1]
    slot_b = torch.full((batch, num_b), -1, dtype=torch.long, device=device)
    slot_b.scatter_(1, keep_b, torch.arange(start_b, start_b + keep_b.shape[1], device=device).expand(batch, -1))
    # Merged B tokens go to the slot of their unmerged A partner; merged A tokens follow their B.
    slot_b.scatter_(1, src2, slot_a.gather(1, keep_a.gather(1, best_a2.gather(1, src2))))
    slot_a.scatter_(1, src1, slot_b.gather(1, best_b.gather(1, src1)))
    assign = torch.empty((batch, num_tokens), dtype=torch.long, device=device)
    assign[:, :num_protected] = torch.arange(num_protected, device=device)
    assign.scatter_(1, a_idx, slot_a)
    assign.scatter_(1, b_idx, slot_b)
    return Assignment(assign, num_tokens - r)


MIN_TOKENS = 10  # the release never reduces a block's input below 10 tokens (utils/mctf.py)


@register_method("mctf")
@dataclass(frozen=True)
class MCTF(Method):
    """Multi-criteria token fusion, training-free, as released (mlvlab/MCTF: ``models/modules/
    blocks.py`` ``Block_DEIT``, ``utils/mctf.py``; one-step-ahead attention, ``one_step_ahead=1``).

    At the start of every block of ``blocks`` the block's attention map is computed once on the
    tokens entering it (q, k only; +log size with proportional attention).  From it, MCTF scores
    pairs of the alternate split (A = even, B = odd positions after CLS) by the product of three
    criteria (:func:`multi_criteria_weights`: cosine of the tokens themselves — the residual
    stream, not keys —, informativeness = inverse attention received, inverse size), matches
    bidirectionally (:func:`bidirectional_assignment`: ⌊r/2⌋ A→B, then ⌈r/2⌉ B→A) and fuses each
    group weighted by attention received × size.  The attention map is carried over the merge
    (key columns summed, query rows averaged with the same weights) and reused for the block's
    attention with the values of the fused tokens — so no extra attention map is computed.

    r: tokens fused per block, an int, or a float in (0, 1) for a share of the block's unprotected
        tokens (the release's ``r < 1``, truncated), or a list of per-block counts (block l
        fuses ``r[l - 1]``, padded with zeros; what the cost dial gives, :meth:`dial`).  Clipped
        as the release does: at most half of the unprotected tokens, and never below 10 tokens
        (``MIN_TOKENS``).
    blocks: where it fuses, counted from 1; None = every block but the first (the release's
        ``--activate_layer 1 … 11`` counted from 0 on DeiT).
    Defaults (r=16, tau_sim=1, tau_info=20, tau_size=40, bidirectional matching, attentive
    fusion, proportional attention) are the release's DeiT-T/S evaluation settings
    (``run/eval_deit_{t,s}_mctf.sh``: ``--mctf_type [16,0,0,1,1,1,20,40,1,1,0]``); its "fast"
    variant is ``MCTF(r=0.35, blocks=(4, 7, 10))``.
    """

    r: int | float | list[int] = 16
    tau_sim: float = 1.0
    tau_info: float = 20.0
    tau_size: float = 40.0
    blocks: tuple[int, ...] | None = None
    attention = "current"
    stage = "before_attention"
    display_name = "MCTF"

    @classmethod
    def one_knob(cls, t: float, depth: int, num_patches: int, **fixed) -> "MCTF":
        """r = r_max (1 − t) (:func:`knob_r`)."""
        return cls(r=knob_r(t, num_patches), **fixed)

    @classmethod
    def search_space(
        cls, depth: int, num_patches: int, profile: "ScoreProfile | None" = None
    ) -> dict[str, SearchRange]:
        """r and the three temperatures, log-uniform around the release's 1, 20, 40."""
        return {
            "r": ints(0, fixed_count_limit(depth, num_patches)),
            "tau_sim": floats(0.25, 4.0, log=True),
            "tau_info": floats(1.0, 100.0, log=True),
            "tau_size": floats(1.0, 100.0, log=True),
        }

    def dial(self, depth: int, num_patches: int):
        """A fine cost dial through this setting (an int or per-block ``r``), as ToMe's: t → the
        per-block counts of the fusing blocks scaled by 2(1 − t) (t = 0.5: these counts; t = 1:
        nothing fuses), rounded one token at a time (:func:`scaled_schedule`), the temperatures
        and blocks kept.  A share ``r`` (float) moves along :meth:`one_knob`'s r instead."""
        if isinstance(self.r, float):
            return super().dial(depth, num_patches)
        counts = self.counts(depth)
        if not any(counts):  # nothing fuses: scale one token per fusing block
            counts = [int(self.fuses_in(layer)) for layer in range(1, depth + 1)]
        return lambda t: replace(self, r=scaled_schedule(counts, 2.0 * (1.0 - t)))

    def counts(self, depth: int) -> list[int]:
        """The count asked of each block (before the release's clipping), index 0 = block 1."""
        if isinstance(self.r, list):
            asked = tome_r_schedule(depth, self.r)
            return [r if self.fuses_in(layer) else 0 for layer, r in enumerate(asked, 1)]
        return [self.r if self.fuses_in(layer) else 0 for layer in range(1, depth + 1)]

    def __post_init__(self) -> None:
        r = self.r
        if isinstance(r, list):
            tome_r_schedule(len(r), r)  # validates the counts
            r = 0
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (isinstance(r, int) and r >= 0 or 0 < r < 1):
            raise ValueError(f"r must be an integer >= 0 or a share in (0, 1), got {r!r}")
        for name in ("tau_sim", "tau_info", "tau_size"):
            check_number(name, getattr(self, name), 0.0, 1e6)
        if self.blocks is not None:
            object.__setattr__(self, "blocks", check_block_numbers("blocks", self.blocks))

    def check_depth(self, depth: int) -> None:
        if isinstance(self.r, list) and len(self.r) > depth:
            raise ValueError(f"r has {len(self.r)} entries for a model of {depth} blocks")
        if self.blocks and max(self.blocks) > depth:
            raise ValueError(f"blocks {self.blocks} go beyond the model's depth; allowed 1..{depth}")

    def fuses_in(self, layer: int) -> bool:
        """Whether MCTF fuses at the start of block ``layer`` (counted from 1)."""
        return layer > 1 if self.blocks is None else layer in self.blocks

    def count(self, num_tokens: int, num_protected: int, layer: int | None = None) -> int:
        """r for block ``layer`` (from 1; needed for a per-block ``r``) entered by ``num_tokens``
        tokens, clipped as the release clips it."""
        free = num_tokens - num_protected
        if isinstance(self.r, list):
            r = self.r[layer - 1] if layer is not None and layer <= len(self.r) else 0
        else:
            r = int(free * self.r) if isinstance(self.r, float) else self.r
        return max(0, min(r, num_tokens - MIN_TOKENS, free // 2))

    def decide(self, ctx: BlockContext) -> Decision:
        batch, n = ctx.tokens.shape[:2]
        r = self.count(n, ctx.num_protected, ctx.layer) if self.fuses_in(ctx.layer) else 0
        if r == 0:
            return Decision(Assignment.identity(batch, n, ctx.tokens.device), requested=0)
        a_idx, b_idx = alternate_split(n, ctx.num_protected, ctx.tokens.device)
        info = attention_received(ctx.attention)
        weights = multi_criteria_weights(
            ctx.tokens, info, ctx.size, a_idx, b_idx, self.tau_sim, self.tau_info, self.tau_size
        )
        reduction = bidirectional_assignment(weights, a_idx, b_idx, r, ctx.num_protected, n)
        size = ctx.size.to(info.dtype)
        value_weight = info * size / size.amax(dim=1, keepdim=True)
        macs = float(a_idx.shape[-1] * b_idx.shape[-1] * ctx.tokens.shape[-1])
        return Decision(Assignment(reduction.assign, reduction.num_out, value_weight), matching_macs=macs, requested=r)
