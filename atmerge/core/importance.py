"""Token importance read off attention maps, for pruning and fusion methods.

attention: [B, H, N, N] softmax probabilities (rows = queries, columns = keys).  Pure functions.
"""

from __future__ import annotations

import torch


def cls_attention(attention: torch.Tensor, cls_index: int = 0) -> torch.Tensor:
    """Attention of the CLS query to every token, mean over heads: [B, N] (EViT's score)."""
    return attention[:, :, cls_index, :].mean(dim=1)


def attention_received(attention: torch.Tensor) -> torch.Tensor:
    """Mean attention each token receives, over heads and queries: [B, N] (MCTF's
    informativeness; a token that receives little attention carries little information)."""
    return attention.mean(dim=(1, 2))


def weighted_pagerank(attention: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Zero-TPrune's Weighted PageRank: importance s [B, N] as the stationary distribution of the
    attention graph, s ← mean over heads of Aᵀ s, from the uniform distribution.

    Row-stochastic attention keeps s a distribution (sums to 1 per image)."""
    graph = attention.mean(dim=1).transpose(1, 2)  # [B, N_keys, N_queries]
    n = graph.shape[-1]
    s = graph.new_full((graph.shape[0], n, 1), 1.0 / n)
    for _ in range(iterations):
        s = graph @ s
    return s.squeeze(-1)
