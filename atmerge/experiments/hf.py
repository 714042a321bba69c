"""Hugging Face ``transformers`` models for experiments (``--hf-model``): a ``save_pretrained``
directory or a hub name, preprocessed by the model's own image processor.

``transformers`` is imported only here, and only when :func:`load_hf_setup` is called.
"""

from __future__ import annotations

from pathlib import Path

import torch

from atmerge.experiments.loaded import Setup

CLASSIFIERS = ("ForImageClassification", "ForImageClassificationWithTeacher")


class ProcessorTransform:
    """A torchvision-style transform (PIL image → [C, H, W] tensor) that runs a Hugging Face
    image processor: ``processor(images=image)["pixel_values"][0]``."""

    def __init__(self, processor: object) -> None:
        self.processor = processor

    def __call__(self, image: object) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the processor normalises with ((0,0,0), (1,1,1) if it does not)."""
        p = self.processor
        if not getattr(p, "do_normalize", False) or getattr(p, "image_mean", None) is None:
            return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return tuple(float(v) for v in p.image_mean), tuple(float(v) for v in p.image_std)

    def __repr__(self) -> str:
        return f"ProcessorTransform({type(self.processor).__name__})"


def _first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an error's message, at most ``limit`` characters."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _local_directory(name: str) -> Path | None:
    """The directory ``name`` names, None for a hub name; a path that is not a
    ``save_pretrained`` directory gives a one-line error."""
    path = Path(name).expanduser()
    if not path.exists():
        if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
            raise FileNotFoundError(
                f"--hf-model directory {name} does not exist; pass a directory written by "
                "save_pretrained or a Hugging Face hub name"
            )
        return None  # a hub name, e.g. facebook/deit-small-patch16-224
    if not path.is_dir():
        raise ValueError(
            f"--hf-model {name} is a file; pass a directory written by save_pretrained or a Hugging Face hub name"
        )
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--hf-model {name} has no config.json; pass a directory written by model.save_pretrained(dir)"
        )
    return path


def model_class(config: object, transformers: object) -> type:
    """The class to load a checkpoint with: the architecture it was saved as where transformers
    has it (``config.architectures``), else ``AutoModelForImageClassification`` for a
    classification architecture and ``AutoModel`` (a feature model) otherwise."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    if any(name.endswith(CLASSIFIERS) for name in names):
        return transformers.AutoModelForImageClassification
    return transformers.AutoModel


def _transformers() -> object:
    """The ``transformers`` module; a one-line error says how to install it."""
    try:
        import transformers
    except ImportError:
        raise ValueError('--hf-model needs Hugging Face transformers: pip install "atmerge[hf]"') from None
    return transformers


def load_hf_model(name: str) -> torch.nn.Module:
    """The model at ``name`` (a ``save_pretrained`` directory or a hub name), float32, in eval
    mode; one that atmerge cannot patch gives a one-line error naming its class."""
    from atmerge.models.adapter import UnsupportedModelError, check_supported

    transformers = _transformers()
    local = _local_directory(name)
    where = str(local) if local is not None else name
    try:
        config = transformers.AutoConfig.from_pretrained(where)
        model = model_class(config, transformers).from_pretrained(where, config=config, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        if local is not None:
            raise ValueError(
                f"--hf-model {name}: the directory's model could not be loaded: {_first_line(e)}"
            ) from None
        raise ValueError(
            f"--hf-model {name} is not a local directory and could not be loaded from the Hugging Face "
            f"hub: {_first_line(e)}"
        ) from None
    try:
        check_supported(model)
    except UnsupportedModelError as e:
        raise ValueError(f"--hf-model {name}: {_first_line(e)}") from None
    return model.eval()


def load_hf_processor(name: str) -> ProcessorTransform:
    """The image processor saved beside the model at ``name``, as a transform for ImageFolder."""
    transformers = _transformers()
    local = _local_directory(name)
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(str(local) if local is not None else name)
    except (OSError, ValueError, KeyError) as e:
        if local is not None and not (local / "preprocessor_config.json").is_file():
            raise ValueError(
                f"--hf-model {name} has no image processor config (preprocessor_config.json); save "
                f"the model's processor there: processor.save_pretrained({str(local)!r})"
            ) from None
        raise ValueError(f"--hf-model {name}: its image processor could not be loaded: {_first_line(e)}") from None
    return ProcessorTransform(processor)


def load_hf_setup(name: str) -> Setup:
    """A :class:`Setup` of the Hugging Face model ``name`` (a ``save_pretrained`` directory or a
    hub name) with its own image processor as the preprocessing; no default data."""
    if _local_directory(name) is not None:  # a directory without a processor fails before the weights load
        transform = load_hf_processor(name)
        model = load_hf_model(name)
    else:  # a hub name: the model first, whose error says whether the hub was reached
        model = load_hf_model(name)
        transform = load_hf_processor(name)
    description = {"hf_model": name, "class": type(model).__name__}
    return Setup(model, transform, None, description)
