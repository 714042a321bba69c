"""Per-image counts packed: in a batch whose images merge their own counts, the norms, the
attention's projections, the merge and the MLP run on the real tokens only ([T, C],
atmerge.core.packing; in inference the residual stream stays packed through the block), attention
itself on the padded layout.  The result still equals running the images one at a
time (float64, tight), for timm and Hugging Face models, in inference and in training."""

import copy

import pytest
import torch

import atmerge
from atmerge.core.merging import Assignment, merge_weighted_average
from atmerge.core.packing import PackedTokens, Packing, packed_tokens, packing, real_lengths
from atmerge.core.padding import PaddedAssignment
from atmerge.models.patching import merge_state
from atmerge.models.timm_vit import TimmParts
from conftest import SMALL_MODEL_VARIANTS, blocky_images, small_vit
from reference import real_source_groups as groups_of

ATM = atmerge.ATM(alpha=0.9, beta=0.1, theta_min=0.3, split_layer=2)
CONSTANT = atmerge.ConstantThreshold(theta=0.5)
TIGHT = 1e-10  # float64


def per_image(method):
    return type(method)(**{**method.__dict__, "batch_adaptive": False})


def forward(model, images, method, **options):
    """Outputs, stats and merged groups of ``model`` patched with ``method`` on images."""
    atmerge.patch(model, method, trace_source=True, **options)
    with torch.no_grad():
        out = model(images)
    stats, groups = atmerge.last_stats(model), groups_of(atmerge.merge_source(model))
    return out, stats, groups


# ----------------------------------------------------------------------------- the pure functions


def test_pack_and_unpack_by_hand():
    lengths = torch.tensor([3, 1, 4])
    x = torch.arange(3 * 4 * 2, dtype=torch.float64).reshape(3, 4, 2)
    packed = packing(lengths, 4)
    assert packed.total == 8 and packed.batch == 3 and packed.width == 4
    assert packed.index.tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    assert torch.equal(packed.pack(x), torch.cat([x[0, :3], x[1, :1], x[2, :4]]))
    back = packed.unpack(packed.pack(x))
    real = torch.arange(4) < lengths[:, None]
    assert torch.equal(back[real], x[real]) and back[~real].abs().sum() == 0
    spread = packed.spread(packed.pack(x))  # padding: a copy of its image's last real token
    assert torch.equal(spread[real], x[real]) and torch.equal(spread[1, 1:], x[1, :1].expand(3, 2))
    assert torch.equal(spread[0, 3], x[0, 2])
    y = torch.randn(8, 2, dtype=torch.float32)
    assert torch.equal(packed.add(x, y), x + packed.unpack(y))  # (y promoted to x's dtype)
    inplace = x.clone()
    assert packed.add_(inplace, y) is inplace and torch.equal(inplace, x + packed.unpack(y))
    assert torch.equal(packing(lengths, 4, total=8).index, packed.index)  # the total given: nothing read
    assert real_lengths(torch.tensor([[1.0, 2, 0, 0], [3.0, 1, 1, 0]])).tolist() == [2, 3]


def test_pack_keeps_trailing_dimensions():
    lengths = torch.tensor([2, 3])
    x = torch.randn(2, 3, 4, 5)
    packed = packing(lengths, 3)
    assert packed.pack(x).shape == (5, 4, 5)
    assert torch.equal(packed.unpack(packed.pack(x))[1], x[1])


def test_padded_assignment_sums_as_the_general_assignment():
    """The index_add of a padded merge gives the scatter's sums; empty slots stay zero; other
    reductions (the sources' amax) are the general ones."""
    torch.manual_seed(0)
    assign = torch.tensor([[0, 1, 1, 2, -1, 3], [0, 2, 1, 1, -1, -1], [0, 1, -1, -1, -1, -1]])
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    general, padded = Assignment(assign, 4, padded=True), PaddedAssignment(assign, 4, padded=True, real_tokens=8)
    torch.testing.assert_close(padded(x), general(x, "sum"), rtol=0, atol=1e-14)
    assert padded(x)[2, 2:].abs().sum() == 0
    assert torch.equal(padded(x, "amax"), general(x, "amax"))
    size = torch.rand(3, 6, dtype=torch.float32) + 0.5
    ours, theirs = padded.weighted_average(x, size), merge_weighted_average(general, x, size)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-12)
    assert torch.equal(ours[1], theirs[1]) and ours[1].dtype == size.dtype


