"""Merging tokens once pairs are chosen: the merge itself, its inverse for dense outputs,
size-weighted averages (Definition 1), source tracking and the merging error (Definition 2).

Pure tensor functions, no model code.  Token layout after a merge:
``[protected tokens, unmerged A tokens (in their order), B tokens (with merged A folded in)]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from atmerge.core.matching import take_tokens, token_rows

Reduce = Literal["sum", "mean", "amax"]


def _expand_index(index: torch.Tensor, batch: int) -> torch.Tensor:
    return index.unsqueeze(0).expand(batch, -1) if index.dim() == 1 else index


def _scatter_tokens(out: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    out.scatter_(1, index.unsqueeze(-1).expand(-1, -1, out.shape[-1]), values)


@dataclass(frozen=True)
class Merge:
    """r pairs per image chosen by bipartite matching; call it on any per-token tensor.

    a_idx / b_idx: positions of sets A and B ([Na] shared or [B, Na] per image).
    src [B, r]: positions within A of the merged A tokens; dst [B, r]: their B partners (within B).
    keep [B, Na − r]: positions within A of the A tokens that stay, in their output order (ascending;
        ToMe without a class token keeps them by descending score, as its release does).
    """

    num_protected: int
    a_idx: torch.Tensor
    b_idx: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    keep: torch.Tensor

    @property
    def r(self) -> int:
        return self.src.shape[1]

    def __call__(self, x: torch.Tensor, reduce: Reduce = "sum") -> torch.Tensor:
        """Merge x [B, N, C] → [B, N − r, C]; merged values are reduced with ``reduce``.

        With r = 0 the tokens are returned unchanged (no reordering).
        """
        if self.r == 0:
            return x
        if reduce == "sum" and x.dim() == 3:  # rows of the flattened tokens: one copy, one index_add
            batch, num_tokens, channels = x.shape
            rows, src_rows, dst_rows, width = self.rows(batch, num_tokens)
            flat = x.reshape(batch * num_tokens, channels)
            out = flat.index_select(0, rows).index_add_(0, dst_rows, flat.index_select(0, src_rows))
            return out.view(batch, width, channels)
        p, batch = self.num_protected, x.shape[0]
        a_idx = _expand_index(self.a_idx, batch)
        b = take_tokens(x, self.b_idx)
        unmerged = take_tokens(x, a_idx.gather(1, self.keep))  # one gather each, no copy of set A
        moved = take_tokens(x, a_idx.gather(1, self.src))
        index = self.dst.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        b = b.scatter_reduce(1, index, moved, reduce=reduce, include_self=True)
        return torch.cat([x[:, :p], unmerged, b], dim=1)

    def rows(self, batch: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Where a merge of ``batch`` images of ``num_tokens`` tokens reads and writes, as rows of
        the flattened tokens [B·N, ...]: (rows [B·(N − r)] whose copies lay out the output
        [protected, unmerged A, B], src_rows [B·r] of the moved A tokens, dst_rows [B·r] of their
        partners in the flattened output, N − r)."""
        p, num_kept = self.num_protected, self.num_protected + self.keep.shape[1]  # output slots before set B
        width = num_kept + self.b_idx.shape[-1]
        image = torch.arange(batch, device=self.src.device).unsqueeze(1)  # [B, 1]
        first = image * num_tokens  # row of each image's first token
        a_rows = self.a_idx + first  # [B, Na]
        protected = first if p == 1 else first + torch.arange(p, device=first.device)
        rows = torch.cat([protected, a_rows.gather(1, self.keep), self.b_idx + first], dim=1).view(-1)
        src_rows = a_rows.gather(1, self.src).view(-1)
        dst_rows = (self.dst + (image * width + num_kept)).view(-1)
        return rows, src_rows, dst_rows, width

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse for dense outputs: y [B, N − r, C] → [B, N, C]; every token of a merged group
        receives the group's value."""
        if self.r == 0:
            return y
        batch, _, channels = y.shape
        p, num_keep = self.num_protected, self.keep.shape[1]
        a_idx = _expand_index(self.a_idx, batch)
        b_idx = _expand_index(self.b_idx, batch)
        num_tokens = p + a_idx.shape[1] + b_idx.shape[1]
        unmerged, b = y[:, p : p + num_keep], y[:, p + num_keep :]
        out = y.new_empty(batch, num_tokens, channels)
        out[:, :p] = y[:, :p]
        _scatter_tokens(out, b_idx, b)
        _scatter_tokens(out, a_idx.gather(1, self.keep), unmerged)
        _scatter_tokens(out, a_idx.gather(1, self.src), take_tokens(b, self.dst))
        return out


