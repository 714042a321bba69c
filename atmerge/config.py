"""A calibrated method as a JSON file that can be shipped with a model: the method and its
settings, the model's fingerprint, and what was measured.

    atmerge.save_config("deit_s_atm.json", model, calibration)
    method = atmerge.load_method("deit_s_atm.json")       # or atmerge.patch(model, "deit_s_atm.json")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from atmerge.calibrate import Calibration
from atmerge.data import read_json_file
from atmerge.methods.base import Method
from atmerge.methods.registry import METHODS, build_method

FORMAT = "atmerge-config/1"
# fingerprint fields that must match for a config to hold (the architecture name is not: a model
# built in code and the same model loaded from its save_pretrained directory name it differently)
COMPARED = ("class", "input_size", "patch_size", "hidden_size", "layers", "weights_sha256")
ADDED = ("patch_size", "hidden_size", "layers")  # configs written before these fields lack them


class FingerprintWarning(UserWarning):
    """The model being patched is not the one a config was calibrated on."""


def _hw_list(value) -> list[int] | None:
    """[h, w] of an int or a pair; None where unknown."""
    if value is None:
        return None
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value), int(value)]


def _hf_config(model: nn.Module) -> object | None:
    """The config of a Hugging Face model (None for other models; transformers is not imported
    here: a model of its classes exists only once it has been)."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return None
    return model.config


def _architecture(model: nn.Module) -> dict:
    """Architecture name, input size [H, W], patch size [h, w], hidden size and number of blocks:
    from ``model.config`` for a Hugging Face model, from the timm model's attributes otherwise."""
    config = _hf_config(model)
    if config is not None:
        names = getattr(config, "architectures", None) or []
        return {
            "architecture": names[0] if names else getattr(config, "model_type", None),
            "input_size": _hw_list(getattr(config, "image_size", None)),
            "patch_size": _hw_list(getattr(config, "patch_size", None)),
            "hidden_size": getattr(config, "hidden_size", None),
            "layers": getattr(config, "num_hidden_layers", None),
        }
    pe = getattr(model, "patch_embed", None)
    blocks = getattr(model, "blocks", None)
    return {
        "architecture": (getattr(model, "pretrained_cfg", None) or {}).get("architecture"),
        "input_size": _hw_list(getattr(pe, "img_size", None)),
        "patch_size": _hw_list(getattr(pe, "patch_size", None)),
        "hidden_size": getattr(model, "embed_dim", None),
        "layers": len(blocks) if isinstance(blocks, nn.Sequential | nn.ModuleList) else None,
    }


def model_fingerprint(model: nn.Module) -> dict:
    """Class, architecture (timm name; a Hugging Face model's ``config.architectures[0]`` or
    ``model_type``), input size, patch size, hidden size, number of blocks and sha256 of the
    weights (state_dict) of a timm or Hugging Face model; None where a model does not say."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"class": type(model).__qualname__, **_architecture(model), "weights_sha256": h.hexdigest()}


def _encode(value):
    return {"tuple": [_encode(v) for v in value]} if isinstance(value, tuple) else value


def _decode(value):
    if isinstance(value, dict) and set(value) == {"tuple"}:
        return tuple(_decode(v) for v in value["tuple"])
    return value


def method_to_dict(method: Method) -> dict:
    """{"name": registry name, "settings": {field: value}}; tuples are kept apart from lists."""
    name = next((k for k, v in METHODS.items() if type(method) is v), None)
    if name is None:
        raise ValueError(f"{type(method).__name__} is not a registered method; cannot save it")
    return {"name": name, "settings": {f.name: _encode(getattr(method, f.name)) for f in dataclasses.fields(method)}}


def method_from_dict(entry: dict) -> Method:
    """Inverse of :func:`method_to_dict`; a ValueError names the field that is wrong."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ValueError("config field 'method.name' is missing or not a string")
    settings = entry.get("settings", {})
    if not isinstance(settings, dict):
        raise ValueError("config field 'method.settings' must be an object")
    return build_method(entry["name"], **{k: _decode(v) for k, v in settings.items()})


def save_config(path: str | Path, model: nn.Module, calibration, images_description: str | None = None) -> Path:
    """Write the chosen method of ``calibration`` (an :class:`atmerge.calibrate.Calibration`) with
    ``model``'s fingerprint, the searched ranges, a description of the calibration images (e.g.
    their folder) and the measured cost and fidelity (its paired details included)."""
    if not isinstance(calibration, Calibration):
        raise TypeError(f"calibration must be what atmerge.calibrate returns, got {type(calibration).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the calibrated model (torch.nn.Module), got {type(model).__name__}")
    path = Path(path)
    c = calibration
    document = {
        "format": FORMAT,
        "method": method_to_dict(c.method),
        "model": model_fingerprint(model),
        "calibration": {
            "goal": c.goal,
            "target": c.target,
            "met": c.met,
            "images_description": images_description,
            "search_images": c.search_images,
            "held_out_images": c.images,
            "trials": len(c.trials),
            "space": c.space,
            "on_search_images": c.search,
            "landing": c.landing,
            "compared": c.compared,
        },
        "measured": {
            "on": "the held-out calibration images",
            "gflops": c.gflops,
            "gflops_share": c.gflops_share,
            "unpatched_gflops": c.unpatched_gflops,
            "fidelity_measure": c.measure,
            "fidelity": c.fidelity,
            "fidelity_low_one_sided_95": c.fidelity_low,
            **c.details,
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2))
    return path


