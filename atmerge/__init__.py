"""atmerge: training-free Adaptive Token Merging (ATM) and baselines for timm and HF ViTs.

import timm, atmerge
model = timm.create_model("deit_small_patch16_224", pretrained=True).eval()
atmerge.patch(model, atmerge.ATM(alpha=0.99, beta=0.04, theta_min=0.88))
logits = model(images)
print(atmerge.last_stats(model).gflops)
atmerge.finetune(model, method, "train/", "val/", atmerge.FinetuneConfig(epochs=30))  # merging in the loop
"""

from atmerge.budget import BudgetMatch, match_gflops
from atmerge.calibrate import Calibration, calibrate, calibrate_goals
from atmerge.config import FingerprintWarning, load_method, save_config
from atmerge.evaluate import EvalResult, evaluate
from atmerge.finetune import FinetuneConfig, FinetuneResult, finetune
from atmerge.api import dense_tokens, gflops, is_patched, last_stats, merge_source, unpatch
from atmerge import api as _api
from atmerge.api import freeze
from atmerge.export import export_onnx
from atmerge.core.merging import merging_error, merging_error_bounds
from atmerge.methods.atm import ATM
from atmerge.methods.base import BlockContext, Decision, Method
from atmerge.methods.evit import EViT
from atmerge.methods.fixed import ToMe, TopR
from atmerge.methods.frozen import Frozen
from atmerge.methods.mctf import MCTF
from atmerge.methods.threshold import ConstantThreshold
from atmerge.methods.zerotp import ZeroTP
from atmerge.models.adapter import UnsupportedModelError
from atmerge.models import lvvit as _lvvit, mae as _mae, t2t_vit as _t2t_vit  # noqa: F401  (timm names: lvvit_s, …)
from atmerge.stats import MergeStats

__version__ = "0.1.0"

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
    "patch",
    "unpatch",
    "Frozen",
    "freeze",
    "export_onnx",
]


def patch(model, method, **options):
    """:func:`atmerge.api.patch`: patch ``model`` in place with ``method``.  ``method`` may still be
    the path of a saved config for one release (deprecated: pass ``atmerge.load_method(path, model)``)."""
    import os
    import warnings

    if isinstance(method, (str, os.PathLike)):
        warnings.warn(
            "atmerge.patch(model, path) is deprecated and will be removed in the next release; use "
            "atmerge.patch(model, atmerge.load_method(path, model))",
            DeprecationWarning,
            stacklevel=2,
        )
        method = load_method(method, model)
    return _api.patch(model, method, **options)