def test_packed_merge_sums_as_the_padded_merge():
    """A merge of tokens held packed gives, bit for bit, the packed rows of the padded merge, laid
    out for the new sizes; the stand-in keeps the padded shape [B, N, 0]."""
    torch.manual_seed(0)
    assign = torch.tensor([[0, 3, 1, 2, 3, -1], [0, 2, 1, 1, -1, -1], [0, 1, -1, -1, -1, -1]])
    merge = PaddedAssignment(assign, 4, padded=True, real_tokens=9)
    size = torch.tensor([[1.0, 2, 1, 3, 1, 0], [1, 1, 2, 1, 0, 0], [1, 2, 0, 0, 0, 0]])
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    before = packing(real_lengths(size), 6)
    merged, new_size = merge.weighted_average(packed_tokens(before.pack(x), 3, 6, before), size)
    padded, padded_size = merge.weighted_average(x, size)
    assert isinstance(merged, PackedTokens) and merged.shape == (3, 4, 0)
    assert torch.equal(new_size, padded_size) and new_size.dtype == size.dtype
    after = packing(real_lengths(padded_size), 4)
    assert merged.packing is None and merged.rows.shape == (after.total, 5) == (9, 5)
    assert torch.equal(merged.rows, after.pack(padded))
    assert torch.equal(after.unpack(merged.rows), padded)  # padding: zeros


# ----------------------------------------------------------------------------- timm models


@pytest.mark.parametrize("kwargs", SMALL_MODEL_VARIANTS)
@pytest.mark.parametrize("method", [ATM, CONSTANT], ids=["atm", "constant"])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_packed_batch_equals_images_one_at_a_time_float64(kwargs, method, prop_attn):
    """Registers, average pooling, LayerScale, q/k norm; size-distinctive matching from block 3."""
    torch.manual_seed(0)
    model = small_vit(**kwargs).double()
    images = blocky_images(6, cells=4, noise=0.3, seed=2).double()
    out, stats, groups = forward(model, images, per_image(method), prop_attn=prop_attn)
    assert merge_state(model).packed_blocks  # the packed path ran
    merged = []
    for i in range(images.shape[0]):  # batch-adaptive r of one image is its own count
        one, one_stats, one_groups = forward(model, images[i : i + 1], method, prop_attn=prop_attn)
        assert groups[i] == one_groups[0]
        assert (out[i] - one[0]).abs().max() < TIGHT
        merged.append(tuple(one_stats.merged_per_block))
    assert len(set(merged)) > 1  # the images really merged different counts
    assert stats.merged_per_block == pytest.approx([sum(c) / len(c) for c in zip(*merged)])


def test_every_block_after_the_first_merge_projects_real_tokens_only(monkeypatch):
    """Per-image ATM: from block 1 on, attention is given the T real tokens (not B·N padded
    ones), and the MLP too."""
    torch.manual_seed(0)
    model = small_vit()
    images = blocky_images(5, cells=4, noise=0.3, seed=2)
    seen = []
    original = TimmParts.packed_attention

    def spy(self, block, h, packed, bias, **kwargs):
        seen.append((h.shape[0], packed.total, packed.batch * packed.width))
        return original(self, block, h, packed, bias, **kwargs)

    monkeypatch.setattr(TimmParts, "packed_attention", spy)
    atmerge.patch(model, per_image(ATM))
    with torch.no_grad():
        model(images)
    assert merge_state(model).packed_blocks == list(range(1, 6))
    assert len(seen) == 5 and all(h == total for h, total, _ in seen)
    assert any(total < padded for _, total, padded in seen)  # padding there, and skipped


def test_executed_gflops_count_only_the_attention_matmuls_of_the_padding():
    """executed − counted GFLOPs = Σ over blocks of 2 · attn_dim · (W² − mean n_b²): the padded
    width W only in QKᵀ and AV, every linear layer and norm on the real tokens."""
    torch.manual_seed(0)
    model = small_vit()
    images = blocky_images(6, cells=4, noise=0.3, seed=2)
    atmerge.patch(model, per_image(ATM))
    with torch.no_grad():
        model(images)
    stats, state = atmerge.last_stats(model), merge_state(model)
    attn_dim = model.blocks[0].attn.num_heads * model.blocks[0].attn.head_dim
    excess = 0.0
    for valid_in, _, _ in state.per_image_counts:
        n = valid_in.double()
        excess += 2 * attn_dim * (float(n.max()) ** 2 - float((n**2).mean()))
    assert excess > 0
    assert stats.executed_gflops - stats.gflops == pytest.approx(excess / 1e9, rel=1e-9, abs=1e-15)