def read_config(path: str | Path) -> dict:
    """The config document at ``path``, checked: a one-line ValueError names what is wrong."""
    path = Path(path)
    document = read_json_file(path, "config")
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"config {path}: field 'format' must be {FORMAT!r}")
    if "method" not in document:
        raise ValueError(f"config {path}: field 'method' is missing")
    return document


def load_method(path: str | Path, model: nn.Module | None = None) -> Method:
    """The method saved at ``path``; with ``model``, warn (FingerprintWarning) if it is not the
    model the config was calibrated on."""
    document = read_config(path)
    method = method_from_dict(document["method"])
    if model is not None:
        saved, actual = document.get("model") or {}, model_fingerprint(model)
        differing = [k for k in COMPARED if (k in saved or k not in ADDED) and saved.get(k) != actual[k]]
        if differing:
            warnings.warn(
                f"config {path} was calibrated on another model (differs in {', '.join(differing)}); "
                "its measured cost and fidelity may not hold",
                FingerprintWarning,
                stacklevel=2,
            )
    return method


def save_method(
    path: str | Path,
    model: nn.Module,
    method: Method,
    images_description: str | None = None,
    measured: dict | None = None,
) -> Path:
    """Write ``method`` (e.g. what :func:`atmerge.freeze` returns) with ``model``'s fingerprint,
    without a calibration: :func:`load_method` and ``atmerge.patch(model, path)`` read it back.
    ``measured``: numbers to keep with it (e.g. its GFLOPs)."""
    if not isinstance(method, Method):
        raise TypeError(f"method must be an atmerge method, got {type(method).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the model the method is for (torch.nn.Module), got {type(model).__name__}")
    path = Path(path)
    document = {
        "format": FORMAT,
        "method": method_to_dict(method),
        "model": model_fingerprint(model),
        "calibration": {"images_description": images_description},
        "measured": dict(measured or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2))
    return path


def frozen_calibration(
    model: nn.Module, calibration: Calibration, images, quantile: float | None = None
) -> Calibration:
    """``calibration`` with its method frozen (:func:`atmerge.freeze`) on ``images`` (tensor
    [N, C, H, W], batches, or a folder) — for ``atmerge calibrate --freeze`` and
    :func:`save_config`.  ``gflops`` / ``gflops_share`` become the frozen method's (the same on
    every image); the fidelity stays the adaptive setting's, measured on the held-out images
    (``details['fidelity_of']`` says so).  details also hold ``frozen_from`` (the adaptive method),
    ``frozen_quantile``, and ``adaptive_gflops`` / ``frozen_gflops`` on the freezing images.
    ``model`` is left as it was (patched with its method, or not patched)."""
    from atmerge.api import freeze, is_patched, last_stats, patch, unpatch
    from atmerge.api import _calibration_batches
    from atmerge.models import patching

    if not isinstance(calibration, Calibration):
        raise TypeError(f"calibration must be what atmerge.calibrate returns, got {type(calibration).__name__}")
    before = patching.merge_state(model) if is_patched(model) else None
    batches = list(_calibration_batches(images, model, 64))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:

        def mean_gflops() -> float:
            total, count = 0.0, 0
            with torch.no_grad():
                for batch in batches:
                    if batch.shape[0]:
                        model(batch.to(device))
                        total += last_stats(model).gflops * batch.shape[0]
                        count += batch.shape[0]
            return total / max(count, 1)

        patch(model, calibration.method)
        adaptive = mean_gflops()
        frozen = freeze(model, batches, quantile)
        patch(model, frozen)
        frozen_gflops = mean_gflops()
    finally:
        if before is None:
            unpatch(model)
        else:
            patch(
                model,
                before.method,
                prop_attn=before.prop_attn,
                prune_last_block=before.prune_last,
                trace_source=before.trace_source,
            )
    details = {
        **calibration.details,
        "frozen_from": method_to_dict(calibration.method),
        "frozen_quantile": quantile,
        "adaptive_gflops": adaptive,
        "frozen_gflops": frozen_gflops,
        "fidelity_of": "the adaptive setting it was frozen from, on the held-out images",
    }
    share = frozen_gflops / calibration.unpatched_gflops if calibration.unpatched_gflops else calibration.gflops_share
    return dataclasses.replace(calibration, method=frozen, gflops=frozen_gflops, gflops_share=share, details=details)
