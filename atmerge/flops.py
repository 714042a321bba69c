"""Analytic FLOPs of a ViT forward pass from the real token count of every block.

Convention (fvcore's, and the papers'): one multiply-add = one FLOP; GFLOPs = 1e9 multiply-adds.
Counted: linear layers and the patch-embedding convolution (weights only, no bias), the two
attention matmuls (QKᵀ and AV), and LayerNorms (5 per element with affine weights, 4 without).
Not counted, as in fvcore: softmax, GELU, residual adds, LayerScale, the log-size bias.
Pure arithmetic; the per-token costs are read off a model by the model adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence


@dataclass(frozen=True)
class BlockCost:
    """Per-token costs of one transformer block, in multiply-adds.

    attn_linear: qkv + output projection (+ gate) per token.  attn_dim: heads × head_dim
    (each of QKᵀ and AV costs N² × attn_dim).  mlp: all MLP linears per token.
    norm1 / norm2: LayerNorm cost per token before attention / MLP.  qk_norms: q/k norms per
    token; out_norm: the attention-output norm per token.  qk_linear: the q and k projections
    per token.
    """

    attn_linear: int
    attn_dim: int
    mlp: int
    norm1: int
    norm2: int
    qk_norms: int = 0
    out_norm: int = 0
    qk_linear: int = 0

    def macs(self, tokens_in: float, tokens_attended: float, tokens_mlp: float) -> float:
        """Multiply-adds of the block.  ``tokens_in`` tokens enter it.  Where a method reduces
        tokens before attention from the attention map of the tokens that entered (MCTF's
        one-step-ahead attention), q, k and QKᵀ are computed on ``tokens_in`` tokens and the
        values, AV and the output projection on ``tokens_attended``; otherwise the two are
        equal.  The MLP runs on ``tokens_mlp`` tokens (after any reduction after attention)."""
        n, a, m = tokens_in, tokens_attended, tokens_mlp
        if a == n:
            attention = (
                n * (self.attn_linear + self.norm1 + self.qk_norms + self.out_norm) + 2.0 * n * n * self.attn_dim
            )
        else:
            scores = n * (self.norm1 + self.qk_linear + self.qk_norms) + n * n * self.attn_dim
            values = a * (self.norm1 + self.attn_linear - self.qk_linear + self.out_norm) + a * a * self.attn_dim
            attention = scores + values
        return attention + m * (self.mlp + self.norm2)


@dataclass(frozen=True)
class ModelCost:
    """Costs of a ViT outside its blocks, in multiply-adds.

    patch_embed: per patch.  norm_pre: per token before the blocks.  final_norm: per token
    after the blocks.  head: per image (pooling norm + classifier linears).  pool_per_token:
    per token that an attention pool or a per-token head reads (keys, values, scores; LV-ViT's
    auxiliary head), after skipping the first ``pool_skips`` tokens (prefix tokens it leaves
    out).  stem: per image, a patch embedding that is not one linear map per patch (LV-ViT's
    convolutions, T2T-ViT's tokens-to-token module).
    """

    blocks: tuple[BlockCost, ...]
    patch_embed: int
    norm_pre: int
    final_norm: int
    head: int
    pool_per_token: int = 0
    pool_skips: int = 0
    stem: int = 0

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def gflops(
        self,
        num_patches: float,
        tokens_attn: Sequence[float],
        tokens_mlp: Sequence[float],
        tokens_out: float | None = None,
        tokens_attended: Sequence[float] | None = None,
    ) -> float:
        """GFLOPs of one image: tokens_attn[i] tokens enter block i, tokens_attended[i] remain
        after a reduction before its attention (default: tokens_attn), tokens_mlp[i] reach its
        MLP, tokens_out leave the last block (default tokens_mlp[-1])."""
        attended = tokens_attn if tokens_attended is None else tokens_attended
        if not len(tokens_attn) == len(tokens_mlp) == len(attended) == self.depth:
            raise ValueError(f"need token counts for all {self.depth} blocks, got {len(tokens_attn)}/{len(tokens_mlp)}")
        out = tokens_mlp[-1] if tokens_out is None else tokens_out
        total = self.stem + num_patches * self.patch_embed + tokens_attn[0] * self.norm_pre
        total += sum(b.macs(n, a, m) for b, n, a, m in zip(self.blocks, tokens_attn, attended, tokens_mlp))
        total += out * self.final_norm + self.head + max(out - self.pool_skips, 0) * self.pool_per_token
        return total / 1e9

    def dense_gflops(self, num_patches: int, num_prefix: int) -> float:
        """GFLOPs of the unmodified model: every block sees all tokens."""
        n = [float(num_patches + num_prefix)] * self.depth
        return self.gflops(num_patches, n, n)
