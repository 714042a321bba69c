"""A patch embedding other than timm's single convolution, for timm ``VisionTransformer``
subclasses (LV-ViT's convolution stack, T2T-ViT's tokens-to-token module).

timm's ``VisionTransformer`` builds its ``patch_embed`` from ``embed_layer(img_size=...,
patch_size=..., in_chans=..., embed_dim=..., **extra)``; a :class:`Stem` takes those arguments,
turns images [B, C, H, W] into tokens [B, N, C'] on a fixed grid, and says what it costs
(:meth:`macs`, counted the fvcore way) so that the timm adapter's FLOPs stay exact.
"""

from __future__ import annotations

from torch import nn


class Stem(nn.Module):
    """Geometry shared by the stems: a fixed ``img_size`` (H, W) reduced by ``patch_size`` (the
    total stride) to ``grid_size``; subclasses build the layers and define :meth:`forward` and
    :meth:`macs`."""

    strict_img_size = True
    dynamic_img_size = False

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        **unused,
    ) -> None:
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans, self.embed_dim = in_chans, embed_dim

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return self.patch_size[0] if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def macs(self) -> int:
        """Multiply-adds of one image through the stem (fvcore's convention)."""
        raise NotImplementedError


def conv_macs(conv: nn.Conv2d, out_hw: tuple[int, int]) -> int:
    """fvcore's count of a convolution: output elements × (input channels / groups) × kernel area."""
    kh, kw = conv.kernel_size
    return out_hw[0] * out_hw[1] * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw


def conv_out(size: tuple[int, int], conv: nn.Module) -> tuple[int, int]:
    """Spatial output size of a Conv2d or an Unfold on ``size`` (H, W)."""
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    k, s, p = pair(conv.kernel_size), pair(conv.stride), pair(conv.padding)
    return tuple((size[i] + 2 * p[i] - k[i]) // s[i] + 1 for i in range(2))
