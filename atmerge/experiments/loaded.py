"""What loading a model for an experiment gives: the model, its preprocessing, its default data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from atmerge import data


@dataclass
class Setup:
    """A model ready for evaluation, its preprocessing, its default data, and how it was made."""

    model: nn.Module
    transform: object
    default_data: Path | None
    description: dict = field(default_factory=dict)
    class_names: data.ClassNames | None = None  # None: the names the model carries, if any

    def classes(self) -> data.ClassNames | None:
        return self.class_names if self.class_names is not None else data.model_class_names(self.model)
