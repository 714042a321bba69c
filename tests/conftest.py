import os

import pytest
import timm
import torch

from atmerge import data


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def require_shared(relative: str):
    """Path of a shared file; skips the test when the shared folder is absent, unless
    ATMERGE_REQUIRE_SHARED=1 (set by CI), where a missing file fails the test."""
    path = data.shared_dir() / relative
    if not path.exists():
        if os.environ.get("ATMERGE_REQUIRE_SHARED") == "1":
            pytest.fail(f"shared file {path} missing")
        pytest.skip(f"shared file {path} missing")
    return path


def small_vit(**kwargs) -> torch.nn.Module:
    """A small random-init timm ViT (32×32 images, patch 4 → 64 patches)."""
    defaults = dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=10)
    defaults.update(kwargs)
    return timm.models.vision_transformer.VisionTransformer(**defaults).eval()


# small_vit variants that every reference comparison runs on
SMALL_MODEL_VARIANTS = [
    dict(),  # CLS token, token pooling
    dict(class_token=False, global_pool="avg"),  # no prefix token, size-weighted average pooling
    dict(reg_tokens=2, global_pool="avg", fc_norm=True),  # three protected tokens
    dict(init_values=1e-1, qk_norm=True),  # LayerScale and q/k norm
]


def blocky_images(batch: int, size: int = 32, cells: int = 4, noise: float = 0.02, seed: int = 0) -> torch.Tensor:
    """Images made of cells×cells flat colour squares plus a little noise: many near-identical
    patches, so threshold merging has something to merge even in a random-init model."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(batch, 3, cells, cells, generator=g)
    img = torch.nn.functional.interpolate(colours, size=(size, size), mode="nearest")
    return img + noise * torch.randn(img.shape, generator=g)


@pytest.fixture(scope="session")
def cifar_model():
    require_shared("models/cifar10_vit_tiny_p4.safetensors")
    from atmerge import zoo

    return zoo.cifar10_reference_vit()


@pytest.fixture(scope="session")
def cifar_images():
    require_shared("data/cifar10-test.tar.gz")
    ds = data.image_folder(data.cifar10_folder("test"), data.cifar10_transform())
    idx = [0, 600, 1200, 1800, 2400, 3000, 3600, 4200]
    xs, ys = zip(*(ds[i] for i in idx))
    return torch.stack(xs), torch.tensor(ys)
