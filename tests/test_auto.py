"""method="auto" and landing on the goal: the choice between methods by hand-made confirmed numbers
(held-out beats searched), bisection that approaches a budget and never passes it, the end-to-end
choice on a small model, configs that keep the comparison, and bad input."""

import json
from pathlib import Path

import pytest
import torch

import atmerge
from atmerge.calibrate import Calibration, _winner, auto_methods
from atmerge.landing import land_on_budget, land_on_floor
from atmerge.tuning import Goal
from conftest import blocky_images, small_vit


def calibration(
    method, gflops, fidelity, fidelity_low, met, search_fidelity, images=100, values=None, search_images=0
) -> Calibration:
    return Calibration(
        method=method,
        goal="budget",
        target=0.6,
        met=met,
        measure="agreement",
        gflops=gflops,
        gflops_share=gflops,
        fidelity=fidelity if values is None else float(values.double().mean()),
        fidelity_low=fidelity_low,
        images=images if values is None else values.numel(),
        unpatched_gflops=1.0,
        search={"gflops": gflops, "fidelity": search_fidelity, "fidelity_low": fidelity_low},
        search_images=search_images,
        held_out_values=values,
    )


def agreeing(n: int, misses: list[int]) -> torch.Tensor:
    """Per-image agreement of n held-out images: 1 except at ``misses``."""
    values = torch.ones(n, dtype=torch.float64)
    values[misses] = 0
    return values


def test_the_held_out_numbers_not_the_searched_ones_choose_the_winner():
    a = calibration(atmerge.ATM(), 0.59, 0.95, 0.93, True, search_fidelity=0.99)  # best searched
    b = calibration(atmerge.ToMe(r=4), 0.58, 0.97, 0.95, True, search_fidelity=0.96)  # best held out
    chosen = _winner(Goal("budget", 0.6), [a, b], [atmerge.ATM(), atmerge.ToMe()])
    assert chosen.method == atmerge.ToMe(r=4)
    assert [row["chosen"] for row in chosen.compared] == [False, True]
    assert [row["method"] for row in chosen.compared] == ["ATM", "ToMe"]


def test_a_goal_met_beats_a_more_faithful_setting_that_missed_it():
    over = calibration(atmerge.ATM(), 0.62, 0.99, 0.98, False, 0.99)  # over budget on the held-out images
    within = calibration(atmerge.ToMe(r=4), 0.58, 0.90, 0.88, True, 0.90)
    assert _winner(Goal("budget", 0.6), [over, within], [atmerge.ATM(), atmerge.ToMe()]).method == atmerge.ToMe(r=4)
    # a floor: the cheapest setting that meets it; none met: the highest lower bound, not met
    cheap = calibration(atmerge.ATM(), 0.50, 0.99, 0.981, True, 0.99, images=2000)
    dear = calibration(atmerge.ToMe(r=2), 0.70, 0.995, 0.99, True, 0.995, images=2000)
    assert _winner(Goal("floor", 0.98), [dear, cheap], [atmerge.ToMe(), atmerge.ATM()]).method == atmerge.ATM()
    missed = [
        calibration(atmerge.ATM(), 0.5, 0.9, 0.85, False, 0.9),
        calibration(atmerge.ToMe(), 0.6, 0.95, 0.9, False, 0.95),
    ]
    chosen = _winner(Goal("floor", 0.98), missed, [atmerge.ATM(), atmerge.ToMe()])
    assert chosen.method == atmerge.ToMe() and not chosen.met


