"""Methods by name, for the command line and for result files."""

from __future__ import annotations

import dataclasses

# Importing the built-in methods registers them (each class is decorated with register_method).
# In this order (the order of method lists and tables): ATM, ToMe, top-r, constant θ, EViT, MCTF, Zero-TP, frozen.
import atmerge.methods.atm  # noqa: F401, I001
import atmerge.methods.tome  # noqa: F401, I001
import atmerge.methods.topr  # noqa: F401, I001
import atmerge.methods.constant  # noqa: F401, I001
import atmerge.methods.evit  # noqa: F401, I001
import atmerge.methods.mctf  # noqa: F401, I001
import atmerge.methods.zerotp  # noqa: F401, I001
import atmerge.methods.frozen  # noqa: F401, I001
from atmerge.methods.base import METHODS, Method, register_method  # noqa: F401  (re-exported)

# The built-ins in the order above, whichever module was imported first (a method module imported
# directly registers itself early); methods registered later (plug-ins, tests) follow.
_BUILT_IN = ("atm", "tome", "topr", "constant", "evit", "mctf", "zerotp", "frozen")
for _name in [*(n for n in _BUILT_IN if n in METHODS), *(n for n in list(METHODS) if n not in _BUILT_IN)]:
    METHODS[_name] = METHODS.pop(_name)


def method_names() -> list[str]:
    return sorted(METHODS)


def build_method(name: str, **settings) -> Method:
    """``build_method('atm', alpha=0.99)``; settings left out (or None) keep their defaults.

    Raises ValueError naming the method or setting that does not exist."""
    cls = METHODS.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(method_names())}")
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in settings.items() if v is not None}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"{', '.join(unknown)} does not apply to {name}; its settings: {', '.join(sorted(fields))}")
    return cls(**given)


def method_settings(method: Method) -> dict:
    """The method's name and settings, JSON-ready."""
    name = next(k for k, v in METHODS.items() if type(method) is v)
    return {
        "method": name,
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(method).items()},
    }


def knob_factory(name: str, depth: int, num_patches: int, **fixed):
    """A one-knob family of method ``name`` for budget matching and accuracy–GFLOPs curves:
    ``factory(t)`` for t in [0, 1], cost growing with t (t = 1: little or no reduction); each
    method defines its family (:meth:`Method.one_knob`: thresholds 0.5 + 0.5 t, counts
    r_max (1 − t), EViT's keep rate t)."""
    cls = METHODS.get(name)
    if cls is None:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(method_names())}")
    return lambda t: cls.one_knob(t, depth, num_patches, **fixed)
