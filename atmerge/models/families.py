"""The model families and timm backbones that ship with atmerge, loaded in one place.

The top of :mod:`atmerge.models`: it imports the families and backbones, and nothing in
``atmerge.models`` imports it.  Importing it registers

- the timm family (:mod:`atmerge.models.timm_vit`), first, so that messages list it first;
- atmerge's own timm backbones (LV-ViT, T2T-ViT_t, the fine-tuned MAE), which register their
  blocks, cost hooks and modules with the timm family (:func:`atmerge.models.timm_vit.register_backbone`)
  and their names with timm (``timm.create_model("lvvit_s")``);
- a loader that :func:`atmerge.models.adapter.adapter_for` runs before every lookup, importing
  the Hugging Face family once ``transformers`` has been imported: a model of its classes cannot
  exist before, and atmerge never imports ``transformers`` itself (an optional extra, slow to
  import).

The public API imports :func:`adapter_for` from here, so that the families are loaded whenever
a model is looked up.
"""

from __future__ import annotations

import sys

import atmerge.models.timm_vit  # noqa: F401  (the timm family: registered first)
from atmerge.models import lvvit, mae, t2t_vit  # noqa: F401  (atmerge's timm backbones)
from atmerge.models.adapter import adapter_for, check_supported, register_family_loader

__all__ = ["adapter_for", "check_supported", "load_families"]


def load_families() -> None:
    """Import the families loaded on demand (each registers itself): the Hugging Face one once
    ``transformers`` is in ``sys.modules``."""
    if "transformers" in sys.modules:
        import atmerge.models.hf_vit  # noqa: F401


register_family_loader(load_families)
