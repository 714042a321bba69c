"""Old module paths kept for one release after a rename (so that each module's name says its job).

Each old path is a small module that calls :func:`renamed` with the module(s) that now hold its
names: importing it warns ``DeprecationWarning`` once, naming the new path, and every name —
public or private, so pickles and ``from old import name`` keep working — is looked up in the
new module(s), in the order given.
"""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

_PACKAGE_INIT = str(Path(__file__).with_name("__init__.py"))  # its lazy ``atmerge.<name>`` imports


def _internal(frame) -> bool:
    """A frame of the import system, which ``warnings.warn`` skips itself when it counts levels."""
    return "importlib" in frame.f_code.co_filename and "_bootstrap" in frame.f_code.co_filename


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside this file, the alias module, the package's lazy
    loader and the import machinery: the line that imported the old path."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        frame.f_code.co_filename in (__file__, _PACKAGE_INIT)
        or "importlib" in frame.f_code.co_filename
        or frame.f_globals.get("__atmerge_renamed__")
    ):
        frame = frame.f_back
        if frame is not None and not _internal(frame):
            level += 1
    return level


def renamed(old: str, *new: types.ModuleType) -> None:
    """Make the module ``old`` (being imported) a deprecated alias of ``new``: warn once, forward
    every attribute to the first of ``new`` that has it, and list their public names."""
    module = sys.modules[old]
    module.__atmerge_renamed__ = True
    public = [n for m in new for n in getattr(m, "__all__", [k for k in vars(m) if not k.startswith("_")])]
    names = ", ".join(m.__name__ for m in new)

    def __getattr__(name: str):
        for m in new:
            if hasattr(m, name):
                return getattr(m, name)
        raise AttributeError(f"module {old!r} (now {names}) has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(module), *public})

    module.__getattr__ = __getattr__
    module.__dir__ = __dir__
    module.__all__ = list(dict.fromkeys(public))
    warnings.warn(
        f"{old} is renamed {' and '.join(m.__name__ for m in new)}; the old path will be removed in the next release",
        DeprecationWarning,
        stacklevel=_caller_level(),
    )