def test_within_held_out_noise_the_pooled_numbers_decide_beyond_it_the_held_out_ones():
    """Budget: a method whose held-out fidelity trails the best by less than one paired standard
    error stays in, and of those the most faithful over every calibration image wins; one that
    trails by more is out, however well it did on the searched images."""
    n = 500
    leader = agreeing(n, list(range(0, 20)))  # 96.0% held out
    close = agreeing(n, list(range(0, 10)) + list(range(100, 112)))  # 95.6%: 12 misses of its own, 10 fewer
    far = agreeing(n, list(range(0, 20)) + list(range(100, 115)))  # 93.0%: 15 more misses
    a = calibration(atmerge.ToMe(r=4), 0.59, None, 0.94, True, 0.95, values=leader, search_images=1500)
    b = calibration(atmerge.ATM(), 0.59, None, 0.94, True, 0.975, values=close, search_images=1500)
    c = calibration(atmerge.MCTF(r=3), 0.59, None, 0.90, True, 0.999, values=far, search_images=1500)
    bases = [atmerge.ToMe(), atmerge.ATM(), atmerge.MCTF()]
    chosen = _winner(Goal("budget", 0.6), [a, b, c], bases)
    assert chosen.method == atmerge.ATM() and chosen.met  # pooled: 0.9705 against ToMe's 0.9525
    assert [row["contender"] for row in chosen.compared] == [True, True, False]  # MCTF: 3 points behind held out
    assert chosen.compared[1]["pooled_fidelity"] == pytest.approx((0.956 * 500 + 0.975 * 1500) / 2000)
    # without the close one, the far one's searched 99.9% does not win it back
    assert _winner(Goal("budget", 0.6), [a, c], [bases[0], bases[2]]).method == atmerge.ToMe(r=4)
    # the gap, 2 images, is within noise: the two disagree on 22 images, one way or the other
    from atmerge.calibrate import paired_gap

    gap, se = paired_gap(leader, close)
    assert gap == pytest.approx(2 / n) and gap <= se


def test_a_floor_auto_marks_met_clears_it_at_the_risk_shared_by_the_methods_compared():
    """Floor: the cheapest method is taken only if its held-out bound clears the floor at
    z = Φ⁻¹(1 − 0.05 / k) for k methods compared — one that clears it at one-sided 95% only
    gives way to a dearer one that clears the stricter bound; if none does, not met."""
    from statistics import NormalDist

    from atmerge.calibrate import floor_bound

    n = 1000
    cheap = calibration(atmerge.ATM(), 0.70, None, 0.9815, True, 0.99, values=agreeing(n, list(range(12))))
    dear = calibration(atmerge.ToMe(r=2), 0.85, None, 0.9935, True, 0.998, values=agreeing(n, [0, 1]))
    other = calibration(atmerge.MCTF(r=1), 0.90, None, 0.99, True, 0.998, values=agreeing(n, [0, 1, 2]))
    z = NormalDist().inv_cdf(1 - 0.05 / 3)
    assert floor_bound(cheap, 1.644854) >= 0.98 > floor_bound(cheap, z)  # clears at 95%, not at 1 − 0.05/3
    bases = [atmerge.ATM(), atmerge.ToMe(), atmerge.MCTF()]
    chosen = _winner(Goal("floor", 0.98), [cheap, dear, other], bases)
    assert chosen.method == atmerge.ToMe(r=2) and chosen.met
    assert chosen.compared[0]["family_bound"] < 0.98 <= chosen.compared[1]["family_bound"]
    # alone, the cheap one is judged at one-sided 95% (k = 1) and is taken
    assert _winner(Goal("floor", 0.98), [cheap], bases[:1]).method == atmerge.ATM()
    # no method clears the stricter bound: the highest bound, marked not met
    missed = _winner(Goal("floor", 0.995), [cheap, dear, other], bases)
    assert missed.method == atmerge.ToMe(r=2) and not missed.met


def test_no_method_with_a_setting_is_one_line_naming_each_reason():
    with pytest.raises(ValueError, match="no method has a setting for this goal") as error:
        _winner(Goal("budget", 0.01), ["out of this method's reach: 0.2", "stopped"], [atmerge.ATM(), atmerge.ToMe()])
    assert "\n" not in str(error.value) and "ATM: out of" in str(error.value) and "ToMe: stopped" in str(error.value)


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    return small_vit().eval(), blocky_images(48, seed=2)


def mean_cost(model, method, images) -> float:
    atmerge.patch(model, method)
    with torch.no_grad():
        model(images)
    cost = atmerge.last_stats(model).gflops
    atmerge.unpatch(model)
    return cost


