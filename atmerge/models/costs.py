"""Per-token multiply-adds read off torch modules, in fvcore's convention (one multiply-add = one
FLOP, weights only, no bias), for every model adapter; the arithmetic is :mod:`atmerge.flops`."""

from __future__ import annotations

from torch import nn


def layer_norm_macs(module: nn.Module | None) -> int:
    """Per-call LayerNorm cost per vector (fvcore: 5 per element with affine weights, 4 without);
    0 for anything that is not a LayerNorm (an Identity, None)."""
    if not isinstance(module, nn.LayerNorm):
        return 0
    numel = 1
    for d in module.normalized_shape:
        numel *= d
    return numel * (5 if module.elementwise_affine else 4)


def linear_macs(module: nn.Module | None) -> int:
    """Multiply-adds per token of all Linear layers (and LayerNorms) inside ``module``."""
    if module is None:
        return 0
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel()
        total += layer_norm_macs(m)
    return total
