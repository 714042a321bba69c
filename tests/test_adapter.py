"""The model-adapter layer: the public API finds a model's family; the generic patching undoes
exactly what it did."""

import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import Block, VisionTransformer

import atmerge
from atmerge.flops import ModelCost
from atmerge.models import timm_vit
from atmerge.models.adapter import ADAPTERS, adapter_for, model_depth, model_patches
from atmerge.models.patching import ORIGINAL, STATE, is_patched
from atmerge.models.timm_vit import TimmViT, register_backbone
from conftest import blocky_images, small_vit


def test_the_timm_family_is_found_and_describes_the_model():
    model = small_vit(reg_tokens=2, global_pool="avg")
    adapter = adapter_for(model)
    assert isinstance(adapter, TimmViT) and sum(isinstance(a, TimmViT) for a in ADAPTERS) == 1
    assert (model_depth(model), model_patches(model), adapter.num_protected(model)) == (6, 64, 3)
    assert not adapter.cls_pooled(model) and adapter_for(small_vit()).cls_pooled(small_vit())


def test_unsupported_models_are_told_which_families_are_supported():
    with pytest.raises(
        atmerge.UnsupportedModelError, match=r"atmerge patches timm VisionTransformer models .*got Linear"
    ):
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


# ----------------------------------------------------------------------------- a backbone in one file
# A timm backbone defined here alone, as a contributor's new backbone file would be: its own Block
# subclass and an extra head, registered with the timm family through register_backbone — no edit
# to atmerge/models/timm_vit.py.


class _Half(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x


class HalfMlpBlock(Block):
    """timm's pre-norm Block whose MLP branch is halved (the scale sits where LayerScale does)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ls2 = _Half()


class ToyViT(VisionTransformer):
    """A ViT of HalfMlpBlocks whose logits add a second linear head on the pooled token."""

    def __init__(self, **kwargs) -> None:
        super().__init__(block_fn=HalfMlpBlock, **kwargs)
        self.head2 = torch.nn.Linear(self.embed_dim, self.num_classes)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = super().forward_head(x, pre_logits=True)
        return pooled if pre_logits else self.head(pooled) + self.head2(pooled)


def _head2_cost(model: ToyViT, cost: ModelCost) -> ModelCost:
    return dataclasses.replace(cost, head=cost.head + model.head2.weight.numel())


register_backbone(__name__, blocks=(HalfMlpBlock,), cost_hooks={ToyViT: _head2_cost})


def toy_vit() -> ToyViT:
    torch.manual_seed(0)
    return ToyViT(
        img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=10, global_pool="avg"
    ).eval()


def test_a_backbone_registered_in_its_own_file_patches_merges_with_tome_and_unpatches_exactly():
    model, x = toy_vit(), blocky_images(2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense = model(x)
    adapter = adapter_for(model)
    assert isinstance(adapter, TimmViT)
    # its cost hook counts the second head: 48 × 10 more multiply-adds than the same ViT without it
    plain = VisionTransformer(
        img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=10, global_pool="avg"
    )
    assert adapter.cost(model).head == adapter.cost(plain).head + 48 * 10
    assert atmerge.gflops(model, (3, 32, 32)) == pytest.approx(atmerge.gflops(plain, (3, 32, 32)) + 480e-9)

    atmerge.patch(model, atmerge.ToMe(r=2))
    assert type(model).__name__ == "MergingToyViT" and all(
        type(b).__name__ == "MergingHalfMlpBlock" for b in model.blocks
    )
    # the patched class is found again by name through the registered module (a pickled model's path)
    assert timm_vit.__getattr__("MergingToyViT") is type(model)
    with torch.no_grad():
        merged = model(x)
        copy = pickle.loads(pickle.dumps(model))
        assert torch.equal(copy(x), merged)
    stats = atmerge.last_stats(model)
    assert stats.merged_per_block == [2] * 6 and stats.tokens_per_block == [65 - 2 * i for i in range(6)]
    assert stats.gflops < atmerge.gflops(toy_vit(), (3, 32, 32))
    assert merged.shape == dense.shape and not torch.equal(merged, dense)

    atmerge.unpatch(model)
    assert type(model) is ToyViT and all(type(b) is HalfMlpBlock for b in model.blocks)
    assert not any(ORIGINAL in m.__dict__ or STATE in m.__dict__ for m in model.modules())
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), dense)


def test_a_block_subclass_nobody_registered_is_refused():
    class OwnBlock(Block):
        pass

    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, block_fn=OwnBlock)
    with pytest.raises(atmerge.UnsupportedModelError, match="block 0 is a OwnBlock"):
        atmerge.patch(model, atmerge.ToMe(r=2))
    with pytest.raises(TypeError, match="subclasses of timm's Block"):
        register_backbone(__name__, blocks=(torch.nn.Linear,))
