"""LV-ViT (Jiang et al., "All Tokens Matter: Token Labeling for Training Better Vision
Transformers", NeurIPS 2021) as a timm ``VisionTransformer``: ``timm.create_model("lvvit_s")``.

Written from the paper and the layout of the official checkpoints (zihangJiang/TokenLabeling):
a four-layer convolutional patch embedding (7×7/2 → 3×3 → 3×3 with BatchNorm and ReLU, then an
8×8/8 projection), pre-norm blocks whose two residual branches are divided by ``skip_lam``, MLP
ratio 3, no qkv bias, LayerNorm ε = 1e-5, and the token-labeling auxiliary head.  State-dict keys
and shapes equal the official ones, so the official files load as they are.

Evaluation output, as the official code: ``head(CLS) + 0.5 × max over patch tokens of
aux_head(token)``; ``aux_head=False`` returns ``head(CLS)`` alone (the paper's ATM setting, where
the last block keeps only CLS).  On a merged model the maximum runs over the merged tokens (a
merged token's auxiliary logits are those of its size-weighted mean), never over padding.
Token-labeling training (MixToken, dense targets) is not implemented: in training mode the
model returns the same logits as in evaluation.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from timm.models import register_model
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from atmerge.flops import ModelCost
from atmerge.models.costs import linear_macs
from atmerge.models.definitions import build
from atmerge.models.stem import Stem, conv_macs, conv_out
from atmerge.models.timm_vit import register_backbone


class ConvStem(Stem):
    """LV-ViT's patch embedding: conv1 7×7/2 → BN → ReLU → conv2 3×3 → BN → ReLU → conv3 3×3 → BN →
    ReLU (``width`` channels) → proj (patch/2)×(patch/2) stride patch/2; [B, 3, H, W] → [B, N, C]."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, width: int = 64, **unused) -> None:
        super().__init__(img_size, patch_size, in_chans, embed_dim)
        self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.proj = nn.Conv2d(width, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x).flatten(2).transpose(1, 2)

    def macs(self) -> int:
        """Convolutions (weights) plus fvcore's count of an inference BatchNorm: 2 per element
        with affine weights (scale and shift), else 1."""
        total, size = 0, self.img_size
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            size = conv_out(size, conv)
            total += conv_macs(conv, size) + (2 if bn.affine else 1) * bn.num_features * size[0] * size[1]
        return total + conv_macs(self.proj, conv_out(size, self.proj))


class ResidualScale(nn.Module):
    """Divides a residual branch by ``skip_lam`` (no parameters: the official keys have none)."""

    def __init__(self, skip_lam: float) -> None:
        super().__init__()
        self.skip_lam = skip_lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.skip_lam

    def extra_repr(self) -> str:
        return f"skip_lam={self.skip_lam}"


class SkipLamBlock(Block):
    """timm's pre-norm Block with both residual branches divided by ``skip_lam``."""

    def __init__(self, *args, skip_lam: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ls1, self.ls2 = ResidualScale(skip_lam), ResidualScale(skip_lam)


class LVViT(VisionTransformer):
    """LV-ViT; ``aux_head``: add 0.5 × the token-wise maximum of the auxiliary head to the CLS
    logits (the official evaluation, default) or not (CLS only)."""

    def __init__(self, *, skip_lam: float = 1.0, aux_head: bool = True, stem_width: int = 64, **kwargs) -> None:
        kwargs = dict(qkv_bias=False, mlp_ratio=3.0, norm_layer=nn.LayerNorm, global_pool="token", **kwargs)
        super().__init__(
            embed_layer=partial(ConvStem, width=stem_width), block_fn=partial(SkipLamBlock, skip_lam=skip_lam), **kwargs
        )
        self.aux_head = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.use_aux_head = bool(aux_head)

    @property
    def head_reads_patch_tokens(self) -> bool:
        """Whether the output depends on the patch tokens too (then merging keeps them to the end)."""
        return self.use_aux_head and self.num_classes > 0

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self.aux_head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x [B, N, C] (after the final norm) → logits [B, K]."""
        logits = super().forward_head(x, pre_logits)
        if pre_logits or not self.head_reads_patch_tokens:
            return logits
        aux = self.aux_head(x[:, self.num_prefix_tokens :])  # [B, N-1, K]
        real = _real_tokens(self, x)
        if real is not None:  # a padded batch of per-image merges: padding never wins the max
            aux = aux.masked_fill(~real[:, self.num_prefix_tokens :, None], float("-inf"))
        return logits + 0.5 * aux.max(dim=1).values


def _aux_head_cost(model: LVViT, cost: ModelCost) -> ModelCost:
    """The auxiliary head's cost: a linear map of every patch token (never the prefix tokens)."""
    if not model.head_reads_patch_tokens:
        return cost
    return replace(
        cost, pool_per_token=cost.pool_per_token + linear_macs(model.aux_head), pool_skips=model.num_prefix_tokens
    )


# the timm adapter patches SkipLamBlock like timm's Block (ls1/ls2 are the scales)
register_backbone(__name__, blocks=(SkipLamBlock,), cost_hooks={LVViT: _aux_head_cost})


def _real_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """[B, N] True for real tokens when ``model`` is patched and its last batch was padded
    (:meth:`MergeState.padding_mask`)."""
    from atmerge.models.patching import STATE

    state = getattr(model, STATE, None)
    real = None if state is None or state.size is None else state.padding_mask()
    return real if real is not None and real.shape == x.shape[:2] else None


def _create(variant: str, crop_pct: float, pretrained: bool, settings: dict, kwargs: dict) -> LVViT:
    return build(LVViT, variant, pretrained, crop_pct, "patch_embed.conv1", **{**settings, **kwargs})


@register_model
def lvvit_t(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-T: 12 blocks, dim 240, 4 heads, skip_lam 1 (2.9 GFLOPs)."""
    return _create("lvvit_t", 0.9, pretrained, dict(embed_dim=240, depth=12, num_heads=4, skip_lam=1.0), kwargs)


@register_model
def lvvit_s(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-S: 16 blocks, dim 384, 6 heads, skip_lam 2 (6.6 GFLOPs)."""
    return _create("lvvit_s", 0.9, pretrained, dict(embed_dim=384, depth=16, num_heads=6, skip_lam=2.0), kwargs)


@register_model
def lvvit_m(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-M: 20 blocks, dim 512, 8 heads, skip_lam 2 (12.7 GFLOPs by fvcore)."""
    return _create("lvvit_m", 1.0, pretrained, dict(embed_dim=512, depth=20, num_heads=8, skip_lam=2.0), kwargs)
