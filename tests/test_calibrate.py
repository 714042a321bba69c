"""atmerge.calibrate and its config files: goal logic on hand-made trials, the confidence bound
by hand, the budget held on the calibration images, config round trips, bad input."""

import json
import math
import warnings

import pytest
import torch

import atmerge
from atmerge.calibrate import Goal, agreement_lower_bound, confirm, folder_batches
from atmerge.config import FingerprintWarning, method_from_dict, method_to_dict
from atmerge.evaluate import evaluate
from conftest import blocky_images, small_vit

# a fake method family: cost grows and agreement grows with the setting
TRIALS = [
    {"trial": 0, "gflops": 0.30, "fidelity": 0.90},
    {"trial": 1, "gflops": 0.50, "fidelity": 0.97},
    {"trial": 2, "gflops": 0.55, "fidelity": 0.97},
    {"trial": 3, "gflops": 0.70, "fidelity": 0.995},
    {"trial": 4, "gflops": 0.90, "fidelity": 1.00},
]


def with_bounds(images):
    return [{**t, "fidelity_low": agreement_lower_bound(t["fidelity"], images)} for t in TRIALS]


def test_one_sided_wilson_bound_by_hand():
    z, n, p = 1.644854, 200, 0.99
    expected = (p + z * z / (2 * n) - z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    assert agreement_lower_bound(0.99, 200) == pytest.approx(expected)
    assert agreement_lower_bound(1.0, 200) == pytest.approx(n / (n + z * z))  # p = 1: n / (n + z²)


def as_measured(row):
    """A held-out measurement equal to the search's (what confirm sees with holdout=0)."""
    return row


def test_budget_goal_takes_the_most_faithful_within_budget():
    trials = with_bounds(1000)
    assert confirm(trials, Goal("budget", 0.6), as_measured) == (trials[1], True)  # a tie in fidelity: the cheaper
    assert confirm(trials, Goal("budget", 0.7), as_measured) == (trials[3], True)  # the budget itself is allowed
    assert confirm(trials, Goal("budget", 0.2), as_measured) == (trials[0], False)  # none within: the cheapest


def test_floor_goal_takes_the_cheapest_whose_lower_bound_clears_the_floor():
    # with 1,000 images: 0.97 → lower bound ≈ 0.9598; 0.995 → ≈ 0.9898; 1.0 → ≈ 0.9973
    trials = with_bounds(1000)
    assert confirm(trials, Goal("floor", 0.955), as_measured) == (trials[1], True)
    assert confirm(trials, Goal("floor", 0.96), as_measured) == (trials[3], True)
    assert confirm(trials, Goal("floor", 0.97), as_measured) == (trials[3], True)  # 0.97 measured is not enough
    trials = with_bounds(100)
    assert confirm(trials, Goal("floor", 0.99), as_measured) == (trials[4], False)  # 100 images: 1.0 → ≈ 0.974 only


def test_a_candidate_that_fails_on_the_held_out_images_gives_way_to_the_next():
    """The cheapest trial clearing the floor on the search images (the winner of many) is
    re-measured on held-out images; where it falls below the floor the next one is taken."""
    trials = with_bounds(1000)
    held_out = {1: 0.95, 2: 0.96, 3: 0.995, 4: 1.0}  # trials 1 and 2 do worse on the held-out images
    measure = lambda row: {**row, "fidelity_low": agreement_lower_bound(held_out.get(row["trial"], 0.9), 1000)}  # noqa: E731
    assert confirm(trials, Goal("floor", 0.955), measure) == (trials[3], True)
    over = lambda row: {**row, "gflops": row["gflops"] + 0.06}  # noqa: E731  costs more on the held-out images
    assert confirm(trials, Goal("budget", 0.55), over) == (trials[0], True)  # trial 1: 0.56 > 0.55; trial 0: 0.36


@pytest.fixture(scope="module")
def calibration_images():
    return blocky_images(24, cells=4, noise=0.05, seed=3)


def test_budget_is_never_exceeded_on_the_calibration_images(calibration_images):
    model = small_vit()
    dense = atmerge.gflops(model, (3, 32, 32))
    c = atmerge.calibrate(model, calibration_images, method="tome", budget=0.6, trials=6, batch_size=8, holdout=0)
    assert c.met and c.goal == "budget" and c.target == pytest.approx(0.6 * dense)
    atmerge.patch(model, c.method)
    res, _ = evaluate(model, list(calibration_images.split(8)))
    assert res.gflops <= 0.6 * dense and res.gflops == pytest.approx(c.gflops)
    assert len(c.trials) == 6 and c.images == c.search_images == 24


def test_the_reported_numbers_are_the_held_out_images(calibration_images):
    model = small_vit()
    c = atmerge.calibrate(model, calibration_images, method="atm", budget=0.6, trials=6, batch_size=8)
    assert (c.search_images, c.images) == (18, 6)  # every 4th image held out
    held_out = calibration_images[3::4]
    reference = model(held_out)
    atmerge.patch(model, c.method)
    res, _ = evaluate(model, [held_out])
    agreement = (model(held_out).argmax(-1) == reference.argmax(-1)).float().mean()
    assert c.held_out_gflops == pytest.approx(res.gflops) and c.fidelity == pytest.approx(float(agreement))
    # the cost: pooled over the held-out images and the searched ones it was measured on
    searched = c.search["gflops"] if not (c.landing and c.landing["kept"]) else c.landing["search"]["gflops"]
    assert min(searched, res.gflops) - 1e-9 <= c.gflops <= max(searched, res.gflops) + 1e-9
    assert c.met == (c.gflops <= c.target) and c.search["gflops"] <= c.target


def test_config_round_trip_and_fingerprint(calibration_images, tmp_path):
    model = small_vit()
    c = atmerge.calibrate(model, calibration_images, method="atm", min_agreement=0.5, trials=4, batch_size=8)
    path = atmerge.save_config(tmp_path / "atm.json", model, c)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same model: no warning
        assert atmerge.load_method(path, model) == c.method
        atmerge.patch(model, atmerge.load_method(str(path), model))
    with pytest.warns(DeprecationWarning, match="use atmerge.patch\\(model, atmerge.load_method"):
        atmerge.patch(model, str(path))  # the old spelling works for one release
    with pytest.raises(TypeError, match="atmerge.load_method"):
        atmerge.api.patch(model, str(path))  # the core takes a method only
    document = json.loads(path.read_text())
    assert document["measured"]["agreement"] == c.agreement and document["calibration"]["goal"] == "floor"
    assert document["calibration"]["held_out_images"] == c.images == 6
    assert document["measured"]["fidelity_measure"] == "agreement" and "top5_agreement" in document["measured"]
    torch.manual_seed(1)
    other = small_vit()  # same shape, other weights
    with pytest.warns(FingerprintWarning, match="calibrated on another model"):
        atmerge.patch(other, atmerge.load_method(path, other))


def test_feature_model_is_judged_by_output_cosine(calibration_images):
    model = small_vit(num_classes=0)
    c = atmerge.calibrate(model, calibration_images, method="atm", min_cosine=0.9, trials=5, batch_size=8)
    assert c.measure == "cosine" and c.agreement is None and set(c.details) >= {"cosine", "cosine_low"}
    # the reported cosine is the mean per-image cosine of the chosen setting on the held-out
    # images (every 4th), recomputed here
    held_out = calibration_images[3::4]
    reference = torch.cat([model(x) for x in held_out.split(8)])
    atmerge.patch(model, c.method)
    with torch.no_grad():
        merged = torch.cat([model(x) for x in held_out.split(8)])
    cosine = torch.nn.functional.cosine_similarity(merged, reference.detach(), dim=-1).mean()
    assert c.fidelity == pytest.approx(float(cosine), abs=1e-5) == pytest.approx(c.details["cosine"], abs=1e-5)
    assert c.met and c.fidelity_low >= 0.9  # reachable: the chosen setting keeps cosine ≈ 1 at ~47% of the cost
    with pytest.raises(ValueError, match="needs a classifier; this model outputs features"):
        atmerge.calibrate(model, calibration_images, min_agreement=0.9, trials=1)


def test_one_search_serves_several_goals(calibration_images):
    from atmerge.calibrate import calibrate_goals

    model = small_vit()
    goals = [{"budget": 0.8}, {"budget": 0.6}, {"min_agreement": 0.5}]
    results = atmerge.calibrate_goals(model, calibration_images, goals, method="atm", trials=6, batch_size=8)
    assert calibrate_goals is atmerge.calibrate_goals
    assert [c.goal for c in results] == ["budget", "budget", "floor"]
    assert all(c.trials is results[0].trials and len(c.trials) == 6 for c in results)  # the same trials
    assert not any(t["pruned"] for t in results[0].trials)  # every trial saw every image
    for c in results[:2]:  # both budgets are reachable (a trial costs ~51% of the unpatched model)
        assert c.met and c.gflops <= c.target
    assert results[2].met and results[2].fidelity_low >= 0.5
    # the fitted space searches the similarity and the split layer too
    assert {"similarity", "split_layer"} <= set(results[0].space) and results[0].profile[
        "images"
    ] == 18  # search images


@pytest.mark.parametrize(
    "method",
    [
        atmerge.ToMe(r=(3, -0.5)),
        atmerge.ToMe(r=[1, 2, 3]),
        atmerge.EViT(0.6, (2, 4)),
        atmerge.MCTF(r=0.35, blocks=(2, 3)),
    ],
)
def test_methods_round_trip_through_json(method):
    assert method_from_dict(json.loads(json.dumps(method_to_dict(method)))) == method


def test_folder_images_any_layout_unreadable_skipped(tmp_path):
    from PIL import Image

    (tmp_path / "a" / "b").mkdir(parents=True)
    for i, where in enumerate(["x.png", "a/y.jpg", "a/b/z.png"]):
        Image.new("RGB", (40, 36), (10 * i, 20, 30)).save(tmp_path / where)
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    import torchvision.transforms as T

    batches, skipped = folder_batches(tmp_path, T.Compose([T.Resize((32, 32)), T.ToTensor()]), batch_size=2)
    assert [b.shape[0] for b in batches] == [2, 1] and skipped == 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(budget=0.0), ValueError, r"budget=0.0 is a share of the unpatched GFLOPs; allowed \(0, 1\)"),
        (dict(budget=1.0), ValueError, r"budget=1.0 is a share"),
        (dict(budget_gflops=-1), ValueError, r"budget_gflops=-1 must be a positive number"),
        (dict(min_agreement=0), ValueError, r"min_agreement=0 is out of range; allowed \(0, 1\]"),
        (dict(min_agreement=1.2), ValueError, r"min_agreement=1.2 is out of range"),
        (dict(budget=0.5, min_agreement=0.9), ValueError, "give exactly one goal"),
        (dict(), ValueError, "give exactly one goal of budget, budget_gflops, min_agreement, min_cosine; got none"),
        (dict(min_cosine=float("nan")), ValueError, r"min_cosine=nan is out of range; allowed \(0, 1\]"),
        (
            dict(budget=0.5, fidelity="l2"),
            ValueError,
            r"fidelity='l2' is not supported; choose one of \('agreement', 'cosine'\)",
        ),
        (
            dict(min_cosine=0.9, fidelity="agreement"),
            ValueError,
            "min_cosine does not fit fidelity measure 'agreement'",
        ),
        (dict(budget=0.5, trials=0), ValueError, r"trials=0 must be an integer >= 1"),
        (dict(budget=0.5, method="nope"), ValueError, "unknown method 'nope'"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        atmerge.calibrate(small_vit(), blocky_images(2), **{"trials": 1, **kwargs})


def test_bad_folders_and_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder .*missing does not exist"):
        atmerge.calibrate(small_vit(), tmp_path / "missing", budget=0.5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        atmerge.calibrate(small_vit(), tmp_path / "empty", budget=0.5)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        atmerge.load_method(bad)
    bad.write_text(json.dumps({"format": "atmerge-config/1", "method": {"name": "atm", "settings": {"alpha": 3}}}))
    with pytest.raises(ValueError, match=r"alpha=3 is out of range"):
        atmerge.load_method(bad)
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="field 'format' must be 'atmerge-config/1'"):
        atmerge.load_method(bad)


def test_hopeless_trials_by_hand():
    from atmerge.calibrate import hopeless
    from atmerge.fidelity import wilson_interval

    finished = [{"gflops": 0.5, "fidelity": 0.99, "fidelity_low": 0.985}]
    upper = lambda k: wilson_interval(k, 100)[1]  # noqa: E731  two-sided 95% upper bound of k/100
    budget, floor = Goal("budget", 0.6), Goal("floor", 0.95)
    # budget 0.6: a cost estimate of 0.64 is above 0.6 × 1.05 → stop; 0.62 is not
    assert hopeless(budget, 1.0, 0.64, [])
    assert not hopeless(budget, 1.0, 0.62, [])
    # 80 of 100 agree: the 95% upper bound ≈ 0.87 < 0.99 of the best finished trial → stop
    assert hopeless(budget, upper(80), 0.55, finished)
    assert not hopeless(budget, upper(98), 0.55, finished)
    # floor 0.95: 90/100 (upper ≈ 0.945) cannot clear it; 96/100 can, unless it costs more than 0.5 × 1.05
    assert hopeless(floor, upper(90), 0.3, [])
    assert not hopeless(floor, upper(96), 0.52, finished)
    assert hopeless(floor, upper(96), 0.53, finished)


def test_unreachable_goals_are_reported_not_met_with_the_closest_setting(calibration_images):
    """A budget below what any setting costs and a floor above what the held-out images can show:
    met is False; for the budget the method is the cheapest trial (the closest)."""
    model = small_vit()
    dense = atmerge.gflops(model, (3, 32, 32))
    # 5% of the cost: below the first block alone, which sees every token (1/6 of the blocks)
    # 0.99 floor: even 6 of 6 held-out images agreeing give a lower bound of 6 / (6 + 1.645²) ≈ 0.69
    budget, floor = atmerge.calibrate_goals(
        model,
        calibration_images,
        [{"budget": 0.05}, {"min_agreement": 0.99}],
        method="tome",
        trials=4,
        batch_size=8,
        paired=False,
    )
    assert not budget.met and budget.gflops > budget.target == pytest.approx(0.05 * dense)
    assert budget.search["gflops"] == min(t["gflops"] for t in budget.trials)
    assert not floor.met and floor.fidelity_low < 0.99 and floor.images == 6
    assert floor.fidelity_low == pytest.approx(agreement_lower_bound(floor.fidelity, 6))
