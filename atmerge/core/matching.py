"""Bipartite matching of tokens: how tokens are split into sets A and B, and which B token each
A token would merge into.

Pure tensor functions, no model code.  Shapes: B = batch, N = tokens (protected prefix tokens such
as CLS first), C = channels.  Index tensors hold positions into the N tokens; they are either
shared by the batch ([Na]) or per image ([B, Na]).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Similarity = Literal["raw", "centered"]
SIMILARITIES: tuple[str, ...] = ("raw", "centered")


def token_rows(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Rows of the flattened tokens [B·N, ...] that a per-image index [B, K] of positions into N
    names, image by image → [B·K] (for ``index_select`` / ``index_add`` along dim 0)."""
    offsets = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * num_tokens
    return (index + offsets).reshape(-1)


def take_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b]] for every image: x [B, N, C], index [K] or [B, K] → [B, K, C].

    A per-image index copies whole rows of the flattened tokens (one ``index_select``, several
    times faster on the CPU than a ``gather`` with the index expanded over C)."""
    if index.dim() == 1:
        return x.index_select(1, index)
    if index.shape[0] != x.shape[0] or x.dim() != 3:
        return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    batch, num_tokens, channels = x.shape
    rows = token_rows(index, num_tokens)
    return x.reshape(batch * num_tokens, channels).index_select(0, rows).view(batch, index.shape[1], channels)


def alternate_split(
    num_tokens: int, num_protected: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's alternate split over token positions: A = even positions, B = odd positions.

    Protected positions (< ``num_protected``) belong to neither set.  Returns (a_idx [Na],
    b_idx [Nb]) shared by the whole batch, with Na = ⌊n/2⌋ (n = unprotected tokens) when
    ``num_protected`` is odd, ⌈n/2⌉ when it is even.
    """
    first_even = num_protected + num_protected % 2  # stepped ranges: no data-dependent shapes
    first_odd = num_protected + 1 - num_protected % 2
    return (
        torch.arange(first_even, num_tokens, 2, device=device),
        torch.arange(first_odd, num_tokens, 2, device=device),
    )


def size_distinctive_split(size: torch.Tensor, num_protected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-distinctive split (Section 3.3): sort unprotected tokens by merge size; the smaller
    half (⌊n/2⌋ tokens) is set A, the larger half set B.  Ties keep token order (stable sort).

    size: [B, N] merge sizes.  Returns (a_idx [B, Na], b_idx [B, Nb]) positions into N.
    """
    n = size.shape[1] - num_protected
    order = torch.sort(size[:, num_protected:], dim=1, stable=True).indices + num_protected
    return order[:, : n // 2], order[:, n // 2 :]


def center_keys(metric: torch.Tensor, size: torch.Tensor, num_protected: int) -> torch.Tensor:
    """Subtract each image's mean patch key (size-weighted over unprotected tokens, i.e. the
    mean over the original patches) from every key.  metric [B, N, C], size [B, N] → [B, N, C].

    Removes a direction shared by all keys of an image, which otherwise makes raw cosines sit
    near 1 for every pair (seen in DINOv2-S blocks 0–3 and 11).
    """
    w = size[:, num_protected:, None].to(metric.dtype)
    mean = (metric[:, num_protected:] * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-12)
    return metric - mean


def best_match(metric: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of every A token to its most similar B token.

    metric: [B, N, C] (e.g. attention keys averaged over heads).  Returns (scores [B, Na] clamped
    to [−1, 1], match [B, Na] = position of the best token within set B).  Ties go to the first
    B token.  With an empty set B every score is −inf (nothing to merge into).
    """
    metric = F.normalize(metric, dim=-1)
    a = take_tokens(metric, a_idx)
    b = take_tokens(metric, b_idx)
    if b.shape[1] == 0:
        scores = a.new_full(a.shape[:2], float("-inf"))
        return scores, torch.zeros(a.shape[:2], dtype=torch.long, device=a.device)
    scores, match = (a @ b.transpose(-1, -2)).max(dim=-1)
    return scores.clamp(-1.0, 1.0), match
