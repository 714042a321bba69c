"""What a training run keeps on disk: exact-resume checkpoints (weights, optimiser, scheduler,
scaler, EMA, epoch, every process's random-number states) and plain weights as safetensors.

A checkpoint is a ``torch.save`` of plain types and tensors only, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs when resuming).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

FORMAT = "atmerge-finetune-checkpoint/1"


def fingerprint(model: nn.Module) -> dict[str, list[int]]:
    """{weight name: shape} of a model's state dict: what a checkpoint must match to resume."""
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def rng_state() -> dict:
    """This process's random-number states (torch, CUDA, numpy, python), as plain types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def save_checkpoint(path: Path, state: dict) -> Path:
    """Write a checkpoint atomically (a crash while writing leaves the previous one intact)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, model: nn.Module) -> dict:
    """The checkpoint at ``path``, checked against ``model``: FileNotFoundError if missing,
    ValueError naming the file if it is no checkpoint of this kind or was saved from a model
    with other weights (the first differing weight is named)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume checkpoint {path} not found; pass the checkpoint.pt of an earlier run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unpickler errors alike
        raise ValueError(
            f"resume checkpoint {path} is not a fine-tuning checkpoint ({str(e).splitlines()[0][:200]})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"resume checkpoint {path} is not a fine-tuning checkpoint (format must be {FORMAT!r})")
    saved, current = state["fingerprint"], fingerprint(model)
    if saved != current:
        name = next((n for n in sorted(set(saved) | set(current)) if saved.get(n) != current.get(n)), "?")
        raise ValueError(
            f"resume checkpoint {path} was saved from another model: weight {name!r} has shape "
            f"{saved.get(name, 'none')} there and {current.get(name, 'none')} here; resume with the same model"
        )
    return state


def save_weights(path: Path, model: nn.Module, metadata: dict) -> Path:
    """The model's state dict (a patched model's is the unpatched one) as safetensors, loadable by
    ``timm.create_model(...)`` + ``load_state_dict``; ``metadata`` values are stored as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in metadata.items()})
    return path