def test_packed_training_gives_the_gradients_of_images_one_at_a_time():
    """Backward through pack / unpack: the input gradients of a per-image batch (train mode, no
    dropout) equal those of the images one at a time (float64)."""
    torch.manual_seed(0)
    model = small_vit(reg_tokens=1, init_values=0.1).double().train()
    images = blocky_images(4, cells=4, noise=0.3, seed=2).double()
    atmerge.patch(model, per_image(ATM))
    x = images.clone().requires_grad_(True)
    model(x).square().sum().backward()
    assert merge_state(model).packed_blocks
    atmerge.patch(model, ATM)
    for i in range(images.shape[0]):
        one = images[i : i + 1].clone().requires_grad_(True)
        model(one).square().sum().backward()
        assert (x.grad[i] - one.grad[0]).abs().max() < 1e-9


def test_packed_inference_gives_the_input_gradients_of_images_one_at_a_time(monkeypatch):
    """Backward through the packed residual stream and the packed merge (eval mode, gradients on):
    the input gradients of a per-image batch equal those of the images one at a time (float64)."""
    torch.manual_seed(0)
    model = small_vit(reg_tokens=1, init_values=0.1).double().eval()
    images = blocky_images(4, cells=4, noise=0.3, seed=2).double()
    merges = []
    packed_average = PaddedAssignment.packed_average
    monkeypatch.setattr(PaddedAssignment, "packed_average", lambda *a: merges.append(1) or packed_average(*a))
    atmerge.patch(model, per_image(ATM))
    x = images.clone().requires_grad_(True)
    model(x).square().sum().backward()
    assert merges  # the merges ran on the packed rows
    atmerge.patch(model, ATM)
    for i in range(images.shape[0]):
        one = images[i : i + 1].clone().requires_grad_(True)
        model(one).square().sum().backward()
        assert (x.grad[i] - one.grad[0]).abs().max() < 1e-9


def test_a_batch_without_padding_runs_unpacked(monkeypatch):
    """Copies of one image merge the same counts: the per-image batch holds no padding, so nothing
    is packed or spread (the packed and padded layouts are one), and it gives the batch-mean output."""
    torch.manual_seed(0)
    model = small_vit().double().eval()
    images = blocky_images(1, cells=4, noise=0.3, seed=2).double().expand(3, -1, -1, -1)
    calls = []
    for name in ("pack", "spread", "unpack"):
        original = getattr(Packing, name)
        monkeypatch.setattr(Packing, name, lambda self, y, _f=original, _n=name: calls.append(_n) or _f(self, y))
    out, stats, _ = forward(model, images, per_image(ATM))
    assert sum(stats.merged_per_block) > 0 and not calls
    torch.testing.assert_close(out, forward(model, images, ATM)[0], rtol=0, atol=1e-12)


def test_packed_batch_on_the_cifar_model_float64(cifar_model, cifar_images):
    """The real model and images: packed per-image == batch-adaptive batches of one (float64)."""
    model, images = copy.deepcopy(cifar_model).double(), cifar_images[0][:8].double()
    setting = dict(alpha=0.95, beta=0.04, theta_min=0.85)
    out, _, groups = forward(model, images, atmerge.ATM(**setting, batch_adaptive=False))
    for i in range(images.shape[0]):
        one, _, one_groups = forward(model, images[i : i + 1], atmerge.ATM(**setting))
        assert groups[i] == one_groups[0]
        assert (out[i] - one[0]).abs().max() < 1e-9


# ----------------------------------------------------------------------------- Hugging Face models


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "Dinov2Model"])
def test_hf_packed_batch_equals_images_one_at_a_time(cls_name, attn):
    pytest.importorskip("transformers")
    from test_hf import hf_model

    torch.manual_seed(0)
    model = hf_model(cls_name, attn).double()
    images = blocky_images(5, cells=4, noise=0.3, seed=2).double()
    method = atmerge.ATM(alpha=0.9, beta=0.04, theta_min=0.3)

    def run(x, m):
        atmerge.patch(model, m)
        with torch.no_grad():
            out = model(pixel_values=x)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    out = run(images, per_image(method))
    assert merge_state(model).packed_blocks
    for i in range(images.shape[0]):
        one = run(images[i : i + 1], method)
        assert out[i, : one.shape[1]].shape == one[0].shape
        assert (out[i, : one.shape[1]] - one[0]).abs().max() < TIGHT
