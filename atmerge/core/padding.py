"""Per-image merging in one batched pass: every image keeps its own token count, the batch is
padded to its longest image.

Layout: the valid tokens of image b sit at positions [0, n_b) and padding after them; padding
has merge size 0, so it is found from the sizes alone (``size > 0``).  Padding is in neither set
A nor set B, never merges, never receives a merge, and is dropped by every merge (the output is
padded again to the longest image).  With merge size 0 the log-size bias of proportional
attention is −inf, so padding is never attended to; size-weighted pooling gives it weight 0.

Each image is laid out exactly as :class:`atmerge.core.merging.Merge` lays out a batch of one
(``[protected, unmerged A in A's order, B]``, unchanged when it merges nothing), so a padded
batch merges exactly as its images would one at a time.  The per-token work of a block (norms,
linear layers, MLP) runs on the real tokens only, packed (:mod:`atmerge.core.packing`); one merge
reads back one pair of numbers (the longest image and the real tokens left), nothing else here does.

Pure tensor functions.  Shapes: B = batch, N = tokens (padded), Na / Nb = sets A / B (padded
per image: ``a_real`` / ``b_real`` [B, Na] / [B, Nb] mark the entries that exist).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from atmerge.core.matching import alternate_split, take_tokens
from atmerge.core.merging import Assignment, Reduce, _expand_index
from atmerge.core.packing import PackedTokens, first_rows, packed_tokens


@dataclass(frozen=True)
class PaddedAssignment(Assignment):
    """The :class:`Assignment` of a per-image merge in a padded batch.

    real_tokens: T, the real tokens of the batch after the reduction (known on the host, so that
    packing them, :mod:`atmerge.core.packing`, reads nothing back).  Sums run as one ``index_add``
    over the flattened batch instead of a scatter with a per-channel index."""

    real_tokens: int | None = None

    def __call__(self, x: torch.Tensor, reduce: Reduce = "sum") -> torch.Tensor:
        """x [B, N, ...] → [B, num_out, ...]; the empty slots (padding) are zeros."""
        if reduce != "sum":
            return super().__call__(x, reduce)
        batch, num_tokens = self.assign.shape
        slots = self.num_out + 1  # the last slot of each image collects what is dropped
        index = torch.where(self.assign < 0, self.num_out, self.assign)
        index = (index + slots * torch.arange(batch, device=index.device)[:, None]).flatten()
        out = x.new_zeros(batch * slots, *x.shape[2:])
        out.index_add_(0, index, x.reshape(batch * num_tokens, *x.shape[2:]))
        return out.view(batch, slots, *x.shape[2:])[:, : self.num_out]

    def weighted_average(self, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """:func:`atmerge.core.merging.merge_weighted_average` of this merge (no ``value_weight``):
        x [B, N, C], size [B, N] → (x [B, num_out, C], size [B, num_out]); the weighted tokens and
        the sizes are summed separately (no concatenated copy), an empty slot stays 0.  Tokens held
        packed (:class:`~atmerge.core.packing.PackedTokens`) are merged packed: :meth:`packed_average`."""
        if isinstance(x, PackedTokens):
            return self.packed_average(x, size)
        total = self(size.unsqueeze(-1).to(x.dtype))  # [B, num_out, 1]
        merged = self(x * size.unsqueeze(-1).to(x.dtype))
        return merged / total.clamp_min(torch.finfo(total.dtype).tiny), total.squeeze(-1).to(size.dtype)

    def packed_average(self, x: PackedTokens, size: torch.Tensor) -> tuple[PackedTokens, torch.Tensor]:
        """:meth:`weighted_average` of tokens held packed: x [B, N, 0] with rows [T, C] laid out by
        ``x.packing``, size [B, N] → (x [B, num_out, 0] with rows [T', C] image after image for the
        new sizes, size [B, num_out]).

        Each output row starts as its first contributor (one gather of the T' rows); the K = T − T'
        tokens merged into an earlier one are then added (a gather and an index_add of K rows) and
        the sums divided by their sizes: the same sums, in the same order, as the padded merge,
        without a padded or zero-filled copy of the tokens."""
        rows, old = x.rows, x.packing
        if old is None or self.real_tokens is None:
            raise ValueError("a packed merge needs the tokens' layout and the real tokens it leaves")
        total = self(size.unsqueeze(-1).to(rows.dtype)).squeeze(-1)  # [B, num_out]
        image = torch.div(old.index, old.width, rounding_mode="floor")
        dest = first_rows((total > 0).sum(1)).index_select(0, image) + self.assign.flatten().index_select(0, old.index)
        weight = size.flatten().index_select(0, old.index).to(rows.dtype)  # [T]
        steps = torch.arange(old.total, device=rows.device)
        first = torch.full((self.real_tokens,), old.total, device=rows.device).scatter_reduce_(0, dest, steps, "amin")
        later = torch.nonzero_static(steps != first.index_select(0, dest), size=old.total - self.real_tokens).squeeze(1)
        into, later_weight = dest.index_select(0, later), weight.index_select(0, later)
        mass = weight.index_select(0, first).index_add_(0, into, later_weight)  # [T']
        summed = rows.index_select(0, first) * weight.index_select(0, first)[:, None]
        summed.index_add_(0, into, rows.index_select(0, later) * later_weight[:, None])
        merged = summed.div_(mass.clamp_min(torch.finfo(mass.dtype).tiny)[:, None])
        return packed_tokens(merged, old.batch, self.num_out), total.to(size.dtype)


def padded_alternate_split(
    size: torch.Tensor, num_protected: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The alternate split (A = even, B = odd positions) of a padded batch: size [B, N] →
    (a_idx [Na], b_idx [Nb], a_real [B, Na], b_real [B, Nb]).  Valid tokens come first in every
    image, so the parity of their positions is what it is in a batch of one."""
    a_idx, b_idx = alternate_split(size.shape[1], num_protected, size.device)
    valid = size > 0
    return a_idx, b_idx, valid[:, a_idx], valid[:, b_idx]


def padded_size_distinctive_split(
    size: torch.Tensor, num_protected: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The size-distinctive split of a padded batch: in image b the ⌊m_b/2⌋ smallest of its m_b
    valid unprotected tokens form A and the others B, ties in token order (stable sort), as
    :func:`atmerge.core.matching.size_distinctive_split` does for a batch of one.

    size [B, N] → (a_idx [B, Na], b_idx [B, Nb], a_real [B, Na], b_real [B, Nb]) with Na = ⌊(N − p)/2⌋,
    Nb = ⌈(N − p)/2⌉ (the widths of the longest image; nothing is read back from the device)."""
    p = num_protected
    sizes = size[:, p:]
    valid = sizes > 0
    key = torch.where(valid, sizes, torch.full_like(sizes, float("inf")))
    order = torch.sort(key, dim=1, stable=True).indices + p  # valid tokens first, by size
    count = valid.sum(1)
    num_a = count // 2
    # widths from the padded shape, not read back from the device: the longest image has at most
    # N − p valid unprotected tokens (exactly, after a merge), so no image needs more columns
    width_a = sizes.shape[1] // 2
    width_b = sizes.shape[1] - width_a
    steps_a = torch.arange(width_a, device=size.device)
    steps_b = num_a[:, None] + torch.arange(width_b, device=size.device)
    a_idx = order[:, :width_a]
    b_idx = order.gather(1, steps_b.clamp(max=max(order.shape[1] - 1, 0)))
    return a_idx, b_idx, steps_a[None] < num_a[:, None], steps_b < count[:, None]


def padded_best_match(
    metric: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, a_real: torch.Tensor, b_real: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine of every real A token to its most similar real B token: (scores [B, Na] in [−1, 1],
    −inf where the A entry does not exist or the image has no B token; match [B, Na])."""
    metric = F.normalize(metric, dim=-1)
    a, b = take_tokens(metric, a_idx), take_tokens(metric, b_idx)
    similarity = (a @ b.transpose(-1, -2)).masked_fill(~b_real[:, None, :], float("-inf"))
    if similarity.shape[-1] == 0:
        scores = a.new_full(a.shape[:2], float("-inf"))
        return scores, torch.zeros(a.shape[:2], dtype=torch.long, device=a.device)
    scores, match = similarity.max(dim=-1)
    scores = torch.where(a_real & (scores > float("-inf")), scores.clamp(-1.0, 1.0), float("-inf"))
    return scores, match


def padded_bipartite_merge(
    scores: torch.Tensor,
    match: torch.Tensor,
    a_idx: torch.Tensor,
    b_idx: torch.Tensor,
    a_real: torch.Tensor,
    b_real: torch.Tensor,
    r: torch.Tensor,
    num_protected: int,
    num_tokens: int,
) -> Assignment:
    """Merge the r[b] highest-scoring A tokens of image b into their best B tokens (ties to the
    earlier A token), as :func:`atmerge.core.merging.bipartite_merge` does image by image.

    scores, match [B, Na]; r [B] merges per image (at most its A tokens with a finite score);
    num_tokens: N, the padded token count.  Returns a :class:`PaddedAssignment` onto the longest
    image's token count; the slots past an image's own count stay empty (padding).  The output
    width and the real tokens left are read back from the device together (one synchronisation)."""
    batch, num_a = scores.shape
    p = num_protected
    a_idx, b_idx = _expand_index(a_idx, batch), _expand_index(b_idx, batch)
    valid = p + a_real.sum(1) + b_real.sum(1)  # valid tokens per image, before the merge
    r = torch.minimum(r.to(torch.long), (scores > float("-inf")).sum(1))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(num_a, device=scores.device).expand(batch, -1))
    merged = rank < r[:, None]
    kept = a_real & ~merged
    num_kept = kept.sum(1, keepdim=True)
    a_slot = p + kept.cumsum(1) - 1
    b_slot = p + num_kept + b_real.cumsum(1) - 1
    a_slot = torch.where(merged, b_slot.gather(1, match), a_slot)
    unmerged = (r == 0)[:, None]  # an image that merges nothing keeps its order (as Merge with r = 0)
    a_slot, b_slot = torch.where(unmerged, a_idx, a_slot), torch.where(unmerged, b_idx, b_slot)
    assign = torch.full((batch, num_tokens + 1), -1, dtype=torch.long, device=scores.device)
    assign[:, :p] = torch.arange(p, device=scores.device)
    dummy = torch.full_like(b_idx, num_tokens)
    assign.scatter_(1, torch.where(b_real, b_idx, dummy), b_slot)
    assign.scatter_(1, torch.where(a_real, a_idx, torch.full_like(a_idx, num_tokens)), a_slot)
    lengths = valid - r  # real tokens per image after the merge
    num_out, total = torch.stack([lengths.max(), lengths.sum()]).tolist() if batch else (num_tokens, 0)
    return PaddedAssignment(assign[:, :num_tokens], num_out, padded=True, real_tokens=total)
