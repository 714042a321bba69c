"""Where the shared data and weights live, and ImageFolder datasets with a model's preprocessing.

The shared folder (real images and weights, never part of this repository) is found from the
``ATMERGE_SHARED`` environment variable, else ``../shared`` beside the repository checkout.
Archives are unpacked once into ``ATMERGE_CACHE`` (default ``~/.cache/atmerge``).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import torch
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def shared_dir() -> Path:
    """The shared data folder: $ATMERGE_SHARED, else <repository>/../shared."""
    env = os.environ.get("ATMERGE_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


def cache_dir() -> Path:
    return Path(os.environ.get("ATMERGE_CACHE", Path.home() / ".cache" / "atmerge"))


def shared_file(relative: str) -> Path:
    """A file of the shared folder, with a clear error if it is missing."""
    path = shared_dir() / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found; set ATMERGE_SHARED to the folder holding data/ and models/ "
            f"(currently {shared_dir()})"
        )
    return path


def unpacked(archive: str) -> Path:
    """Unpack ``data/<archive>`` of the shared folder into the cache once; return the folder."""
    src = shared_file(f"data/{archive}")
    dest = cache_dir() / archive.split(".")[0]
    done = dest / ".complete"
    if not done.exists():
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(src) as tar:
            tar.extractall(dest, filter="data")
        done.touch()
    return dest


def cifar10_folder(split: str = "test") -> Path:
    """ImageFolder root of the shared CIFAR-10 split ('train' or 'test')."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; choose 'train' or 'test'")
    return unpacked(f"cifar10-{split}.tar.gz") / split


def imagenet_samples_folder() -> Path:
    """Folder of the 1,000 shared ImageNet photos (one per class, flat)."""
    return unpacked("imagenet-samples.tar") / "imagenet-samples"


def load_image(path: str | Path) -> "PIL.Image.Image":  # noqa: F821
    """The RGB image at ``path``; a file that is not a readable image gives a ValueError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as e:  # PIL.UnidentifiedImageError and truncated files are OSErrors
        raise ValueError(f"{path} is not a readable image ({e}); remove or replace it") from None


def image_folder(root: str | Path, transform) -> "torchvision.datasets.ImageFolder":  # noqa: F821
    """torchvision ImageFolder with clear errors for a missing folder and for unreadable images."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist; pass a folder of class folders (ImageFolder)")
    return ImageFolder(str(root), transform=transform, loader=load_image)


def model_transform(model: nn.Module):
    """The model's own timm evaluation preprocessing (resize, crop, normalise), at the image size
    the model was built for (timm's pretrained config may name another, e.g. 518 for DINOv2)."""
    import timm.data

    config = timm.data.resolve_data_config({}, model=model)
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        config["input_size"] = (config["input_size"][0], *pe.img_size)
    return timm.data.create_transform(**config)


def normalization(transform) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the Normalize step of a torchvision transform ((0,0,0), (1,1,1) if none), or
    what a transform that knows its own says (``transform.normalization``, e.g. a Hugging Face
    image processor's, :class:`atmerge.experiments.hf.ProcessorTransform`)."""
    own = getattr(transform, "normalization", None)
    if own is not None:
        return own
    for t in getattr(transform, "transforms", [transform]):
        if type(t).__name__ == "Normalize":
            return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def cifar10_transform():
    """Preprocessing of the shared CIFAR-10 reference ViT: 32×32, no resize, CIFAR mean/std."""
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])


def subset(dataset, limit: int | None, seed: int = 0):
    """A seeded random subset of ``limit`` items (all of them when limit is None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:limit].sort().values.tolist()
    return torch.utils.data.Subset(dataset, idx)
