"""A patched model trains like the model it was: train mode with dropout and drop-path,
gradient checkpointing, and moving it to another dtype (float64) or device after patching
(the 'meta' device on any machine, the GPU where there is one)."""

import copy

import pytest
import torch

import atmerge
from atmerge.models.timm_vit import merge_state
from conftest import blocky_images, small_vit

DROPOUT = dict(drop_rate=0.1, attn_drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.1)
ATM_MERGING = atmerge.ATM(alpha=0.97, beta=0.05, theta_min=0.6)  # merges plenty on blocky images


def _train_step(model: torch.nn.Module, images: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, dict]:
    """One seeded forward + backward in train mode; returns (outputs, gradient of every weight)."""
    model.train()
    torch.manual_seed(seed)
    out = model(images)
    out.square().mean().backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("method", [ATM_MERGING, atmerge.ToMe(r=6)], ids=["ATM", "ToMe"])
def test_train_mode_backward_reaches_every_weight_with_dropout_and_drop_path(method):
    model = atmerge.patch(small_vit(**DROPOUT), method)
    x = blocky_images(4)
    out, grads = _train_step(model, x)
    assert sum(atmerge.last_stats(model).merged_per_block) > 0
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(grads[f"blocks.{i}.attn.qkv.weight"].abs().sum() > 0 for i in range(6))
    torch.manual_seed(2)
    assert not torch.equal(model(x), out)  # dropout is live: another seed, another mask
    with torch.no_grad():
        assert not torch.equal(model.eval()(x), out)


@pytest.mark.parametrize(
    "method",
    [
        ATM_MERGING,
        atmerge.ToMe(r=6),
        atmerge.MCTF(r=6),
        atmerge.EViT(0.6, (2, 4)),
        atmerge.ATM(alpha=0.97, beta=0.05, theta_min=0.6, batch_adaptive=False),
    ],
    ids=["ATM", "ToMe", "MCTF", "EViT", "ATM-per-image"],
)
def test_gradient_checkpointing_gives_the_same_outputs_gradients_and_stats(method):
    # the recomputation in the backward pass must merge exactly as the forward pass did
    plain = atmerge.patch(small_vit(**DROPOUT), method)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    x = blocky_images(4)
    out, grads = _train_step(plain, x)
    out_ckpt, grads_ckpt = _train_step(checkpointed, x)
    assert torch.equal(out, out_ckpt)
    assert all(torch.equal(grads[name], grads_ckpt[name]) for name in grads)
    assert atmerge.last_stats(checkpointed) == atmerge.last_stats(plain)
    assert sum(atmerge.last_stats(plain).merged_per_block) > 0


def test_float64_after_patching_gives_the_float32_result():
    model = atmerge.patch(small_vit(), ATM_MERGING)
    x = blocky_images(4)
    with torch.no_grad():
        expected = model(x)
        merged = atmerge.last_stats(model).merged_per_block
        model.to(torch.float64)
        out = model(x.double())
    assert out.dtype == torch.float64 and (out - expected).abs().max() < 1e-5
    assert atmerge.last_stats(model).merged_per_block == merged
    assert merge_state(model).size.dtype == torch.float32


def test_moving_a_patched_model_to_the_meta_device_runs_its_merges_there():
    """A real device move on a machine without a GPU: to the 'meta' device (shapes, no values).
    Every tensor the merging makes follows the model (a CPU tensor met there raises "Tensor on
    device meta is not on the expected device cpu"), and ToMe's fixed counts merge as on the CPU.
    (A data-dependent method such as ATM cannot run on 'meta': its counts need values.)"""
    model = atmerge.patch(small_vit(), atmerge.ToMe(r=6))
    x = blocky_images(4)
    with torch.no_grad():
        expected = model(x)
        tokens = atmerge.last_stats(model).tokens_per_block
        model.to("meta")
        out = model(x.to("meta"))
    assert all(p.is_meta for p in model.parameters()) and atmerge.is_patched(model)
    assert out.is_meta and out.shape == expected.shape and merge_state(model).size.is_meta
    assert atmerge.last_stats(model).tokens_per_block == tokens == [65, 59, 53, 47, 41, 35]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: CPU to CPU would move nothing")
def test_moving_a_patched_model_to_the_gpu_keeps_its_merges():
    model = atmerge.patch(small_vit(), ATM_MERGING)
    x = blocky_images(4)
    with torch.no_grad():
        expected = model(x)
        merged = atmerge.last_stats(model).merged_per_block
        model.to("cuda")
        out = model(x.to("cuda"))
    assert atmerge.is_patched(model) and merge_state(model).size.device.type == "cuda"
    assert (out.cpu() - expected).abs().max() < 1e-4
    assert atmerge.last_stats(model).merged_per_block == merged
