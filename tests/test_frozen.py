"""atmerge.freeze: an adaptive setting turned into fixed per-block counts with the same matching
rules — equal to the fixed-count method it names, as costly as the adaptive setting on the
freezing images, data-independent token counts, one compiled graph equal to eager."""

import math

import pytest
import timm
import torch

import atmerge
from atmerge.config import load_method, method_from_dict, method_to_dict
from conftest import SMALL_MODEL_VARIANTS, blocky_images, small_vit

ATM_SMALL = atmerge.ATM(alpha=0.9, beta=0.1, theta_min=0.3)


def run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, atmerge.MergeStats]:
    with torch.no_grad():
        return model(x), atmerge.last_stats(model)


@pytest.mark.parametrize("variant", SMALL_MODEL_VARIANTS, ids=["cls", "avg", "regs", "layerscale"])
@pytest.mark.parametrize(
    "method",
    [
        ATM_SMALL,
        atmerge.ATM(alpha=0.9, beta=0.1, theta_min=0.3, split_layer=2, similarity="centered"),
        atmerge.ConstantThreshold(theta=0.5),
    ],
    ids=["atm", "atm-centered", "constant"],
)
def test_frozen_on_one_batch_merges_what_the_adaptive_method_merged(variant, method):
    torch.manual_seed(0)
    model = atmerge.patch(small_vit(**variant), method)
    x = blocky_images(6, noise=0.1, seed=1)
    adaptive, a_stats = run(model, x)
    frozen = atmerge.freeze(model, x)
    assert isinstance(frozen, atmerge.Frozen) and not frozen.adaptive
    assert list(frozen.counts) == a_stats.merged_per_block
    frozen_out, f_stats = run(atmerge.patch(model, frozen), x)
    assert torch.equal(frozen_out, adaptive)
    assert f_stats.gflops == a_stats.gflops and f_stats.tokens_per_block == a_stats.tokens_per_block


@pytest.mark.parametrize("variant", SMALL_MODEL_VARIANTS, ids=["cls", "avg", "regs", "layerscale"])
def test_a_frozen_alternate_schedule_is_tome_with_that_schedule(variant):
    schedule = (9, 7, 5, 3, 2, 1)
    torch.manual_seed(0)
    model = small_vit(**variant)
    x = blocky_images(4, noise=0.2, seed=2)
    frozen, f_stats = run(atmerge.patch(model, atmerge.Frozen(counts=schedule)), x)
    tome, t_stats = run(atmerge.patch(model, atmerge.ToMe(r=list(schedule))), x)
    assert f_stats.tokens_per_block == t_stats.tokens_per_block and f_stats.gflops == t_stats.gflops
    if model.num_prefix_tokens:
        assert torch.equal(frozen, tome)
    else:  # no protected token: ToMe keeps its release's order (unmerged A by descending score,
        # tests/test_methods.py), the frozen ATM schedule token order, so later blocks split
        # other tokens: the same counts, other merges
        assert not torch.equal(frozen, tome)


def test_fixed_count_methods_are_returned_as_they_are():
    model = small_vit()
    for method in (atmerge.ToMe(r=3), atmerge.MCTF(r=4), atmerge.Frozen(counts=(3, 2))):
        atmerge.patch(model, method)
        assert atmerge.freeze(model, blocky_images(2)) is method


@pytest.mark.parametrize("batch_adaptive", [True, False])
def test_frozen_costs_the_adaptive_gflops_on_the_freezing_images(batch_adaptive):
    torch.manual_seed(0)
    model = atmerge.patch(small_vit(), atmerge.ATM(alpha=0.9, beta=0.1, theta_min=0.3, batch_adaptive=batch_adaptive))
    batches = [
        blocky_images(4, cells=c, noise=n, seed=s) for c, n, s in [(4, 0.1, 1), (8, 0.3, 2), (2, 0.05, 3), (4, 0.2, 4)]
    ]
    adaptive = [run(model, x)[1] for x in batches]
    gflops = sum(s.gflops * s.batch_size for s in adaptive) / sum(s.batch_size for s in adaptive)
    tokens = [sum(s.tokens_per_block[b] * s.batch_size for s in adaptive) / 16 for b in range(6)]
    frozen = atmerge.freeze(model, iter(batches))
    atmerge.patch(model, frozen)
    f_stats = [run(model, x)[1] for x in batches]
    # counts rounded so that the tokens entering every block stay within 1/2 of the mean
    assert all(abs(f - t) <= 0.5 for f, t in zip(f_stats[0].tokens_per_block, tokens))
    # the cost agrees to what one token per block costs (attention is quadratic in the count)
    one_token = f_stats[0].gflops / sum(f_stats[0].tokens_per_block)
    assert abs(f_stats[0].gflops - gflops) <= 6 * one_token
    assert abs(f_stats[0].gflops - gflops) / gflops < 0.02


def test_frozen_token_counts_are_data_independent():
    torch.manual_seed(0)
    model = atmerge.patch(small_vit(), ATM_SMALL)
    atmerge.patch(model, atmerge.freeze(model, blocky_images(8, noise=0.1)))
    counts = {
        tuple(run(model, x)[1].tokens_per_block)
        for x in (blocky_images(3, cells=8, noise=0.5, seed=5), torch.randn(5, 3, 32, 32), torch.zeros(2, 3, 32, 32))
    }
    assert len(counts) == 1


