"""The seam between methods and models: a method sees a block's state and returns a decision.

A method never touches modules; a model adapter never decides what merges.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from atmerge.core.merging import Assignment, Merge
from atmerge.methods.space import SearchRange

if TYPE_CHECKING:
    from atmerge.score_profile import ScoreProfile


@dataclass(frozen=True)
class BlockContext:
    """What a method may look at in one block, after attention and before the MLP.

    metric: [B, N, C_h] attention keys of the block averaged over heads.
    size:   [B, N] merge size of every token (1 for original patches).
    block:  index counted from 0; ``depth`` blocks in all.
    num_protected: leading tokens that are never merged (CLS, distillation token, registers).
    tokens: [B, N, C] the tokens after attention (before the MLP).
    attention: [B, H, N, N] this block's attention probabilities, given to methods whose
        ``attention`` is 'current' and to every method whose ``stage`` is 'before_attention'
        (None otherwise).

    For a method whose ``stage`` is 'before_attention' the context describes the tokens that
    *enter* the block (tokens = the residual stream before norm1) and the attention map computed
    on them; otherwise the tokens after attention.

    In per-image inference (``batch_adaptive=False`` with padding, eval mode) a method that merges
    after attention and reads no attention map gets ``tokens`` as a
    :class:`~atmerge.core.packing.PackedTokens` stand-in of shape [B, N, 0]: the values stay packed
    and only their shape is there to read.  A method that needs the token values there must merge
    'before_attention' or read the attention map (both run on the padded layout).
    """

    block: int
    depth: int
    metric: torch.Tensor
    size: torch.Tensor
    num_protected: int
    tokens: torch.Tensor | None = None
    attention: torch.Tensor | None = None

    @property
    def layer(self) -> int:
        """The paper's layer index l, counted from 1."""
        return self.block + 1


@dataclass(frozen=True)
class Decision:
    """A method's answer for one block: which tokens merge, and what to report about it.

    threshold: θ of the block for threshold methods (nan otherwise).
    matching_macs: multiply-adds per image spent on finding the pairs (similarity matrix).
    requested: the count a fixed-count method asked for (None otherwise); when it exceeds what
        the block allows the reduction is clipped and the stats show both numbers.
    """

    merge: Merge | Assignment
    threshold: float = math.nan
    matching_macs: float = 0.0
    requested: int | None = None


