import os

import pytest
import timm
import torch

from atmerge import data


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


SHARED_SKIP = "needs the shared data"  # every skip for missing shared data starts so (counted in the summary)


def _missing_shared(what: str) -> None:
    if os.environ.get("ATMERGE_REQUIRE_SHARED") == "1":
        pytest.fail(f"{what} missing (ATMERGE_REQUIRE_SHARED=1)")
    pytest.skip(f"{SHARED_SKIP}: {what} missing")


def require_shared(relative: str):
    """Path of a shared file; skips the test when the shared folder is absent, unless
    ATMERGE_REQUIRE_SHARED=1 (set by CI), where a missing file fails the test."""
    path = data.shared_dir() / relative
    if not path.exists():
        _missing_shared(f"shared file {path}")
    return path


def pytest_runtest_setup(item):
    """A test marked ``@pytest.mark.shared`` needs the shared folder (large data and weights)."""
    if item.get_closest_marker("shared") is not None:
        root = data.shared_dir()
        if not ((root / "data").is_dir() and (root / "models").is_dir()):
            _missing_shared(f"shared folder {root} (data/ and models/)")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say how many tests did not run for want of the shared data, and why: never a silently
    hollow green run."""
    skipped = [
        r
        for r in terminalreporter.stats.get("skipped", [])
        if isinstance(r.longrepr, tuple) and SHARED_SKIP in str(r.longrepr[2])
    ]
    if skipped:
        terminalreporter.write_sep("=", f"{len(skipped)} tests skipped: they need the shared data", yellow=True)
        terminalreporter.write_line(
            f"The shared folder {data.shared_dir()} (ATMERGE_SHARED, default ../shared beside the repository) lacks "
            "the large data or weights these tests use (CIFAR-10 train/test, DINOv2-S, ImageNet photos); the core "
            "suite ran on the default that ships with the package. Point ATMERGE_SHARED at the shared folder to run "
            "them; ATMERGE_REQUIRE_SHARED=1 (CI) makes them fail instead of skip."
        )


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
    """The CIFAR-10 reference ViT: the shared float32 weights, else the float16 copy the package ships."""
    from atmerge import checkpoints

    return checkpoints.cifar10_reference_vit()


@pytest.fixture(scope="session")
def cifar_images():
    require_shared("data/cifar10-test.tar.gz")
    ds = data.image_folder(data.cifar10_folder("test"), data.cifar10_transform())
    idx = [0, 600, 1200, 1800, 2400, 3000, 3600, 4200]
    xs, ys = zip(*(ds[i] for i in idx))
    return torch.stack(xs), torch.tensor(ys)
