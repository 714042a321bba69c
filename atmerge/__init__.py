"""atmerge: training-free Adaptive Token Merging (ATM) and baselines for timm and HF ViTs.

import timm, atmerge
model = timm.create_model("deit_small_patch16_224", pretrained=True).eval()
atmerge.patch(model, atmerge.ATM(alpha=0.99, beta=0.04, theta_min=0.88))
logits = model(images)
print(atmerge.last_stats(model).gflops)
atmerge.finetune(model, method, "train/", "val/", atmerge.FinetuneConfig(epochs=30))  # merging in the loop

The package loads lazily: ``import atmerge`` imports neither torch nor timm (so ``atmerge --help``
is quick); each public name imports its module on first use.  atmerge's own timm models
(``lvvit_s``, ``t2t_vit_t_14``, ``mae_vit_base_ft``, …) are registered with timm as soon as timm
is imported (before or after atmerge) or any atmerge name is used; :func:`register_models` does
it explicitly.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Each public name and the module that defines it, imported on first use (PEP 562).
_WHERE = {
    "ATM": "atmerge.methods.atm",
    "BlockContext": "atmerge.methods.base",
    "ConstantThreshold": "atmerge.methods.constant",
    "EViT": "atmerge.methods.evit",
    "MCTF": "atmerge.methods.mctf",
    "ZeroTP": "atmerge.methods.zerotp",
    "ToMe": "atmerge.methods.tome",
    "TopR": "atmerge.methods.topr",
    "BudgetMatch": "atmerge.budget",
    "Calibration": "atmerge.calibrate",
    "FingerprintWarning": "atmerge.config",
    "calibrate": "atmerge.calibrate",
    "calibrate_goals": "atmerge.calibrate",
    "load_method": "atmerge.config",
    "save_config": "atmerge.config",
    "EvalResult": "atmerge.evaluate",
    "dense_tokens": "atmerge.api",
    "evaluate": "atmerge.evaluate",
    "FinetuneConfig": "atmerge.finetune",
    "FinetuneResult": "atmerge.finetune",
    "finetune": "atmerge.finetune",
    "match_gflops": "atmerge.budget",
    "Decision": "atmerge.methods.base",
    "MergeStats": "atmerge.stats",
    "Method": "atmerge.methods.base",
    "UnsupportedModelError": "atmerge.models.adapter",
    "gflops": "atmerge.api",
    "is_patched": "atmerge.api",
    "last_stats": "atmerge.api",
    "merge_source": "atmerge.api",
    "merging_error": "atmerge.core.merging",
    "merging_error_bounds": "atmerge.core.merging",
    "unpatch": "atmerge.api",
    "Frozen": "atmerge.methods.frozen",
    "freeze": "atmerge.api",
    "export_onnx": "atmerge.export",
}

__all__ = [
    "ATM",
    "BlockContext",
    "ConstantThreshold",
    "EViT",
    "MCTF",
    "ZeroTP",
    "ToMe",
    "TopR",
    "BudgetMatch",
    "Calibration",
    "FingerprintWarning",
    "calibrate",
    "calibrate_goals",
    "load_method",
    "save_config",
    "EvalResult",
    "dense_tokens",
    "evaluate",
    "FinetuneConfig",
    "FinetuneResult",
    "finetune",
    "match_gflops",
    "Decision",
    "MergeStats",
    "Method",
    "UnsupportedModelError",
    "gflops",
    "is_patched",
    "last_stats",
    "merge_source",
    "merging_error",
    "merging_error_bounds",
    "unpatch",
    "Frozen",
    "freeze",
    "export_onnx",
    "patch",
    "register_models",
]

if TYPE_CHECKING:  # for type checkers and editors; at run time the names load on first use
    from atmerge.api import dense_tokens, freeze, gflops, is_patched, last_stats, merge_source, unpatch
    from atmerge.budget import BudgetMatch, match_gflops
    from atmerge.calibrate import Calibration, calibrate, calibrate_goals
    from atmerge.config import FingerprintWarning, load_method, save_config
    from atmerge.core.merging import merging_error, merging_error_bounds
    from atmerge.evaluate import EvalResult, evaluate
    from atmerge.export import export_onnx
    from atmerge.finetune import FinetuneConfig, FinetuneResult, finetune
    from atmerge.methods.atm import ATM
    from atmerge.methods.base import BlockContext, Decision, Method
    from atmerge.methods.evit import EViT
    from atmerge.methods.tome import ToMe
    from atmerge.methods.topr import TopR
    from atmerge.methods.frozen import Frozen
    from atmerge.methods.mctf import MCTF
    from atmerge.methods.constant import ConstantThreshold
    from atmerge.methods.zerotp import ZeroTP
    from atmerge.models.adapter import UnsupportedModelError
    from atmerge.stats import MergeStats


def register_models() -> None:
    """Register atmerge's own timm models (``lvvit_t/s/m``, ``t2t_vit_t_14/19/24``,
    ``mae_vit_base_ft``) and model families, so that ``timm.create_model("lvvit_s")`` works.
    Done for you once timm is imported or any atmerge name is used; calling it again is free."""
    importlib.import_module("atmerge.models.families")


def __getattr__(name: str):
    """A public name: import its module (and register atmerge's timm models) on first use.  Any
    other name that is a submodule (``atmerge.checkpoints``) is imported as well, as before."""
    if name.startswith("_"):
        raise AttributeError(f"module 'atmerge' has no attribute {name!r}")
    register_models()
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    else:
        try:
            value = importlib.import_module(f"atmerge.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"atmerge.{name}":
                raise
            raise AttributeError(f"module 'atmerge' has no attribute {name!r}") from None
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """The package module: a submodule that shares a public function's name (``atmerge.calibrate``,
    ``atmerge.evaluate``, ``atmerge.finetune``) does not replace the function when it is imported."""

    def __setattr__(self, name: str, value) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return  # the import system naming the submodule: the name stays the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


class _RegisterWithTimm:
    """A one-shot import hook: when timm is first imported, register atmerge's timm models with it,
    as ``import atmerge`` always has, without importing timm (and torch) before it is needed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                register_models()
            except Exception:  # noqa: BLE001  (never break `import timm`; the next atmerge name raises it)
                pass

        spec.loader.exec_module = exec_module
        return spec


if "timm" in sys.modules:
    register_models()
elif not any(isinstance(f, _RegisterWithTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTimm())


def patch(model, method, **options):
    """:func:`atmerge.api.patch`: patch ``model`` in place with ``method``.  ``method`` may still be
    the path of a saved config for one release (deprecated: pass ``atmerge.load_method(path, model)``)."""
    import os
    import warnings

    from atmerge import api
    from atmerge.config import load_method

    if isinstance(method, (str, os.PathLike)):
        warnings.warn(
            "atmerge.patch(model, path) is deprecated and will be removed in the next release; use "
            "atmerge.patch(model, atmerge.load_method(path, model))",
            DeprecationWarning,
            stacklevel=2,
        )
        method = load_method(method, model)
    return api.patch(model, method, **options)
