"""T2T-ViT with the transformer tokens-to-token module (Yuan et al., "Tokens-to-Token ViT",
ICCV 2021) as a timm ``VisionTransformer``: ``timm.create_model("t2t_vit_t_14")``.

Written from the paper and the layout of the official checkpoints (yitu-opensource/T2T-ViT): the
tokens-to-token module — soft split (unfold 7×7/4, then twice 3×3/2) with a one-head transformer
layer of width ``token_dim`` after each of the first two splits, then a linear projection — in
front of a plain pre-norm backbone (no qkv bias, LayerNorm ε = 1e-5) with a fixed sinusoidal
position embedding.  The module is named ``tokens_to_token`` as in the official checkpoints (also
reachable as ``patch_embed``, where timm looks for it), so the official files load as they are.
Merging happens in the backbone blocks only, never inside the tokens-to-token module.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.layers import Mlp
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from atmerge.models.definitions import build
from atmerge.models.stem import Stem, conv_out
from atmerge.models.timm_vit import register_backbone


class TokenAttention(nn.Module):
    """One-head attention from width ``dim`` to ``out_dim`` whose residual is its own values (the
    input and output widths differ); scale dim^-½ as in the official module."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.out_dim, self.scale = out_dim, dim**-0.5
        self.qkv = nn.Linear(dim, 3 * out_dim, bias=False)
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # [B, N, out_dim] each
        probs = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return v + self.proj(probs @ v)


class TokenTransformer(nn.Module):
    """x [B, N, dim] → [B, N, out_dim]: norm → one-head attention (values as residual) → norm → MLP."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, out_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(in_features=out_dim, hidden_features=out_dim, out_features=out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def macs(self, tokens: int) -> int:
        """fvcore's count for ``tokens`` tokens: the linears, both attention matmuls, both norms."""
        dim, out = self.norm1.normalized_shape[0], self.attn.out_dim
        per_token = 5 * dim + 3 * dim * out + out * out + 5 * out + 2 * out * out
        return tokens * per_token + 2 * tokens * tokens * out


class TokensToToken(Stem):
    """Soft split (7×7/4) → transformer → soft split (3×3/2) → transformer → soft split (3×3/2) →
    linear to ``embed_dim``; [B, 3, H, W] → [B, H/16 · W/16, embed_dim]."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, token_dim: int = 64, **unused) -> None:
        super().__init__(img_size, 16, in_chans, embed_dim)
        self.soft_split0 = nn.Unfold(kernel_size=7, stride=4, padding=2)
        self.soft_split1 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.soft_split2 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.attention1 = TokenTransformer(in_chans * 7 * 7, token_dim)
        self.attention2 = TokenTransformer(token_dim * 3 * 3, token_dim)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.soft_split0(x).transpose(1, 2)
        for attention, split in ((self.attention1, self.soft_split1), (self.attention2, self.soft_split2)):
            x = attention(x)
            side = math.isqrt(x.shape[1])
            x = split(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)).transpose(1, 2)
        return self.project(x)

    def macs(self) -> int:
        size1 = conv_out(self.img_size, self.soft_split0)
        size2 = conv_out(size1, self.soft_split1)
        size3 = conv_out(size2, self.soft_split2)
        tokens = lambda hw: hw[0] * hw[1]  # noqa: E731
        return (
            self.attention1.macs(tokens(size1))
            + self.attention2.macs(tokens(size2))
            + tokens(size3) * self.project.weight.numel()
        )


def sinusoid_table(positions: int, dim: int) -> torch.Tensor:
    """The fixed position embedding [1, positions, dim]: sin on even, cos on odd channels of
    position / 10000^(2⌊j/2⌋/dim)."""
    pos = torch.arange(positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim)
    angle = pos / torch.pow(10000.0, (2 * (j // 2)).double() / dim)
    table = torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]


class T2TViT(VisionTransformer):
    """T2T-ViT_t: the transformer tokens-to-token module in front of a timm ViT backbone."""

    def __init__(self, *, token_dim: int = 64, **kwargs) -> None:
        kwargs = dict(qkv_bias=False, mlp_ratio=3.0, norm_layer=nn.LayerNorm, global_pool="token", **kwargs)
        super().__init__(embed_layer=partial(TokensToToken, token_dim=token_dim), **kwargs)
        self.tokens_to_token = self._modules.pop("patch_embed")
        with torch.no_grad():
            self.pos_embed.copy_(sinusoid_table(self.pos_embed.shape[1], self.embed_dim))
        self.pos_embed.requires_grad_(False)

    @property
    def patch_embed(self) -> TokensToToken:
        """timm's name for the tokens-to-token module."""
        modules = self._modules
        return modules["tokens_to_token"] if "tokens_to_token" in modules else modules["patch_embed"]


register_backbone(__name__)  # its blocks are timm's; its stem counts itself (Stem.macs)


def _create(variant: str, pretrained: bool, settings: dict, kwargs: dict) -> T2TViT:
    return build(T2TViT, variant, pretrained, 0.9, "tokens_to_token.attention1.attn.qkv", **{**settings, **kwargs})


@register_model
def t2t_vit_t_14(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT_t-14: 14 blocks, dim 384, 6 heads (6.1 GFLOPs)."""
    return _create("t2t_vit_t_14", pretrained, dict(embed_dim=384, depth=14, num_heads=6), kwargs)


@register_model
def t2t_vit_t_19(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT_t-19: 19 blocks, dim 448, 7 heads (9.8 GFLOPs)."""
    return _create("t2t_vit_t_19", pretrained, dict(embed_dim=448, depth=19, num_heads=7), kwargs)


@register_model
def t2t_vit_t_24(pretrained: bool = False, **kwargs) -> T2TViT:
    """T2T-ViT_t-24: 24 blocks, dim 512, 8 heads (15.0 GFLOPs)."""
    return _create("t2t_vit_t_24", pretrained, dict(embed_dim=512, depth=24, num_heads=8), kwargs)