def test_landing_on_a_budget_gets_close_and_never_passes_it(model_and_images):
    model, images = model_and_images
    dense = atmerge.gflops(model, tuple(images.shape[1:]))
    dial = atmerge.ConstantThreshold(theta=0.9).dial(6, 64)
    for share in (0.5, 0.7):
        target = share * dense
        landing = land_on_budget(model, dial, target, [images])
        assert landing.gflops == pytest.approx(mean_cost(model, landing.method, images))
        assert landing.gflops <= target  # never past the budget
        # the largest t within it, to the bisection's resolution: one step further costs more than the budget
        nearer = dial(min(landing.t + 2**-8, 1.0))
        assert landing.t >= 1 - 2**-12 or mean_cost(model, nearer, images) > target
        # with a window: it stops once within it (interpolating once bracketed), in fewer steps
        window = 0.02 * dense
        quick = land_on_budget(model, dial, target, [images], window=window)
        assert target - window <= quick.gflops <= target or quick.gflops == landing.gflops
        assert quick.steps <= landing.steps
    assert land_on_budget(model, dial, 1e-6, [images]) is None  # below the cheapest setting


def test_landing_on_a_floor_clears_it_more_cheaply_or_says_it_cannot(model_and_images):
    model, images = model_and_images
    atmerge.unpatch(model)
    with torch.no_grad():
        reference = model(images)
    dial = atmerge.ToMe(r=2).dial(6, 64)
    landing = land_on_floor(model, dial, 0.5, [images], reference, "agreement", bound="mean")
    atmerge.patch(model, landing.method)
    with torch.no_grad():
        agreement = (model(images).argmax(-1) == reference.argmax(-1)).float().mean().item()
    atmerge.unpatch(model)
    assert agreement == pytest.approx(landing.fidelity) and agreement >= 0.5  # it clears the floor
    assert landing.gflops <= mean_cost(model, dial(1.0), images)  # never dearer than the dial's top
    assert landing.t < 1 and landing.steps > 1
    # a floor no setting on the dial clears: None, not a setting that misses it
    assert land_on_floor(model, dial, 1.0, [images], -reference, "agreement", bound="mean") is None


def test_auto_chooses_the_best_confirmed_method_and_the_config_keeps_the_table(model_and_images, tmp_path):
    model, images = model_and_images
    found = atmerge.calibrate(model, images, budget=0.6, method="auto", methods=["atm", "tome"], trials=3)
    assert [row["method"] for row in found.compared] == ["ATM", "ToMe"]
    assert sum(row["chosen"] for row in found.compared) == 1
    candidates = [row for row in found.compared if row["setting"] is not None and row["met"]]
    best = max(candidates, key=lambda row: (row["fidelity"], row["gflops"]))
    assert best["contender"]  # the best held out is always in; of those within its noise, the pooled numbers decide
    contenders = [row for row in candidates if row["contender"]]
    chosen = max(contenders, key=lambda row: (row["pooled_fidelity"] or 0.0, row["gflops"]))
    assert repr(found.method) == chosen["setting"] and found.met
    assert found.gflops <= found.target
    path = atmerge.save_config(tmp_path / "auto.json", model, found)
    kept = json.loads(path.read_text())["calibration"]["compared"]
    assert [row["method"] for row in kept] == ["ATM", "ToMe"] and sum(row["chosen"] for row in kept) == 1


def test_landing_spends_the_budget_the_search_left(model_and_images):
    model, images = model_and_images
    plain = atmerge.calibrate(model, images, budget=0.6, method="constant", trials=2, land=False, holdout=0)
    landed = atmerge.calibrate(model, images, budget=0.6, method="constant", trials=2, holdout=0)
    assert plain.landing is None
    if landed.landing and landed.landing["kept"]:
        from atmerge.calibrate import paired_gap

        assert plain.gflops < landed.gflops <= landed.target
        gap, se = paired_gap(plain.held_out_values, landed.held_out_values)  # not less faithful beyond noise
        assert gap <= se
    else:  # not kept: the search's own setting is shipped unchanged
        assert landed.method == plain.method


def test_a_setting_over_the_budget_is_landed_down_into_it(model_and_images):
    """No trial met the budget (one trial, dearer than it): the closest is moved down its dial to
    the budget, confirmed held out and kept, so that it is compared at the budget, not above it."""
    model, images = model_and_images
    plain = atmerge.calibrate(
        model, images, budget=0.6, method=atmerge.ToMe(r=4), trials=1, early_stop=False, land=False
    )
    landed = atmerge.calibrate(model, images, budget=0.6, method=atmerge.ToMe(r=4), trials=1, early_stop=False)
    assert not plain.met and plain.gflops > plain.target
    assert landed.landing["kept"] and landed.met
    assert landed.gflops <= landed.target and landed.gflops_share >= 0.6 - 0.05  # within a few tokens of it
    assert landed.gflops == pytest.approx(mean_cost(model, landed.method, images))