def check_number(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> float:
    """Return ``value`` as a float if it lies in [low, high] (or (low, high]), else raise a
    ValueError that names the value and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    below = value <= low if low_open else value < low
    if below or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}={value!r} is out of range; allowed {bracket}{low}, {high}]")
    return float(value)


def check_block_numbers(name: str, value: object) -> tuple[int, ...]:
    """Return ``value`` as a non-empty tuple of block numbers counted from 1, else raise a
    ValueError that names the value."""
    try:
        blocks = tuple(value)
    except TypeError:
        blocks = ()
    if not blocks or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks):
        raise ValueError(f"{name} must be block numbers counted from 1, got {value!r}")
    return blocks


class Method(ABC):
    """A token-reduction policy.  Subclasses implement :meth:`decide`.

    proportional_attention: the method's default for ``patch(..., prop_attn=None)``: whether the
    log merge size is added to the attention logits (True for the merging methods, as their
    papers do; False where the release has no size bias, e.g. EViT).
    attention: whether the method reads this block's attention map: 'none' or 'current' (the
        block then runs attention unfused and hands the map over).
    stage: where the method reduces tokens: 'after_attention' (after the attention residual,
        before the MLP: ATM, ToMe, EViT, Zero-TP) or 'before_attention' (from the attention map
        of the tokens entering the block, which is then merged and reused for the block's
        attention: MCTF's one-step-ahead attention).
    display_name: how result tables and plots name the method.
    batch_adaptive: False makes every image merge its own count (token counts differ between the
    images of a batch, which is then padded: :mod:`atmerge.core.padding`).
    needs_cls_token: the method reads the CLS token's attention; patching a model without one
        is refused.
    adaptive: the token counts depend on the images (a threshold); False for fixed-count methods,
        whose every shape is known before the forward (one static graph: compile, export).
        :func:`atmerge.freeze` turns an adaptive setting into a fixed-count one.
    prunes: the method drops tokens instead of merging them (EViT, Zero-TP); ``method="auto"``
        calibration compares pruning methods only when asked.
    compared_by_auto: False for a method that is made from another one's calibration (Frozen)
        and so is never a candidate of ``method="auto"``.
    """

    proportional_attention: bool = True
    needs_cls_token: bool = False
    attention: str = "none"
    stage: str = "after_attention"
    display_name: str = ""
    batch_adaptive: bool = True
    adaptive: bool = False
    prunes: bool = False
    compared_by_auto: bool = True

    def check_depth(self, depth: int) -> None:
        """Validate settings that depend on the model's depth; raise ValueError if they don't fit."""

    @classmethod
    def search_space(
        cls, depth: int, num_patches: int, profile: "ScoreProfile | None" = None
    ) -> dict[str, SearchRange]:
        """The settings a tuner varies for a model of ``depth`` blocks and ``num_patches``
        patches, with their ranges (see :mod:`atmerge.methods.space`)."""
        return {}

    def label(self, varied: tuple[str, ...] = ()) -> str:
        """The display name plus the settings that differ from the defaults (except ``varied``
        ones), e.g. 'ATM (similarity=centered)'."""
        name = self.display_name or type(self).__name__
        changed = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if f.name not in varied and f.default is not dataclasses.MISSING and getattr(self, f.name) != f.default
        ]
        return f"{name} ({', '.join(changed)})" if changed else name

    def with_params(self, params: dict) -> "Method":
        """This method with the searched settings ``params`` (names of :meth:`search_space`)."""
        return dataclasses.replace(self, **params)

    @classmethod
    def one_knob(cls, t: float, depth: int, num_patches: int, **fixed) -> "Method":
        """The method at knob ``t`` ∈ [0, 1] of a one-knob family whose cost grows with t (t = 1:
        little or no reduction), for budget matching and accuracy–GFLOPs curves; ``fixed``
        settings are kept."""
        raise NotImplementedError(f"{cls.__name__} has no one-knob family")

    def dial(self, depth: int, num_patches: int):
        """This setting's cost dial: a function t ∈ [0, 1] → the method with its
        :meth:`one_knob` setting at t and every other setting of ``self`` kept (cost grows with
        t), to land a tuned setting on a budget; None where the method has no one-knob family."""
        cls = type(self)
        try:
            low, high = cls.one_knob(0.25, depth, num_patches), cls.one_knob(0.75, depth, num_patches)
        except NotImplementedError:
            return None
        fields = [f.name for f in dataclasses.fields(self) if f.init]
        moved = {name for name in fields if getattr(low, name) != getattr(high, name)}
        kept = {name: getattr(self, name) for name in fields if name not in moved}
        return lambda t: cls.one_knob(t, depth, num_patches, **kept)

    @classmethod
    def from_search(cls, params: dict, profile: "ScoreProfile | None" = None) -> dict:
        """The settings that searched values ``params`` stand for, where a space fitted to a
        score profile searches in other units (ATM: score quantile levels → thresholds)."""
        return params

    def searched(self, params: dict, profile: "ScoreProfile | None" = None) -> "Method":
        """This method with searched values ``params`` (of ``search_space(..., profile)``)."""
        return self.with_params(type(self).from_search(params, profile))

    @abstractmethod
    def decide(self, ctx: BlockContext) -> Decision:
        """Choose the merges of one block."""


def knob_r(t: float, num_patches: int, share: float = 1.0) -> int:
    """A fixed count for knob t: share · r_max (1 − t), rounded, with r_max = ⌊num_patches / 2⌋ / 4
    (a quarter of the first block's set A)."""
    return round(max(1, (num_patches // 2) // 4) * (1 - t) * share)


METHODS: dict[str, type["Method"]] = {}
"""Every registered method class by its name (``'atm'``, ``'tome'``, ...): the command line, configs
and result files name methods this way; tests and benches iterate over it."""


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name`` (lower case, unique).

    ``@register_method("tome")`` above ``class ToMe(Method)`` is all a new method needs to be
    found by :func:`atmerge.methods.registry.build_method`, the CLI and the configs."""

    def add(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register_method({name!r}) decorates a Method subclass, got {cls!r}")
        if name != name.lower() or not name.isidentifier():
            raise ValueError(f"method names are lower-case identifiers, got {name!r}")
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"a method named {name!r} is already registered ({METHODS[name].__name__})")
        METHODS[name] = cls
        return cls

    return add
