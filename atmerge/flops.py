"""Analytic FLOPs of a ViT forward pass from the real token count of every block.

Convention (fvcore's, and the papers'): one multiply-add = one FLOP; GFLOPs = 1e9 multiply-adds.
Counted: linear layers and the patch-embedding convolution (weights only, no bias), the two
attention matmuls (QKᵀ and AV), and LayerNorms (5 per element with affine weights, 4 without).
Not counted, as in fvcore: softmax, GELU, residual adds, LayerScale, the log-size bias.
Pure arithmetic; the per-token costs are read off a model by the model adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class BlockCost:
    """Per-token costs of one transformer block, in multiply-adds.

    attn_linear: qkv + output projection (+ gate) per token.  attn_dim: heads × head_dim
    (each of QKᵀ and AV costs N² × attn_dim).  mlp: all MLP linears per token.
    norm1 / norm2: LayerNorm cost per token before attention / MLP.  attn_norms: q/k norm and
    attention-output norm cost per token.  qk_linear: the q and k projections per token.
    """

    attn_linear: int
    attn_dim: int
    mlp: int
    norm1: int
    norm2: int
    attn_norms: int = 0
    qk_linear: int = 0

    def attention_map_macs(self, tokens: float) -> float:
        """Cost of computing this block's attention map alone (q, k projections and QKᵀ) on
        ``tokens`` tokens, as a look-ahead method such as MCTF does."""
        n = tokens
        return n * (self.norm1 + self.qk_linear) + n * n * self.attn_dim

    def macs(self, tokens_attn: float, tokens_mlp: float) -> float:
        """Multiply-adds of the block: attention with the tokens entering it, MLP with the tokens
        left after merging."""
        n, m = tokens_attn, tokens_mlp
        attention = n * (self.attn_linear + self.norm1 + self.attn_norms) + 2.0 * n * n * self.attn_dim
        return attention + m * (self.mlp + self.norm2)


@dataclass(frozen=True)
class ModelCost:
    """Costs of a ViT outside its blocks, in multiply-adds.

    patch_embed: per patch.  norm_pre: per token before the blocks.  final_norm: per token
    after the blocks.  head: per image (pooling norm + classifier linears).
    """

    blocks: tuple[BlockCost, ...]
    patch_embed: int
    norm_pre: int
    final_norm: int
    head: int

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def gflops(
        self,
        num_patches: float,
        tokens_attn: Sequence[float],
        tokens_mlp: Sequence[float],
        tokens_out: float | None = None,
    ) -> float:
        """GFLOPs of one image: tokens_attn[i] tokens enter block i, tokens_mlp[i] reach its MLP,
        tokens_out leave the last block (default tokens_mlp[-1])."""
        if len(tokens_attn) != self.depth or len(tokens_mlp) != self.depth:
            raise ValueError(f"need token counts for all {self.depth} blocks, got {len(tokens_attn)}/{len(tokens_mlp)}")
        out = tokens_mlp[-1] if tokens_out is None else tokens_out
        total = num_patches * self.patch_embed + tokens_attn[0] * self.norm_pre
        total += sum(b.macs(n, m) for b, n, m in zip(self.blocks, tokens_attn, tokens_mlp))
        total += out * self.final_norm + self.head
        return total / 1e9

    def dense_gflops(self, num_patches: int, num_prefix: int) -> float:
        """GFLOPs of the unmodified model: every block sees all tokens."""
        n = [float(num_patches + num_prefix)] * self.depth
        return self.gflops(num_patches, n, n)