def test_auto_bad_input_is_one_line(model_and_images):
    model, images = model_and_images
    with pytest.raises(ValueError, match="non-empty list of method names"):
        atmerge.calibrate(model, images, budget=0.6, method="auto", methods=[])
    with pytest.raises(ValueError, match="atn"):
        atmerge.calibrate(model, images, budget=0.6, method="auto", methods=["atn"])
    with pytest.raises(ValueError, match="methods= is for method='auto'"):
        atmerge.calibrate(model, images, budget=0.6, method="atm", methods=["tome"])
    # a budget below every method's cheapest setting: trials run on all images at once finish,
    # and the closest setting is returned marked not met ...
    closest = atmerge.calibrate(model, images, budget_gflops=1e-6, method="auto", methods=["atm", "tome"], trials=2)
    assert not closest.met and not any(row["met"] for row in closest.compared)
    assert closest.gflops == min(row["gflops"] for row in closest.compared)
    # ... staged trials stop at the first share of the images, and the error names each method's reach
    with pytest.raises(ValueError, match="no method has a setting for this goal.*out of this method's reach"):
        atmerge.calibrate(
            model, images, budget_gflops=1e-6, method="auto", methods=["atm", "tome"], trials=2, batch_size=4
        )


def test_auto_compares_merging_methods_and_pruning_ones_only_when_asked():
    names = [type(m).__name__ for m in auto_methods()]
    assert {"ATM", "ToMe", "TopR", "MCTF", "ConstantThreshold"} <= set(names)
    assert not {"EViT", "ZeroTP", "Frozen"} & set(names)
    assert [type(m).__name__ for m in auto_methods(["atm", "evit"])] == ["ATM", "EViT"]


def test_calibration_warns_when_its_images_overlap_what_the_head_was_trained_on(model_and_images, tmp_path):
    from PIL import Image

    from atmerge.calibrate import TrainedOnWarning, warn_if_trained_on
    from atmerge.data import folder_files

    files = []
    for i in range(6):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(path)
        files.append(path)
    model, _ = model_and_images
    model.atmerge_trained_on = frozenset(files[:2])
    try:
        with pytest.warns(TrainedOnWarning, match="2 of the 6 calibration images"):
            assert warn_if_trained_on(model, tmp_path / "images") == 2
        # the images it was not trained on: no warning, and exclude= picks exactly those
        kept = folder_files(tmp_path / "images", exclude=model.atmerge_trained_on)
        assert kept == files[2:]
        assert folder_files(tmp_path / "images", limit=2, seed=0, exclude=model.atmerge_trained_on)[0] in files[2:]
        assert warn_if_trained_on(model, torch.zeros(1, 3, 32, 32)) == 0  # a tensor: cannot tell
    finally:
        del model.atmerge_trained_on


@pytest.mark.shared
def test_the_shared_probe_records_the_images_it_was_trained_on():
    from atmerge import data
    from atmerge.experiments.probe import probe_training_files

    files = probe_training_files(20, 0)
    subset = data.subset(data.image_folder(data.cifar10_folder("train"), None), 20, 0)
    assert files == {Path(subset.dataset.samples[i][0]) for i in subset.indices} and len(files) == 20


def test_the_command_line_calibrates_with_auto_and_draws_the_comparison(tmp_path, capsys):
    from atmerge.cli import main

    args = ["calibrate", "--method", "auto", "--compare", "atm", "tome", "--budget", "0.6", "--limit", "32"]
    assert main([*args, "--trials", "2", "--no-progress", "--out", str(tmp_path)]) in (0, 1)
    out = capsys.readouterr().out
    assert "method auto, budget 0.6: every method on the held-out images" in out and "ToMe" in out
    document = json.loads((tmp_path / "calibration.json").read_text())
    compared = document["calibration"]["compared"]
    assert [row["method"] for row in compared] == ["ATM", "ToMe"] and sum(row["chosen"] for row in compared) == 1
    assert (tmp_path / "auto_budget_0.6.png").stat().st_size > 0


