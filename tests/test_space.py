"""Search spaces: every method's declared settings give valid methods at both ends of every
range, and labels name the fixed settings that differ from the defaults."""

import pytest
import torch

import atmerge
from atmerge.methods.registry import METHODS
from atmerge.methods.space import fixed_count_limit
from conftest import blocky_images, small_vit


def _corners(space):
    """Two settings: every knob at its low end (first choice), every knob at its high end (last)."""
    low = {k: (v.choices[0] if v.choices else (int(v.low) if v.integer else v.low)) for k, v in space.items()}
    high = {k: (v.choices[-1] if v.choices else (int(v.high) if v.integer else v.high)) for k, v in space.items()}
    return low, high


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_corner_of_every_space_runs(name):
    model = small_vit()  # depth 6, 64 patches
    space = METHODS[name].search_space(6, 64)
    assert space, f"{name} declares no search space"
    for params in _corners(space):
        method = METHODS[name]().with_params(params)
        atmerge.patch(model, method)
        with torch.no_grad():
            out = model(blocky_images(2))
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        assert atmerge.last_stats(model).gflops <= atmerge.gflops(small_vit(), (3, 32, 32)) + 1e-9


def test_fixed_count_limit_by_hand():
    assert fixed_count_limit(12, 196) == 25  # ⌈1.5 · 196 / 12⌉
    assert fixed_count_limit(12, 64) == 8
    assert fixed_count_limit(24, 4) == 1


def test_with_params_maps_searched_settings():
    assert atmerge.ToMe().with_params({"r": 3, "inflection": 0.0}) == atmerge.ToMe(r=3)
    assert atmerge.ToMe().with_params({"r": 3, "inflection": -1.0}) == atmerge.ToMe(r=(3, -1.0))
    assert atmerge.EViT().with_params({"keep_rate": 0.5, "first": 3, "every": 2}) == atmerge.EViT(0.5, (3, 5, 7))
    assert atmerge.ATM(similarity="centered").with_params({"alpha": 1.0}).similarity == "centered"


def test_labels_name_fixed_settings_that_differ():
    varied = tuple(atmerge.ATM.search_space(12, 196))
    assert atmerge.ATM(alpha=0.95).label(varied) == "ATM"
    assert atmerge.ATM(similarity="centered").label(varied) == "ATM (similarity=centered)"
    assert atmerge.ZeroTP().label() == "Zero-TP (simplified)"


def test_the_search_starts_from_the_methods_own_settings():
    from atmerge.methods.space import choice, floats, ints, starting_point

    space = {
        "alpha": floats(0.5, 1.0, 0.001),
        "beta": floats(0.001, 0.5, log=True),
        "theta_min": floats(0.9, 1.0, 0.005),
        "split_layer": ints(6, 12),
        "similarity": choice("raw", "centered"),
    }
    # theta_min 0.88 is outside [0.9, 1]; split_layer None is not an int: both left to the sampler
    assert starting_point(atmerge.ATM(), space) == {"alpha": 0.99, "beta": 0.04, "similarity": "raw"}
    assert not floats(0.5, 1.0, 0.005).contains(0.9912) and floats(0.5, 1.0, 0.005).contains(0.99)
    assert not ints(0, 4).contains(True) and not choice("a").contains("b")


def test_knob_is_the_deprecated_name_of_search_range():
    from atmerge.methods import space

    with pytest.warns(DeprecationWarning, match="Knob is renamed SearchRange"):
        from atmerge.methods.space import Knob
    assert Knob is space.SearchRange
    with pytest.raises(AttributeError, match="no attribute"):
        space.not_a_name  # noqa: B018
