"""Export a patched model whose token counts are fixed (ToMe, top-r, MCTF, EViT, Zero-TP, or an
adaptive setting frozen by :func:`atmerge.freeze`) to a static graph: ``torch.export`` and ONNX.

    frozen = atmerge.freeze(model, calibration_images)
    atmerge.patch(model, frozen)
    atmerge.export_onnx(model, "model.onnx", images[:1])      # needs atmerge[export]

An adaptive method (ATM, the constant threshold) decides its token counts from the images, so its
graph is not static: exporting it is refused with a one-line error that says to freeze it first.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from collections.abc import Iterator

import torch
from torch import nn

from atmerge.methods.base import Method
from atmerge.models import patching


def check_exportable(model: nn.Module) -> None:
    """Raise ValueError (one line) if ``model`` is patched with an adaptive method (or per-image
    counts)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"export takes a model (torch.nn.Module), got {type(model).__name__}")
    if patching.is_patched(model):
        check_static(patching.merge_state(model).method)


def check_static(method: Method) -> None:
    """Raise ValueError (one line) if ``method``'s token counts depend on the images."""
    if method.adaptive:
        raise ValueError(
            f"{type(method).__name__} is adaptive (its token counts depend on the images) and cannot be exported "
            "to a static graph; freeze it first: atmerge.patch(model, atmerge.freeze(model, calibration_images))"
        )
    if not method.batch_adaptive:
        raise ValueError(f"{type(method).__name__} with batch_adaptive=False pads per image and cannot be exported")


@contextlib.contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """timm attention without F.scaled_dot_product_attention for the duration (the same math;
    torch's decomposition of SDPA with an additive mask — proportional attention's log-size
    bias — cannot be lowered to ONNX in torch 2.14)."""
    switched = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for m in switched:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in switched:
            m.fused_attn = True


def export_program(
    model: nn.Module, example: torch.Tensor, *, dynamic_batch: bool = False
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of the patched (or unpatched) model on ``example`` images
    [B, C, H, W]; ``dynamic_batch``: any batch size ≥ 1 (else the example's)."""
    check_exportable(model)
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=_shapes_for(model, shapes))


def _shapes_for(model: nn.Module, shapes: dict | None) -> dict | None:
    """dynamic_shapes keyed by the name of the forward's first argument."""
    if shapes is None:
        return None
    import inspect

    first = next(iter(inspect.signature(model.forward).parameters))
    return {first: shapes["x"]}


def _sort_translations() -> dict:
    """ONNX for ``aten.sort.stable`` (the stable sorts of the matching): TopK over the whole
    dimension, whose ties go to the lower index as a stable sort's do."""
    from onnxscript import opset18 as op

    def sort_stable(self, *, stable=None, dim: int = -1, descending: bool = False):
        k = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
        return op.TopK(self, k, axis=dim, largest=descending, sorted=True)

    return {torch.ops.aten.sort.stable: sort_stable}


def export_onnx(
    model: nn.Module, path: str | Path, example: torch.Tensor, *, dynamic_batch: bool = False, opset: int | None = None
) -> Path:
    """Write ``model`` (patched with a fixed-count or frozen method, or unpatched) as ONNX to
    ``path`` via ``torch.onnx.export(..., dynamo=True)``, traced on ``example`` images
    [B, C, H, W]; input 'images' [B, C, H, W], output 'logits' (whatever the model returns).
    ``dynamic_batch``: any batch size (else the example's).  Needs ``pip install atmerge[export]``
    (onnx, onnxscript; onnxruntime to run it).  Returns the path."""
    check_exportable(model)
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"ONNX export needs the export extra: pip install 'atmerge[export]' ({e.name} is missing)"
        ) from None
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise ValueError(
            f"example must be images [B, C, H, W], got {getattr(example, 'shape', type(example).__name__)}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), unfused_attention(model):
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes=_shapes_for(model, shapes),
                custom_translation_table=_sort_translations(),
                opset_version=opset,
                verbose=False,
            )
        program.save(str(path))
    finally:
        model.train(was_training)
    return path


def example_images(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """Random images [batch, C, H, W] at the model's input size (timm: its patch embedding's
    image size and channels; Hugging Face: ``config.image_size`` / ``num_channels``)."""
    from atmerge.config import _architecture, _hf_config

    size = _architecture(model)["input_size"]
    if not size:
        raise ValueError(f"cannot tell the input size of {type(model).__name__}; pass example images to export_onnx")
    config = _hf_config(model)
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    channels = getattr(config, "num_channels", None) if config is not None else getattr(proj, "in_channels", None)
    return torch.randn(batch, channels or 3, *size, generator=torch.Generator().manual_seed(0))


def export_config(
    config: str | Path, model: nn.Module, out: str | Path, *, batch: int = 1, dynamic_batch: bool = True
) -> Path:
    """``atmerge export --config CFG --out model.onnx``: patch ``model`` with the method saved at
    ``config`` (:func:`atmerge.load_method`; a frozen or fixed-count one) and write it as ONNX to
    ``out`` (input 'images' of any batch size with ``dynamic_batch``).  Returns the path."""
    from atmerge.api import patch
    from atmerge.config import load_method

    method = load_method(config, model)
    check_static(method)  # before patching: a refused export leaves the model as it was
    patch(model, method)
    return export_onnx(model, out, example_images(model, batch), dynamic_batch=dynamic_batch)
