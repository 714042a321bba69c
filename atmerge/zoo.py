"""Local checkpoints of the shared folder, loaded into timm models (no download)."""

from __future__ import annotations

from pathlib import Path

import timm
from safetensors.torch import load_file
from torch import nn

from atmerge.data import shared_file


def create_model(model_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm.create_model, with a one-line ValueError for a name timm does not know."""
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"unknown timm model {model_name!r}") from None
        raise


def load_checkpoint(model_name: str, checkpoint: str | Path, **kwargs) -> nn.Module:
    """timm.create_model(model_name, **kwargs) with weights from a safetensors file, in eval mode."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a file; pass a .safetensors file")
    try:
        state = load_file(str(path))
    except PermissionError:
        raise ValueError(f"checkpoint {path} cannot be read (permission denied)") from None
    except Exception as e:  # safetensors raises its own error type for a file in another format
        raise ValueError(f"checkpoint {path} is not a safetensors file ({e}); convert it with safetensors.torch.save_file") from None
    model = create_model(model_name, **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split("\n\t")[1:2]) or str(e).splitlines()[0]
        raise ValueError(
            f"checkpoint {path} does not fit {model_name} with {kwargs or 'its default settings'} "
            f"(pass the model's settings with --model-kwargs): {detail.strip()[:300]}"
        ) from None
    return model.eval()


def cifar10_reference_vit() -> nn.Module:
    """The shared supervised CIFAR-10 ViT (ViT-Ti shape, 32×32 input, patch 4, 65 tokens)."""
    return load_checkpoint(
        "vit_tiny_patch16_224",
        shared_file("models/cifar10_vit_tiny_p4.safetensors"),
        img_size=32,
        patch_size=4,
        num_classes=10,
    )


def dinov2_small() -> nn.Module:
    """The shared DINOv2-S/14 backbone at 224 px (257 tokens, no head: outputs the CLS feature)."""
    return load_checkpoint(
        "vit_small_patch14_dinov2",
        shared_file("models/dinov2_small_imgfocus.safetensors"),
        img_size=224,
        num_classes=0,
    )


