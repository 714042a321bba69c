"""Local checkpoints (safetensors or PyTorch files, and the shared folder's), loaded into timm models
(no download)."""

from __future__ import annotations

import argparse
import contextlib
import re
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from atmerge.data import EMBEDDED_WEIGHTS, has_shared, shared_file


def create_model(model_name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm.create_model, with a one-line ValueError for a name timm does not know."""
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"unknown timm model {model_name!r}") from None
        raise


# Where a checkpoint dict may hold its weights, in order of preference: the trained weights
# before their exponential moving average (DeiT, MAE: "model"; timm, LV-ViT, T2T-ViT: "state_dict").
STATE_DICT_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")
TORCH_SUFFIXES = ".pth, .pth.tar, .pt, .bin"


def load_checkpoint(model_name: str, checkpoint: str | Path, **kwargs) -> nn.Module:
    """timm.create_model(model_name, **kwargs) with the weights of ``checkpoint`` (see
    :func:`load_weights`), in eval mode."""
    model = create_model(model_name, **kwargs)
    return load_weights(model, checkpoint, described_as=f"{model_name} with {kwargs or 'its default settings'}").eval()


def load_weights(model: nn.Module, checkpoint: str | Path, *, described_as: str | None = None) -> nn.Module:
    """Load the weights of ``checkpoint`` (read by :func:`read_state_dict`) into ``model``, strictly:
    every key, every shape.  ``described_as`` names the model in errors (default: its class).

    Before loading, a ``convert_checkpoint(state) -> state`` of the model's class (a staticmethod
    or classmethod a model family may define to rename an official checkpoint's keys) is applied.
    """
    path = Path(checkpoint)
    state = read_state_dict(path)
    convert = getattr(type(model), "convert_checkpoint", None)
    if callable(convert):
        state = convert(state)
    described_as = described_as or type(model).__name__
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {_shape(state[k])} in the checkpoint vs {_shape(v)} in the model"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"keys missing: {len(missing)}{_some(missing)}", f"unexpected: {len(unexpected)}{_some(unexpected)}"]
        if mismatched:
            parts.append(f"shape mismatches: {len(mismatched)}{_some(mismatched)}")
        raise ValueError(
            f"checkpoint {path} does not fit {described_as} (check the model name and pass the model's "
            f"settings with --model-kwargs): {'; '.join(parts)}"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not fit {described_as}: {str(e).splitlines()[0][:300]}") from None
    return model


def read_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a safetensors file or of a PyTorch file, told apart by content.

    A PyTorch file is read with ``torch.load(weights_only=True)`` (no code is unpickled); it may
    hold the state dict itself or a dict with it under one of ``STATE_DICT_KEYS``, taken in that
    order: "model", "state_dict", then the EMA weights "model_ema", "state_dict_ema".  A leading
    "module." (DataParallel) is stripped when every key has it.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if not path.is_file():
        raise ValueError(
            f"checkpoint {path} is not a file; pass a .safetensors file or a PyTorch file ({TORCH_SUFFIXES})"
        )
    try:
        with path.open("rb") as f:
            head = f.read(9)
        if head[8:] == b"{":  # safetensors: the length of its JSON header (8 bytes), then the header
            state = _read_safetensors(path)
        elif head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):  # torch.save: zip, or legacy pickle
            state = _pick_state_dict(_read_torch(path), path)
        else:
            raise ValueError(
                f"checkpoint {path} is not a safetensors file nor a PyTorch file; pass weights saved "
                "with safetensors.torch.save_file or torch.save"
            )
    except PermissionError:
        raise ValueError(f"checkpoint {path} cannot be read (permission denied)") from None
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except PermissionError:
        raise
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise ValueError(
            f"checkpoint {path} is not a safetensors file that can be read ({e}); it may be truncated or damaged"
        ) from None


# Plain-data classes that training scripts store beside the weights (timm's train.py and the
# official LV-ViT / T2T-ViT checkpoints keep their argparse options under "args"); unpickling
# them runs no code of theirs, so weights_only loading may accept them.
SAFE_GLOBALS = [argparse.Namespace]


def _read_torch(path: Path) -> object:
    try:
        allow = getattr(torch.serialization, "safe_globals", None)  # torch ≥ 2.5
        with path.open("rb") as f, allow(SAFE_GLOBALS) if allow else contextlib.nullcontext():
            # a file object: torch.load would go by a .safetensors suffix
            return torch.load(f, map_location="cpu", weights_only=True)
    except PermissionError:
        raise
    except Exception as e:
        message = str(e)
        if "Weights only load failed" not in message:
            first = message.strip().splitlines()[0][:200] if message.strip() else type(e).__name__
            raise ValueError(
                f"checkpoint {path} is not a safetensors file nor a readable PyTorch file ({first})"
            ) from None
        needed = re.search(r"GLOBAL ([\w.]+)", message)
        raise ValueError(
            f"checkpoint {path} needs code to unpickle"
            + (f" (it holds {needed.group(1)})" if needed else "")
            + "; atmerge loads weights only (torch.load with weights_only=True): where you trust the file, "
            "re-save its state_dict alone with torch.save"
        ) from None


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _pick_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """``obj`` itself if it is a state dict, else the first state dict under ``STATE_DICT_KEYS``."""
    if _is_state_dict(obj):
        return dict(obj)
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    for key in STATE_DICT_KEYS:
        if _is_state_dict(obj.get(key)):
            return dict(obj[key])
    keys = ", ".join(repr(k) for k in list(obj)[:10]) + (f" and {len(obj) - 10} more" if len(obj) > 10 else "")
    raise ValueError(
        f"checkpoint {path} holds no state dict: a dict with keys {keys or 'none'} "
        f"(atmerge looks for a dict of tensors, or one under {', '.join(map(repr, STATE_DICT_KEYS))})"
    )


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


def _some(items: list[str], count: int = 3) -> str:
    """' (a, b, c, ...)' naming the first ``count`` items; '' for none."""
    if not items:
        return ""
    return f" ({', '.join(items[:count])}{', ...' if len(items) > count else ''})"


CIFAR10_VIT = "models/cifar10_vit_tiny_p4.safetensors"


def cifar10_reference_weights() -> Path:
    """The reference ViT's weights: the shared float32 file when present, else the float16 copy
    that ships with the package (same top-1 on cifar10-test within 0.1 point; its metadata
    records both)."""
    if has_shared(CIFAR10_VIT) or not EMBEDDED_WEIGHTS.exists():
        return shared_file(CIFAR10_VIT)
    return EMBEDDED_WEIGHTS


def cifar10_reference_vit() -> nn.Module:
    """The project's supervised CIFAR-10 ViT (ViT-Ti shape, 32×32 input, patch 4, 65 tokens),
    from :func:`cifar10_reference_weights`, in float32."""
    model = load_checkpoint(
        "vit_tiny_patch16_224",
        cifar10_reference_weights(),
        img_size=32,
        patch_size=4,
        num_classes=10,
    )
    return model.float()


def dinov2_small() -> nn.Module:
    """The shared DINOv2-S/14 backbone at 224 px (257 tokens, no head: outputs the CLS feature)."""
    return load_checkpoint(
        "vit_small_patch14_dinov2",
        shared_file("models/dinov2_small_imgfocus.safetensors"),
        img_size=224,
        num_classes=0,
    )
