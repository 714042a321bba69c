"""Models and data for experiments: a timm name, a local checkpoint, an offline preset, or a
Hugging Face model (:mod:`atmerge.experiments.hf`)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from atmerge import checkpoints, data
from atmerge.experiments.loaded import Setup  # noqa: F401  (re-exported: callers import it from here)

PRESETS = ("cifar10-vit", "dinov2-probe")


def load_setup(
    model_name: str | None = None,
    checkpoint: str | None = None,
    model_kwargs: dict | str | None = None,
    pretrained: bool = False,
    probe: str | None = None,
    hf_model: str | None = None,
) -> Setup:
    """Build the model of an experiment.

    model_name None or 'cifar10-vit': the shared CIFAR-10 reference ViT (default data: the shared
    cifar10-test).  'dinov2-probe': the shared DINOv2-S with the linear head of ``atmerge probe``
    (``probe`` path, default in the cache).  Any other name: ``timm.create_model(model_name,
    pretrained=..., **model_kwargs)``, with weights from ``checkpoint`` (safetensors or an official PyTorch file) if given.
    ``hf_model``: a Hugging Face model instead (a ``save_pretrained`` directory or a hub name,
    :func:`atmerge.experiments.hf.load_hf_setup`); the timm options are then refused.
    """
    if hf_model is not None:
        given = [
            flag
            for flag, value in (
                ("--model", model_name),
                ("--checkpoint", checkpoint),
                ("--model-kwargs", model_kwargs),
                ("--pretrained", pretrained),
                ("--probe", probe),
            )
            if value
        ]
        if given:
            raise ValueError(
                f"--hf-model {hf_model} cannot be combined with {', '.join(given)}; "
                "pass either --hf-model or the timm options (--model, --checkpoint, ...)"
            )
        from atmerge.experiments.hf import load_hf_setup

        return load_hf_setup(hf_model)
    if isinstance(model_kwargs, str):
        try:
            model_kwargs = json.loads(model_kwargs)
        except json.JSONDecodeError as e:
            raise ValueError(f"--model-kwargs must be a JSON object, got {model_kwargs!r} ({e.msg})") from None
    model_kwargs = dict(model_kwargs or {})
    name = model_name or "cifar10-vit"
    cifar = data.ClassNames(list(data.CIFAR10_CLASSES), source="CIFAR-10")
    if name == "cifar10-vit":
        model = checkpoints.cifar10_reference_vit()
        return Setup(
            model,
            data.cifar10_transform(),
            data.cifar10_test_or_sample(),
            {"model": name, "weights": str(checkpoints.cifar10_reference_weights())},
            cifar,
        )
    if name == "dinov2-probe":
        from atmerge.experiments.probe import load_probe_classifier

        model, path = load_probe_classifier(probe)
        return Setup(
            model, data.model_transform(model), data.cifar10_folder("test"), {"model": name, "probe": str(path)}, cifar
        )
    if checkpoint:
        model = checkpoints.load_checkpoint(name, checkpoint, **model_kwargs)
    else:
        model = checkpoints.create_model(name, pretrained, **model_kwargs).eval()
    description = {"model": name, "checkpoint": checkpoint, "model_kwargs": model_kwargs, "pretrained": pretrained}
    return Setup(model, data.model_transform(model), None, description)


def num_classes(model: nn.Module) -> int:
    """The classes of a classifier's head; 0 for a feature model."""
    from atmerge.models.adapter import is_classifier

    if not is_classifier(model):
        return 0
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_labels", None):
        return int(config.num_labels)
    return int(getattr(model, "num_classes", 0) or 0)


def load_dataset(
    setup: Setup,
    folder: str | Path | None,
    limit: int | None = None,
    seed: int = 0,
    *,
    labels: bool | None = True,
    class_map: str | Path | None = None,
):
    """The images of ``folder`` (default: the setup's), preprocessed for the model, labelled
    with the model's own class indices (:func:`atmerge.data.folder_dataset`: class folders
    matched to the model's class names, or by ``class_map``).  labels None: unlabeled folders
    (any layout) are accepted; True: class folders required; False: labels ignored."""
    root = folder or setup.default_data
    if root is None:
        raise ValueError("no data given: pass --data with a folder of images (class folders for top-1)")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    dataset = data.folder_dataset(
        root,
        setup.transform,
        num_classes=num_classes(setup.model),
        names=setup.classes(),
        labels=labels,
        class_map=class_map,
    )
    chosen = data.subset(dataset, limit, seed)
    chosen.description = {**dataset.description, "images": len(chosen)}
    return chosen


def loader(dataset, batch_size: int, workers: int = 0):
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return data.ReadableLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def count_params(model: nn.Module) -> float:
    """Parameters in millions."""
    return sum(p.numel() for p in model.parameters()) / 1e6
