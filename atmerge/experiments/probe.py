"""`atmerge probe`: a linear classifier on the shared DINOv2-S CLS features, so that DINOv2-S +
head is a real-weights classifier at 224 px (257 tokens) for eval, search and the README."""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import shlex
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from atmerge import checkpoints, data
from atmerge.evaluate import _progress

NUM_CLASSES = 10
WEIGHT_DECAY = 1e-4  # the probe's L2 penalty
ITERATIONS = 200  # L-BFGS iterations (full batch)


def default_probe_path() -> Path:
    return data.cache_dir() / "probes" / "dinov2_small_cifar10.safetensors"


@torch.no_grad()
def extract_features(
    model: nn.Module, dataset, batch_size: int = 64, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (the CLS token after the final norm) and labels of every image."""
    feats, labels = [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for x, y in _progress(loader, progress, "features"):
        feats.append(model.forward_head(model.forward_features(x), pre_logits=True))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def features_path(split: str, limit: int | None, seed: int) -> Path:
    return data.cache_dir() / "features" / f"dinov2_small_cifar10_{split}_{limit or 'all'}_{seed}.safetensors"


def cached_features(model: nn.Module, split: str, limit: int | None, seed: int, progress: bool = True):
    """Features of the shared CIFAR-10 ``split`` (a seeded subset of ``limit`` images), cached."""
    path = features_path(split, limit, seed)
    if path.exists():
        t = load_file(str(path))
        return t["features"], t["labels"]
    dataset = data.subset(data.image_folder(data.cifar10_folder(split), data.model_transform(model)), limit, seed)
    feats, labels = extract_features(model, dataset, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": feats.contiguous(), "labels": labels.contiguous()}, str(path))
    return feats, labels


def train_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int = NUM_CLASSES,
    weight_decay: float = WEIGHT_DECAY,
    iterations: int = ITERATIONS,
    seed: int = 0,
) -> nn.Linear:
    """L2-regularised multinomial logistic regression, full batch, L-BFGS; features are
    standardised internally and the scaling is folded back into the returned layer."""
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    z = (features - mean) / std
    layer = nn.Linear(features.shape[1], num_classes)
    nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(layer(z), labels) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    folded = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        folded.weight.copy_(layer.weight / std)
        folded.bias.copy_(layer.bias - (layer.weight * mean / std).sum(1))
    return folded


def accuracy(layer: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (layer(features).argmax(-1) == labels).float().mean().item()


def run_probe(
    train_images: int | None = 2000,
    test_images: int | None = 1000,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train the probe on a seeded subset of the shared cifar10-train, measure it on cifar10-test,
    save it (safetensors, with its numbers in the metadata) and return the numbers."""
    backbone = checkpoints.dinov2_small()
    cached = {
        split: features_path(split, limit, seed).exists()
        for split, limit in (("train", train_images), ("test", test_images))
    }
    train_x, train_y = cached_features(backbone, "train", train_images, seed, progress)
    test_x, test_y = cached_features(backbone, "test", test_images, seed, progress)
    layer = train_linear_probe(train_x, train_y, seed=seed)
    result = {
        "train_images": len(train_y),
        "test_images": len(test_y),
        "train_top1": accuracy(layer, train_x, train_y),
        "test_top1": accuracy(layer, test_x, test_y),
        "seed": seed,
    }
    how = how_trained(backbone, train_images, test_images, seed, cached)
    path = Path(out) if out else default_probe_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"weight": layer.weight.detach().contiguous(), "bias": layer.bias.detach().contiguous()},
        str(path),
        metadata={k: str(v) for k, v in result.items()},
    )
    result["path"] = str(path)
    result["how_trained"] = how
    return result


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def how_trained(
    backbone: nn.Module, train_images: int | None, test_images: int | None, seed: int, cached: dict[str, bool]
) -> dict:
    """How :func:`run_probe` made the probe: the command line, the backbone's weights (file and
    SHA-256), the images (which split, how many, the seeded subset, the preprocessing), the
    features, the classifier's training settings, versions and the machine."""
    import timm

    weights = data.shared_dir() / "models/dinov2_small_imgfocus.safetensors"
    images = {
        split: {
            "folder": str(data.cifar10_folder(split)),
            "images": limit or "all",
            "subset": f"data.subset(..., {limit}, seed={seed})" if limit else "every image",
            "features_read_from_cache": cached[split],
            "features_cache": str(features_path(split, limit, seed)),
        }
        for split, limit in (("train", train_images), ("test", test_images))
    }
    return {
        "command": shlex.join(["python", *sys.argv]),
        "argv": list(sys.argv),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "backbone": {
            "timm_model": "vit_small_patch14_dinov2",
            "img_size": 224,
            "weights": str(weights),
            "weights_sha256": _sha256(weights) if weights.exists() else None,
        },
        "images": images,
        "preprocessing": repr(data.model_transform(backbone)),
        "features": "the CLS token after the final norm (forward_head pre_logits), float32, batch 64",
        "classifier": {
            "kind": "L2-regularised multinomial logistic regression (linear layer, 10 classes)",
            "optimizer": "L-BFGS, full batch, lr 1.0, strong-Wolfe line search",
            "iterations": ITERATIONS,
            "weight_decay": WEIGHT_DECAY,
            "init": "zeros",
            "features": "standardised; the scaling folded back",
            "seed": seed,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "atmerge": _atmerge_version(),
        },
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }


def _atmerge_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("atmerge")
    except importlib.metadata.PackageNotFoundError:
        return None


def load_probe_classifier(path: str | Path | None = None) -> tuple[nn.Module, Path]:
    """The shared DINOv2-S with the probe as its timm head (10 classes)."""
    path = Path(path) if path else default_probe_path()
    if not path.exists():
        raise FileNotFoundError(f"probe {path} not found; train it first with `atmerge probe`")
    model = checkpoints.dinov2_small()
    model.reset_classifier(NUM_CLASSES)
    head = load_file(str(path))
    model.head.load_state_dict({"weight": head["weight"], "bias": head["bias"]})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "train_images" in meta and "seed" in meta:  # calibrate warns when its images overlap these
        model.atmerge_trained_on = probe_training_files(int(meta["train_images"]), int(meta["seed"]))
    return model.eval(), path


def probe_training_files(train_images: int | None, seed: int) -> frozenset[Path]:
    """The cifar10-train files a probe of ``train_images`` images (seeded subset, as
    :func:`run_probe` draws them) was trained on."""
    samples = data.image_folder(data.cifar10_folder("train"), None).samples
    return frozenset(Path(file) for file, _ in data.subset(samples, train_images, seed))