def test_quantile_levels_order_the_counts():
    torch.manual_seed(0)
    model = atmerge.patch(small_vit(), atmerge.ATM(alpha=0.95, beta=0.05, theta_min=0.8, batch_adaptive=False))
    x = torch.cat([blocky_images(4, cells=c, noise=0.1, seed=c) for c in (2, 4, 8)])
    low, mean, high = (
        atmerge.freeze(model, x, quantile=0.1),
        atmerge.freeze(model, x),
        atmerge.freeze(model, x, quantile=1.0),
    )
    assert low.counts[0] < mean.counts[0] < high.counts[0]  # per-image counts of the first block: 22 … 31
    assert sum(low.counts) < sum(mean.counts)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, x: atmerge.freeze(m, x[:0]), "at least one calibration image; got 0"),
        (lambda m, x: atmerge.freeze(m, []), "at least one calibration image; got 0"),
        (lambda m, x: atmerge.freeze(m, x, quantile=0), "quantile=0 is out of range; allowed (0, 1]"),
        (lambda m, x: atmerge.freeze(m, x, quantile=1.5), "quantile=1.5 is out of range; allowed (0, 1]"),
        (lambda m, x: atmerge.freeze(atmerge.unpatch(m), x), "this model is not patched"),
        (lambda m, x: atmerge.freeze(m, x, batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (lambda m, x: atmerge.Frozen(counts=(3, -1)), "counts must be a sequence of integers >= 0"),
        (
            lambda m, x: atmerge.patch(m, atmerge.Frozen(counts=(1,) * 7)),
            "counts has 7 entries for a model of 6 blocks",
        ),
    ],
)
def test_bad_input_gives_one_line_errors(call, message):
    model = atmerge.patch(small_vit(), ATM_SMALL)
    with pytest.raises(ValueError) as e:
        call(model, blocky_images(2))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_frozen_methods_save_and_load(tmp_path):
    frozen = atmerge.Frozen(counts=(5, 4, 3, 0), split_layer=3, similarity="centered", frozen_from="atm")
    assert method_from_dict(method_to_dict(frozen)) == frozen
    model = atmerge.patch(small_vit(), ATM_SMALL)
    x = blocky_images(4, noise=0.1)
    from atmerge.config import save_method

    path = save_method(tmp_path / "frozen.json", model, atmerge.freeze(model, x), images_description="blocky")
    loaded = load_method(path, model)
    assert loaded == atmerge.freeze(model, x)
    out, _ = run(atmerge.patch(model, load_method(str(path), model)), x)
    assert out.shape == (4, 10)


def test_freezing_a_calibration_keeps_its_record(tmp_path):
    from atmerge.calibrate import Calibration
    from atmerge.config import frozen_calibration, read_config, save_config

    model = small_vit()
    x = blocky_images(8, noise=0.1)
    c = Calibration(
        method=ATM_SMALL,
        goal="budget",
        target=0.5,
        met=True,
        measure="agreement",
        gflops=0.003,
        gflops_share=0.5,
        fidelity=0.9,
        fidelity_low=0.8,
        images=8,
        unpatched_gflops=0.006,
    )
    frozen = frozen_calibration(model, c, x)
    assert isinstance(frozen.method, atmerge.Frozen) and frozen.details["frozen_from"]["name"] == "atm"
    assert math.isclose(frozen.details["frozen_gflops"], frozen.details["adaptive_gflops"], rel_tol=0.02)
    document = read_config(save_config(tmp_path / "c.json", model, frozen))
    assert document["method"]["name"] == "frozen"
    assert not atmerge.is_patched(model)


# --- torch.compile (inductor): one graph, equal to eager ---------------------------------------
# (a cold inductor cache compiles C++ kernels: tens of seconds per model on a busy CPU)


def tiny_vit(depth: int = 2) -> torch.nn.Module:
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=10
    ).eval()


def frozen_atm_on_tiny() -> atmerge.Frozen:
    model = atmerge.patch(tiny_vit(), atmerge.ATM(alpha=0.9, beta=0.1, theta_min=0.2, split_layer=0))
    frozen = atmerge.freeze(model, blocky_images(8, cells=2, noise=0.05))
    assert frozen.split_layer == 0 and sum(frozen.counts) > 0
    return frozen


@pytest.mark.parametrize(
    "make",
    [frozen_atm_on_tiny, lambda: atmerge.ToMe(r=2), lambda: atmerge.MCTF(r=2, blocks=(1, 2))],
    ids=["frozen-atm", "tome", "mctf"],
)
def test_inductor_compiles_one_graph_equal_to_eager(make):
    torch.manual_seed(0)
    model = atmerge.patch(tiny_vit(), make())
    x = blocky_images(3, cells=4, noise=0.1)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        eager, eager_stats = run(model, x)
        compiled = torch.compile(model)
        out = compiled(x)
        compiled_stats = atmerge.last_stats(model)
        assert torch.allclose(out, eager, atol=1e-5, rtol=1e-5)
        assert compiled_stats.tokens_per_block == eager_stats.tokens_per_block
        assert math.isclose(compiled_stats.gflops, eager_stats.gflops)
        x2 = blocky_images(3, cells=8, noise=0.3, seed=7)  # new images: no recompilation, still equal
        assert torch.allclose(compiled(x2), model(x2), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
