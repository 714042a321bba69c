"""Generic model surgery shared by every adapter: swap a module's class for a patched subclass
(importable by name, so patched models pickle), undo it, and find the merge state."""

from __future__ import annotations

import sys

import torch.fx
from torch import nn

from atmerge.runtime import MergeState

STATE = "_atmerge_state"
INDEX = "_atmerge_block"
ORIGINAL = "_atmerge_original_class"
PREFIX = "Merging"
_CLASS_CACHE: dict[type, type] = {}
SCRIPT_REFUSED = (
    "torch.jit.script does not support a model patched by atmerge (its token merging is data-dependent "
    "Python); use torch.compile(model), or torch.export.export(model, (images,)) for a fixed-count method such as "
    "ToMe, or atmerge.unpatch(model) first"
)
FX_REFUSED = (
    "torch.fx symbolic tracing (torch.fx.symbolic_trace, timm/torchvision create_feature_extractor) does not "
    "support a model patched by atmerge (its token merging is data-dependent); use torch.compile(model), or "
    "torch.export.export(model, (images,)) for a fixed-count method such as ToMe, or trace the unpatched model "
    "(atmerge.unpatch(model))"
)


def _refuse_script(self):
    """torch.jit.script calls this on every module before compiling anything: refusing here leaves
    the model as it was (no half-compiled class), so it still runs and a second attempt says the same."""
    raise RuntimeError(SCRIPT_REFUSED)


def refuse_fx(x: object) -> None:
    """Raise RuntimeError (:data:`FX_REFUSED`) if ``x`` is a torch.fx Proxy (symbolic tracing)."""
    if isinstance(x, torch.fx.Proxy):
        raise RuntimeError(FX_REFUSED)


def patched_class(cls: type, methods: dict, module_name: str) -> type:
    """The patched subclass of ``cls`` overriding ``methods``; also an attribute of the adapter
    module ``module_name`` (as ``Merging<Name>``), so that pickled patched models load."""
    if cls not in _CLASS_CACHE:
        name = PREFIX + cls.__name__
        namespace = {
            "__prepare_scriptable__": _refuse_script,
            **methods,
            "__module__": module_name,
            "__qualname__": name,
        }
        _CLASS_CACHE[cls] = new = type(name, (cls,), namespace)
        for attr, value in methods.items():  # undo wrapping by __init_subclass__ (transformers' layers):
            if callable(value) and vars(new).get(attr) is not value:  # the patched method handles it itself
                setattr(new, attr, value)
        vars(sys.modules[module_name]).setdefault(name, _CLASS_CACHE[cls])
    return _CLASS_CACHE[cls]


def is_patched(model: nn.Module) -> bool:
    return hasattr(model, STATE)


def patch_model(model: nn.Module, adapter, state: MergeState) -> nn.Module:
    """Patch ``model`` in place with ``adapter``'s classes; every block shares ``state``."""
    if is_patched(model):
        unpatch_model(model)
    module_name = type(adapter).__module__
    for module in adapter.patched_modules(model):
        original = type(module)
        setattr(module, ORIGINAL, original)
        module.__class__ = patched_class(original, adapter.patched_methods(original), module_name)
    setattr(model, STATE, state)
    for i, block in enumerate(adapter.blocks(model)):
        object.__setattr__(block, STATE, state)  # a plain attribute, not a submodule
        setattr(block, INDEX, i)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model`; a model that isn't patched is returned unchanged."""
    if not is_patched(model):
        return model
    for module in model.modules():
        if ORIGINAL in module.__dict__:
            module.__class__ = module.__dict__[ORIGINAL]
            for name in (ORIGINAL, STATE, INDEX):
                if name in module.__dict__:
                    delattr(module, name)
    return model


def merge_state(model: nn.Module) -> MergeState:
    """The :class:`MergeState` of a patched model (ValueError if it isn't patched)."""
    if not is_patched(model):
        raise ValueError("this model is not patched; call atmerge.patch(model, method) first")
    return getattr(model, STATE)
