"""The model-adapter layer: the public API finds a model's family; the generic patching undoes
exactly what it did."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import atmerge
from atmerge.models.adapter import ADAPTERS, adapter_for, model_depth, model_patches
from atmerge.models.patching import ORIGINAL, STATE, is_patched
from atmerge.models.timm_vit import TimmViT
from conftest import small_vit


def test_the_timm_family_is_found_and_describes_the_model():
    model = small_vit(reg_tokens=2, global_pool="avg")
    adapter = adapter_for(model)
    assert isinstance(adapter, TimmViT) and sum(isinstance(a, TimmViT) for a in ADAPTERS) == 1
    assert (model_depth(model), model_patches(model), adapter.num_protected(model)) == (6, 64, 3)
    assert not adapter.cls_pooled(model) and adapter_for(small_vit()).cls_pooled(small_vit())


def test_unsupported_models_are_told_which_families_are_supported():
    with pytest.raises(atmerge.UnsupportedModelError, match=r"atmerge patches timm VisionTransformer models .*got Linear"):
        adapter_for(torch.nn.Linear(2, 2))


def test_unpatch_restores_every_swapped_module():
    model = small_vit()
    atmerge.patch(model, atmerge.ToMe(r=2))
    swapped = [m for m in model.modules() if ORIGINAL in m.__dict__]
    assert len(swapped) == 1 + 6 and is_patched(model)
    atmerge.unpatch(model)
    assert not any(ORIGINAL in m.__dict__ or STATE in m.__dict__ for m in model.modules())
    assert type(model).__name__ == "VisionTransformer" and not is_patched(model)


def test_importing_atmerge_and_patching_a_timm_model_never_imports_transformers():
    # transformers is an optional extra (and slow to import): only a model of its classes, which
    # cannot exist before transformers is imported, loads the Hugging Face adapter
    code = (
        "import sys, torch, atmerge\n"
        "from conftest import small_vit\n"
        "model = atmerge.patch(small_vit(), atmerge.ToMe(r=2))\n"
        "model(torch.randn(1, 3, 32, 32)); atmerge.last_stats(model); atmerge.gflops(small_vit(), (3, 32, 32))\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers' or m.endswith('hf_vit'))\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    here = Path(__file__).parent
    done = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
