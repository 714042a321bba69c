"""atmerge.score_profile: the model's own best-partner scores per block, and the search ranges
fitted to them."""

import math

import pytest
import torch

import atmerge
from atmerge.api import last_stats
from atmerge.score_profile import LEVELS, ScoreProfile, score_profile
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
    grid starts at 0.015) — the fitted range must contain it, and the paper's range."""
    q = torch.linspace(0.95, 1.0, len(LEVELS)).repeat(12, 1)
    space = atmerge.ATM.search_space(12, 256, ScoreProfile(LEVELS, {"raw": q}, images=8))
    beta = space["beta"]
    assert beta.log and beta.low <= 0.002 and beta.low == pytest.approx(math.log1p(0.005) / 11) and beta.high >= 0.05
    assert space["similarity"].choices == ("raw",) and (space["split_layer"].low, space["split_layer"].high) == (6, 12)


def test_quantile_levels_become_thresholds_of_the_chosen_similarity():
    raw = torch.linspace(0.9, 1.0, len(LEVELS)).repeat(4, 1)
    centered = torch.linspace(0.2, 1.0, len(LEVELS)).repeat(4, 1)
    centered[0] -= 0.1  # block 1 lower: α reads block 1, θ_min the per-block median
    profile = ScoreProfile(LEVELS, {"raw": raw, "centered": centered}, images=8)
    searched = {"alpha_level": 0.5, "theta_min_level": 0.25, "beta": 0.01, "similarity": "centered", "split_layer": 3}
    settings = atmerge.ATM.from_search(searched, profile)
    assert settings == {
        "alpha": pytest.approx(0.5),
        "theta_min": pytest.approx(0.4),
        "beta": 0.01,
        "similarity": "centered",
        "split_layer": 3,
    }
    method = atmerge.ATM().searched({**searched, "similarity": "raw"}, profile)
    assert (method.alpha, method.theta_min, method.similarity) == (pytest.approx(0.95), pytest.approx(0.925), "raw")
    assert atmerge.ATM.from_search({"alpha": 0.9}, None) == {"alpha": 0.9}  # the paper grid: as searched
    low_scores = ScoreProfile(LEVELS, {"raw": q - 0.6 if (q := raw) is not None else raw}, images=8)
    assert atmerge.ConstantThreshold.search_space(12, 256, low_scores)["theta"].low == pytest.approx(0.3)


def test_bad_similarities_are_refused(profiled):
    model, images, _ = profiled
    with pytest.raises(ValueError, match=r"similarities=\('cosine',\); choose from \('raw', 'centered'\)"):
        score_profile(model, [images], similarities=("cosine",))
