"""What atmerge's own timm model definitions (LV-ViT, T2T-ViT, fine-tuned MAE) share: building
one from its registered name with the data config of its official evaluation."""

from __future__ import annotations

from torch import nn

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")  # what timm.create_model adds


def build(cls: type, variant: str, pretrained: bool, crop_pct: float, first_conv: str, **kwargs) -> nn.Module:
    """``cls(**kwargs)`` with a timm ``pretrained_cfg`` (the model's image size, bicubic, ImageNet mean/std,
    ``crop_pct``) so that ``timm.data.resolve_data_config`` gives the official preprocessing.
    There are no hub weights: ``pretrained=True`` is refused with a pointer to ``--checkpoint``."""
    if pretrained:
        raise ValueError(
            f"{variant} has no hub weights in atmerge; load the official checkpoint "
            f"(atmerge eval --model {variant} --checkpoint FILE, or atmerge.checkpoints.load_weights)"
        )
    model = cls(**{k: v for k, v in kwargs.items() if k not in TIMM_ONLY})
    model.pretrained_cfg = dict(
        architecture=variant,
        input_size=(3, *model.patch_embed.img_size),
        crop_pct=crop_pct,
        interpolation="bicubic",
        num_classes=model.num_classes,
        first_conv=first_conv,
        classifier="head",
        **IMAGENET,
    )
    return model
