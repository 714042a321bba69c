"""atmerge.profile: the model's own best-partner scores per block, and the search ranges fitted
to them."""

import math

import pytest
import torch

import atmerge
from atmerge.api import last_stats
from atmerge.profile import LEVELS, ScoreProfile, score_profile
from conftest import blocky_images, small_vit


@pytest.fixture(scope="module")
def profiled():
    torch.manual_seed(0)
    model = small_vit()
    images = blocky_images(16, cells=4, noise=0.05, seed=1)
    return model, images, score_profile(model, list(images.split(8)))


def test_quantiles_are_ordered_scores_and_the_model_is_left_unpatched(profiled):
    model, _, profile = profiled
    assert profile.images == 16 and profile.depth == 6 and profile.similarities == ("raw", "centered")
    for q in profile.quantiles.values():
        assert q.shape == (6, len(LEVELS))
        assert torch.all(q.diff(dim=1) >= 0) and q.min() >= -1 and q.max() <= 1
    assert "Merging" not in type(model).__name__


@pytest.mark.parametrize("level", [0.25, 0.5, 0.8])
def test_a_threshold_at_a_quantile_merges_that_share_of_set_a(profiled, level):
    """Independent check through the merging code: θ = the block-1 quantile at ``level`` makes
    a constant-threshold merge in block 1 take ≈ (1 − level) of the 32 set-A tokens."""
    model, images, profile = profiled
    theta = profile.quantile(level, "raw", block=0)
    atmerge.patch(model, atmerge.ConstantThreshold(theta=max(theta, 0.0), blocks=(1,)))
    with torch.no_grad():
        model(images)
    merged = last_stats(model).merged_per_block[0]
    atmerge.unpatch(model)
    assert abs(merged - (1 - level) * 32) <= 2  # interpolation between kept levels, rounding of r


def test_quantile_takes_the_lowest_block_and_similarity_by_default():
    q = torch.linspace(0.5, 1.0, len(LEVELS)).repeat(3, 1)
    q[1] -= 0.2
    profile = ScoreProfile(LEVELS, {"raw": q, "centered": q - 0.1}, images=4)
    assert profile.quantile(0.0) == pytest.approx(0.2)  # block 2, centered
    assert profile.quantile(0.0, "raw") == pytest.approx(0.3)
    assert profile.quantile(0.025, "raw", block=0) == pytest.approx(0.5125)  # halfway between two levels


def test_atm_space_fitted_to_high_scores_reaches_dinov2_like_decays():
    """DINOv2-S's raw keys score above 0.95 in most blocks; they need β ≈ 0.002 (the paper's
    grid starts at 0.015) — the fitted range must contain it, and the paper's ranges."""
    q = torch.linspace(0.95, 1.0, len(LEVELS)).repeat(12, 1)
    space = atmerge.ATM.search_space(12, 256, ScoreProfile(LEVELS, {"raw": q}, images=8))
    beta = space["beta"]
    assert beta.log and beta.low <= 0.002 and beta.low == pytest.approx(math.log1p(0.005) / 11)
    assert beta.high >= 0.05 and space["alpha"].low <= 0.945 and space["theta_min"].low <= 0.80
    assert space["similarity"].choices == ("raw",) and (space["split_layer"].low, space["split_layer"].high) == (6, 12)
    low_scores = ScoreProfile(LEVELS, {"raw": q - 0.6}, images=8)  # scores from 0.35: ranges reach down
    fitted = atmerge.ATM.search_space(12, 256, low_scores)
    assert fitted["theta_min"].low == pytest.approx(0.35 + 0.05 * 0.05, abs=1e-3)
    assert atmerge.ConstantThreshold.search_space(12, 256, low_scores)["theta"].low == pytest.approx(0.35)


def test_bad_similarities_are_refused(profiled):
    model, images, _ = profiled
    with pytest.raises(ValueError, match=r"similarities=\('cosine',\); choose from \('raw', 'centered'\)"):
        score_profile(model, [images], similarities=("cosine",))