def bipartite_merge(
    scores: torch.Tensor,
    match: torch.Tensor,
    a_idx: torch.Tensor,
    b_idx: torch.Tensor,
    r: int,
    num_protected: int,
) -> Merge:
    """Merge the r highest-scoring A tokens of every image into their best B tokens.

    scores, match: [B, Na] from :func:`atmerge.core.matching.best_match`.  r is clipped to
    [0, Na] (and to 0 when B is empty).  Ties in score go to the earlier A token.
    """
    num_a = scores.shape[1]
    r = max(0, min(int(r), num_a if b_idx.shape[-1] > 0 else 0))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    src = order[:, :r]
    keep = order[:, r:].sort(dim=-1).values
    return Merge(num_protected, a_idx, b_idx, src, match.gather(1, src), keep)


def merge_weighted_average(
    merge: "Merge | Assignment", x: torch.Tensor, size: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of each merged group; sizes add up (Definition 1).  A reduction with
    ``value_weight`` averages with those weights instead (sizes still add up), or, with
    ``weighted_sum``, sums the weighted values without dividing by the weights (EViT's fusion).

    x [B, N, C], size [B, N] → (x [B, N', C], size [B, N']).
    """
    value_weight = getattr(merge, "value_weight", None)
    if getattr(merge, "weighted_sum", False):
        weight = value_weight.unsqueeze(-1).to(x.dtype)
        merged = merge(torch.cat([x * weight, size.unsqueeze(-1).to(x.dtype)], dim=-1), "sum")
        return merged[..., :-1], merged[..., -1].to(size.dtype)
    if merge.r == 0 and value_weight is None and not getattr(merge, "padded", False):
        return x, size
    if value_weight is None and isinstance(merge, Merge):
        return _merge_bipartite_average(merge, x, size)
    if value_weight is None:
        weight = size.unsqueeze(-1).to(x.dtype)
        merged = merge(torch.cat([x * weight, weight], dim=-1), "sum")  # one gather/scatter for both
        total = merged[..., -1:]  # 0 only for an empty slot (padding): its value stays 0
        return merged[..., :-1] / total.clamp_min(torch.finfo(total.dtype).tiny), total.squeeze(-1).to(size.dtype)
    weight = value_weight.unsqueeze(-1).to(x.dtype)
    merged = merge(torch.cat([x * weight, weight, size.unsqueeze(-1).to(x.dtype)], dim=-1), "sum")
    return merged[..., :-2] / merged[..., -2:-1], merged[..., -1].to(size.dtype)


def _merge_bipartite_average(merge: Merge, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_weighted_average` for a bipartite :class:`Merge` (r > 0), in few passes over
    x [B, N, C]: one row copy lays out every output token [protected, unmerged A, B] from the
    flattened tokens, set B is weighted in place, receives the moved A tokens' weighted values
    (one ``index_add``) and is divided by its new sizes → (x [B, N − r, C], size [B, N − r]).

    Every value is computed as the definition writes it (Σ size · x / Σ size, the B token first,
    then its partners in A order), so the result does not depend on this layout."""
    batch, num_tokens, channels = x.shape
    rows, src_rows, dst_rows, width = merge.rows(batch, num_tokens)
    num_kept = width - merge.b_idx.shape[-1]  # output slots before set B
    weight = size.to(x.dtype).reshape(-1)  # [B·N]
    slot_weight = weight.index_select(0, rows)  # [B·(N − r)]: set B's own sizes before the merge
    moved_weight = weight.index_select(0, src_rows)  # [B·r]
    total = slot_weight.index_add(0, dst_rows, moved_weight)
    flat = x.reshape(batch * num_tokens, channels)
    tokens = flat.index_select(0, rows)  # [B·(N − r), C]
    b = tokens.view(batch, width, channels)[:, num_kept:]
    b.mul_(slot_weight.view(batch, width, 1)[:, num_kept:])
    tokens.index_add_(0, dst_rows, flat.index_select(0, src_rows).mul_(moved_weight.unsqueeze(-1)))
    b.div_(total.view(batch, width, 1)[:, num_kept:])
    if size.dtype == x.dtype:
        sizes = total.view(batch, width)
    else:  # sizes keep their own dtype; set B's totals come from the weights' sum, as their average
        sizes = size.reshape(-1).index_select(0, rows).view(batch, width)
        sizes[:, num_kept:] = total.view(batch, width)[:, num_kept:].to(size.dtype)
    return tokens.view(batch, width, channels), sizes


def merge_attention(merge: "Merge | Assignment", attention: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Carry an attention map over a merge, as MCTF reuses its one-step-ahead attention: the
    columns (keys) of a merged group add up, its rows (queries) are averaged with ``weight``
    (the weights its tokens were fused with), so every row still sums to 1.

    attention [B, H, N, N], weight [B, N] → [B, H, N', N'].
    """
    batch, heads, n, _ = attention.shape
    keys = merge(attention.permute(0, 3, 1, 2).reshape(batch, n, heads * n), "sum")  # [B, N', H·N]
    n_out = keys.shape[1]
    rows = keys.reshape(batch, n_out, heads, n).permute(0, 3, 2, 1).reshape(batch, n, heads * n_out)
    w = weight.to(attention.dtype).unsqueeze(-1)
    merged = merge(torch.cat([rows * w, w], dim=-1), "sum")  # [B, N', H·N' + 1]
    rows = merged[..., :-1] / merged[..., -1:]
    return rows.reshape(batch, n_out, heads, n_out).permute(0, 2, 1, 3)


def merge_source(merge: Merge, source: torch.Tensor) -> torch.Tensor:
    """Track which original patches each token holds: source [B, N, N0] (0/1) → [B, N − r, N0]."""
    return merge(source, "amax")


def spread_by_source(source: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Inverse of all merges so far for dense outputs: tokens [B, N, C] with their sources
    [B, N, N0] → [B, N0, C]; every original token gets the value of the token that holds it
    (exactly: one product by 1), one that no token holds (pruned) gets zeros."""
    return source.transpose(1, 2).to(tokens.dtype) @ tokens


def size_weighted_mean(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Mean of tokens x [B, N, C] in which each token counts as often as its size [B, N] says, so
    that every original patch counts once (padding, of size 0, not at all) → [B, C]."""
    weight = size.unsqueeze(-1).to(x.dtype)
    return (x * weight).sum(1) / weight.sum(1)


def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """δ(x, y) = 1 − cos(x, y) over the last dim."""
    return 1.0 - F.cosine_similarity(x, y, dim=-1)


def merging_error(
    x_i: torch.Tensor, x_j: torch.Tensor, n_i: torch.Tensor | float, n_j: torch.Tensor | float
) -> torch.Tensor:
    """Merging error E_m (Definition 2) of merging tokens x_i, x_j with sizes n_i, n_j.

    The tokens are normalised first, as the definition assumes; x_* [..., C], n_* broadcastable
    to [...].  E_m = n_i δ(x_i, x_ij) + n_j δ(x_j, x_ij) with x_ij = (n_i x_i + n_j x_j)/(n_i + n_j).
    """
    x_i, x_j = F.normalize(x_i, dim=-1), F.normalize(x_j, dim=-1)
    n_i = torch.as_tensor(n_i, dtype=x_i.dtype, device=x_i.device)
    n_j = torch.as_tensor(n_j, dtype=x_i.dtype, device=x_i.device)
    merged = (n_i.unsqueeze(-1) * x_i + n_j.unsqueeze(-1) * x_j) / (n_i + n_j).unsqueeze(-1)
    return n_i * cosine_distance(x_i, merged) + n_j * cosine_distance(x_j, merged)


def merging_error_bounds(
    x_i: torch.Tensor, x_j: torch.Tensor, n_i: torch.Tensor | float, n_j: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Theorem 1: (n_i n_j/(n_i+n_j)) δ(x_i, x_j) ≤ E_m ≤ (2 n_i n_j/(n_i+n_j)) δ(x_i, x_j)."""
    n_i = torch.as_tensor(n_i, dtype=x_i.dtype, device=x_i.device)
    n_j = torch.as_tensor(n_j, dtype=x_i.dtype, device=x_i.device)
    lower = n_i * n_j / (n_i + n_j) * cosine_distance(x_i, x_j)
    return lower, 2.0 * lower


@dataclass(frozen=True)
class Assignment:
    """A general token reduction: token i of image b goes to output slot ``assign[b, i]``
    (−1 = pruned).  Used by pruning and fusion methods (EViT, MCTF, Zero-TPrune).

    assign [B, N] int64 with values in [−1, num_out); every slot receives at least one token.
    value_weight [B, N]: weights of the average within a slot (None = merge sizes).
    weighted_sum: a slot's value is Σ value_weight · x, not divided by Σ value_weight (needs
        value_weight; EViT's fused token).
    padded: slots may stay empty (padding of a per-image batch, :mod:`atmerge.core.padding`), and
        the reduction changes the tokens even where r = 0 (some images merge, the longest not).
    """

    assign: torch.Tensor
    num_out: int
    value_weight: torch.Tensor | None = None
    weighted_sum: bool = False
    padded: bool = False

    @classmethod
    def identity(cls, batch: int, num_tokens: int, device: torch.device | None = None) -> "Assignment":
        """The reduction that keeps every token where it is."""
        return cls(torch.arange(num_tokens, device=device).expand(batch, -1), num_tokens)

    @property
    def r(self) -> int:
        """Tokens removed."""
        return self.assign.shape[1] - self.num_out

    def __call__(self, x: torch.Tensor, reduce: Reduce = "sum") -> torch.Tensor:
        """x [B, N, C] → [B, num_out, C]; pruned tokens are dropped."""
        if self.r == 0 and not self.padded and bool((self.assign >= 0).all()):
            return x
        index = torch.where(self.assign < 0, self.num_out, self.assign)
        if reduce == "sum" and x.dim() == 3 and index.shape[0] == x.shape[0]:  # one index_add of flattened rows
            batch, num_tokens, channels = x.shape
            out = x.new_zeros(batch * (self.num_out + 1), channels)
            out.index_add_(0, token_rows(index, self.num_out + 1), x.reshape(batch * num_tokens, channels))
            return out.view(batch, self.num_out + 1, channels)[:, : self.num_out]
        out = x.new_zeros(x.shape[0], self.num_out + 1, x.shape[-1])
        out = out.scatter_reduce(
            1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x, reduce=reduce, include_self=False
        )
        return out[:, : self.num_out]

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """y [B, num_out, C] → [B, N, C]; pruned tokens get zeros."""
        padded = torch.cat([y, y.new_zeros(y.shape[0], 1, y.shape[-1])], dim=1)
        index = torch.where(self.assign < 0, self.num_out, self.assign)
        return take_tokens(padded, index)
