"""The real tokens of a padded per-image batch packed into one tensor, so that per-token work (norms,
linear layers, the MLP) runs on them only.

Layout (:mod:`atmerge.core.padding`): the padded batch [B, N, ...] holds image b's n_b real tokens
at positions [0, n_b) and padding after them (merge size 0).  Packed: [T, ...] with T = Σ n_b,
image after image, each image's tokens in their order.  ``pack`` and ``unpack`` are one gather
and one scatter over the flattened [B·N] positions, with no host synchronisation once T is known.

Pure tensor functions.  Shapes: B = batch, N = tokens (padded), T = real tokens of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded batch lie.

    index [T]: positions of the real tokens in the flattened [B·N] batch, image after image.
    lengths [B]: real tokens per image (n_b, on the batch's device).
    width: N, the padded token count.
    sources [B·N]: for every padded position the packed row it is filled from by :meth:`spread`
        (its own token, or for padding its image's last real token).
    """

    index: torch.Tensor
    lengths: torch.Tensor
    width: int
    sources: torch.Tensor

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def total(self) -> int:
        """T, the real tokens of the batch."""
        return self.index.shape[0]

    @property
    def padded(self) -> bool:
        """Whether the batch holds padding (T < B·N); without it packed and padded are one layout."""
        return self.total < self.batch * self.width

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """The real tokens of x [B, N, ...] → [T, ...]."""
        return x.reshape(self.batch * self.width, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """Packed tokens y [T, ...] back in the padded layout → [B, N, ...], zeros at the padding."""
        out = y.new_zeros(self.batch * self.width, *y.shape[1:])
        return out.index_copy_(0, self.index, y).view(self.batch, self.width, *y.shape[1:])

    def spread(self, y: torch.Tensor) -> torch.Tensor:
        """Packed tokens y [T, ...] in the padded layout [B, N, ...] with the padding filled by a
        copy of its image's last real token (one gather, no zero fill): for inputs of masked
        attention, where padding's keys are never attended to and its queries are dropped, but
        must hold finite values (0 · inf would poison the weighted sum)."""
        return y.index_select(0, self.sources).view(self.batch, self.width, *y.shape[1:])

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [B, N, ...] with the packed y [T, ...] added to its real tokens (y cast to x's dtype,
        as ``x + unpack(y)`` promotes it) → [B, N, ...]; one pass, no padded copy of y."""
        flat = x.reshape(self.batch * self.width, *x.shape[2:])
        return flat.index_add(0, self.index, y.to(x.dtype)).view(x.shape)

    def add_(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:meth:`add` in place (x contiguous, owned by the caller, no autograd through it)."""
        x.view(self.batch * self.width, *x.shape[2:]).index_add_(0, self.index, y.to(x.dtype))
        return x


class PackedTokens(torch.Tensor):
    """A stand-in [B, N, 0] for the tokens of a padded batch held packed: ``rows`` [T, C], laid out
    by ``packing`` (None when the rows follow sizes that the holder lays out itself, as a merge's
    output: image after image for the merged sizes).  It has the padded batch's shape, so that code
    reading only the shape (the merge state's records) sees the padded layout, and holds no values:
    a merge that knows the layout (:meth:`atmerge.core.padding.PaddedAssignment.weighted_average`)
    reduces its rows directly, and any other operation on it gives an ordinary empty tensor."""

    rows: torch.Tensor
    packing: Packing | None

    __torch_function__ = torch._C._disabled_torch_function_impl


def packed_tokens(rows: torch.Tensor, batch: int, width: int, layout: Packing | None = None) -> PackedTokens:
    """rows [T, C] as a :class:`PackedTokens` stand-in [batch, width, 0], laid out by ``layout``."""
    stub = torch.Tensor._make_subclass(PackedTokens, rows.new_empty(batch, width, 0))
    stub.rows, stub.packing = rows, layout
    return stub


def first_rows(lengths: torch.Tensor) -> torch.Tensor:
    """Each image's first packed row: lengths [B] → [B]."""
    return lengths.cumsum(0) - lengths


def real_lengths(size: torch.Tensor) -> torch.Tensor:
    """Real tokens per image of a padded batch: size [B, N] (0 = padding) → [B] int64."""
    return (size > 0).sum(1)


def packing(lengths: torch.Tensor, width: int, total: int | None = None) -> Packing:
    """The :class:`Packing` of a padded batch of ``width`` tokens whose image b has its
    ``lengths[b]`` real tokens first.  ``total`` (T = Σ lengths) when the caller knows it: then
    nothing is read back from the device; otherwise it is read (one synchronisation)."""
    if total is None:
        total = int(lengths.sum())
    steps = torch.arange(width, device=lengths.device)
    index = torch.nonzero_static((steps < lengths[:, None]).flatten(), size=total).squeeze(1)
    first = first_rows(lengths)
    sources = first[:, None] + torch.minimum(steps, (lengths - 1).clamp_min(0)[:, None])
    return Packing(index, lengths, width, sources.flatten().clamp(max=max(total - 1, 0)))
