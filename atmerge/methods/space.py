"""Search spaces: the settings of a method that a tuner may vary, and their ranges.

Every method class declares its own (``Method.search_space(depth, num_patches)``), so that the
Optuna search gives each method the same machinery and the same number of trials over its own
settings; nothing else lists them again.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SearchRange:
    """One dimension of a search: one searchable setting, a float in [low, high] (on a ``step`` grid, or log-uniform with
    ``log``), an integer in [low, high], or one of ``choices``."""

    low: float = 0.0
    high: float = 1.0
    step: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial, name: str) -> Any:
        """Draw the value of ``name`` from an Optuna trial."""
        if self.choices is not None:
            return trial.suggest_categorical(name, list(self.choices))
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high))
        value = trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)
        return round(value, 6)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this range holds (on its grid, for a stepped float)."""
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        if self.integer:
            return float(value).is_integer()
        return self.step is None or abs((value - self.low) / self.step - round((value - self.low) / self.step)) < 1e-6

    def describe(self) -> str:
        if self.choices is not None:
            return "{" + ", ".join(map(str, self.choices)) + "}"
        kind = "int " if self.integer else ("log " if self.log else "")
        grid = f" step {self.step}" if self.step else ""
        return f"{kind}[{self.low}, {self.high}]{grid}"


def starting_point(method, space: dict[str, SearchRange]) -> dict[str, Any]:
    """The searched settings of ``method`` itself that lie in ``space`` (ranges named after its
    fields), so that a search can try the method's own defaults first."""
    return {
        name: getattr(method, name)
        for name, search_range in space.items()
        if hasattr(method, name) and search_range.contains(getattr(method, name))
    }


def floats(low: float, high: float, step: float | None = None, log: bool = False) -> SearchRange:
    return SearchRange(low, high, step, log)


def ints(low: int, high: int) -> SearchRange:
    return SearchRange(low, high, integer=True)


def choice(*options: Any) -> SearchRange:
    return SearchRange(choices=tuple(options))


def fixed_count_limit(depth: int, num_patches: int) -> int:
    """Upper end of a per-block count r in the searches: 1.5 × patches / depth (24 for DeiT-S,
    whose papers use r ≤ 16; 8 for the 65-token CIFAR ViT), so that r × depth can remove
    every patch."""
    return max(1, math.ceil(1.5 * num_patches / depth))


def __getattr__(name: str):
    """``Knob``: the old name of :class:`SearchRange` (a search dimension, not the one-knob cost
    dial of ``Method.one_knob``), kept for one release."""
    if name == "Knob":
        warnings.warn(
            "atmerge.methods.space.Knob is renamed SearchRange; the old name will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return SearchRange
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