def test_a_fixed_count_dial_moves_one_token_at_a_time():
    from atmerge.core.schedules import scaled_schedule

    assert scaled_schedule([4, 4, 2, 0], 1.0) == [4, 4, 2, 0]  # scale 1: the schedule itself
    assert scaled_schedule([4, 4, 2, 0], 0.5) == [2, 2, 1, 0]
    assert scaled_schedule([4, 4, 2, 0], 1.05) == [4, 4, 2, 0] and scaled_schedule([4, 4, 2, 0], 1.1) == [4, 4, 3, 0]
    assert scaled_schedule([0, 0, 0], 1.5) == [1, 2, 1]  # all zero: scaled as a constant schedule
    totals = [sum(scaled_schedule([3, 2, 1], k / 20)) for k in range(41)]
    assert totals == sorted(totals) and set(range(totals[-1] + 1)) <= set(totals)  # every total, in order
    tome = atmerge.ToMe(r=(4, 0.5))
    dial = tome.dial(6, 64)
    assert dial(0.5).schedule(6) == tome.schedule(6) and sum(dial(1.0).schedule(6)) == 0


@pytest.mark.parametrize(
    "method", [atmerge.TopR(r=2), atmerge.TopR(schedule="decreasing", r=4), atmerge.MCTF(r=2), atmerge.ToMe(r=(3, 0.5))]
)
def test_a_fixed_count_landing_never_passes_the_budget_and_stops_within_one_token_of_it(model_and_images, method):
    """top-r and MCTF move one token at a time along their dials, as ToMe: the landing costs at
    most the budget, and the dial's next setting — one token fewer merged — costs more than it."""
    model, images = model_and_images
    dense = atmerge.gflops(model, tuple(images.shape[1:]))
    dial = method.dial(6, 64)
    counts = method.counts(6) if hasattr(method, "counts") else method.schedule(6)
    assert (
        dial(0.5) == method or (dial(0.5).counts(6) if hasattr(method, "counts") else dial(0.5).schedule(6)) == counts
    )
    total = sum(counts)
    for share in (0.7, 0.8, 0.9):
        landing = land_on_budget(model, dial, share * dense, [images])
        if landing is None:  # below the dial's cheapest setting
            assert mean_cost(model, dial(0.0), images) > share * dense
            continue
        assert landing.gflops <= share * dense
        assert landing.gflops == pytest.approx(mean_cost(model, landing.method, images))
        landed = landing.method.counts(6) if hasattr(method, "counts") else landing.method.schedule(6)
        kept_more = sum(landed) - 1  # one token fewer merged: the dial's next setting
        if kept_more < 0:
            continue
        t = 1 - (kept_more + 0.5) / total / 2  # its scale lies in [kept_more, kept_more + 1) / total
        nearer = dial(t)
        nearer_counts = nearer.counts(6) if hasattr(method, "counts") else nearer.schedule(6)
        assert sum(nearer_counts) == kept_more
        assert mean_cost(model, nearer, images) > share * dense


def test_per_block_counts_are_the_same_method_as_their_schedule(model_and_images):
    """The dial's per-block lists: TopR(r=list) and MCTF(r=list) merge exactly as the schedules
    they were read from."""
    model, images = model_and_images

    def outputs(method):
        atmerge.patch(model, method)
        with torch.no_grad():
            out = model(images)
        atmerge.unpatch(model)
        return out

    topr = atmerge.TopR(schedule="increasing", r=1)
    assert torch.equal(outputs(topr), outputs(atmerge.TopR(r=topr.counts(6))))
    mctf = atmerge.MCTF(r=3)
    assert mctf.counts(6) == [0, 3, 3, 3, 3, 3]
    assert torch.equal(outputs(mctf), outputs(atmerge.MCTF(r=mctf.counts(6))))
    with pytest.raises(ValueError, match="r must be a list of integers"):
        atmerge.MCTF(r=[1, -1])
    with pytest.raises(ValueError, match="r must be a list of integers"):
        atmerge.TopR(r=[1, 2.5])
