"""The one tuning engine (atmerge.tuning) serves calibration and `atmerge search` alike: the same
trials for the same seed, measures worked by hand, goals met or not by hand-made numbers, and
stopped trials never chosen."""

import pytest
import torch

import atmerge
from atmerge.experiments.search import search
from atmerge.trials import unpatched_outputs
from atmerge.tuning import Goal, per_image_values, staged_trials
from conftest import blocky_images, small_vit


def test_measures_by_hand():
    outputs = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 5.0, 0.0]])
    reference = torch.tensor([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 9.0, 0.0]])  # classes 0, 1, 1
    labels = torch.tensor([0, 2, 0])
    assert per_image_values(outputs, labels, "top1").tolist() == [1.0, 1.0, 0.0]
    assert per_image_values(outputs, reference, "agreement").tolist() == [1.0, 0.0, 1.0]
    cosine = per_image_values(outputs, reference, "cosine")
    assert cosine[0].item() == pytest.approx(2 / 5**0.5)  # (2·9) / (√5 · 9)


def test_goals_by_hand():
    row = {"gflops": 0.5, "fidelity": 0.97, "fidelity_low": 0.95}
    assert Goal("budget", 0.5).met_by(row) and not Goal("budget", 0.49).met_by(row)
    assert Goal("floor", 0.95).met_by(row) and not Goal("floor", 0.96).met_by(row)  # the lower bound
    assert Goal("floor", 0.96, "mean").met_by(row) and not Goal("floor", 0.98, "mean").met_by(row)


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    model = small_vit().eval()
    images = blocky_images(24, seed=1)
    return model, images


def test_search_and_calibration_draw_the_same_trials(model_and_images):
    """`search` is the calibration engine: for one seed, measure and goal it tries the same
    settings and measures the same numbers as the engine called directly on the batches in the
    spread order calibration stages them in (a folder sorted by class is not staged on one class)."""
    from atmerge.tuning import spread

    model, images = model_and_images
    batches = list(images.split(8))
    _, reference, _ = unpatched_outputs(model, [(x, None) for x in batches])
    spread_batches, spread_reference = spread(batches, reference)
    assert [b.data_ptr() for b in spread_batches] != [b.data_ptr() for b in batches]  # the order changed
    direct = staged_trials(
        model, spread_batches, atmerge.ATM(), spread_reference, measure="agreement", goal=None, trials=4, seed=3
    )
    searched = search(model, [(x, None) for x in batches], measure="agreement", trials=4, seed=3)
    keys = ("alpha", "beta", "theta_min", "gflops", "fidelity")
    assert [{k: r[k] for k in keys} for r in searched["trials"]] == [{k: r[k] for k in keys} for r in direct]
    assert all(r["quality"] == r["agreement"] == r["fidelity"] for r in searched["trials"])


def test_search_with_a_budget_stops_hopeless_trials_and_never_picks_them(model_and_images):
    model, images = model_and_images
    dense = atmerge.gflops(model, tuple(images.shape[1:]))
    batches = [(x, None) for x in images.split(3)]
    result = search(model, batches, measure="agreement", goal="budget", budget=0.6 * dense, trials=8, seed=0)
    pruned = [r for r in result["trials"] if r["pruned"]]
    assert pruned, "a budget of 60% should stop some trials early on this model"
    assert all(r["images"] < images.shape[0] and not r["feasible"] for r in pruned)
    assert all(r["gflops"] <= 0.6 * dense for r in result["trials"] if r["feasible"])
    best = result["best"]
    assert best is not None and best == max(
        (r for r in result["trials"] if r["feasible"]), key=lambda r: (r["quality"], -r["gflops"])
    )
    assert all(not r["pruned"] for r in result["pareto_front"])


def test_search_metric_is_a_deprecated_name_of_measure(model_and_images):
    model, images = model_and_images
    batches = [(x, None) for x in images.split(12)]
    with pytest.warns(DeprecationWarning, match="measure"):
        old = search(model, batches, metric="agreement", trials=2)
    new = search(model, batches, measure="agreement", trials=2)
    assert old["trials"] == new["trials"] and new["measure"] == "agreement"
    with pytest.raises(ValueError, match="measure='accuracy'"):
        search(model, batches, measure="accuracy", trials=1)
    with pytest.raises(ValueError, match="no labels"):
        search(model, batches, measure="top1", trials=1)


def test_the_command_line_names_the_measure_one_way_and_keeps_the_old_spellings():
    from atmerge.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["search", "--measure", "agreement"]).metric == "agreement"
    assert parser.parse_args(["calibrate", "--measure", "cosine", "--budget", "0.5"]).fidelity == "cosine"
    with pytest.warns(FutureWarning, match="--metric is deprecated; use --measure"):
        assert parser.parse_args(["search", "--metric", "agreement"]).metric == "agreement"
    with pytest.warns(FutureWarning, match="--fidelity is deprecated; use --measure"):
        assert parser.parse_args(["calibrate", "--fidelity", "cosine", "--budget", "0.5"]).fidelity == "cosine"


def test_staged_shares_spread_over_images_given_in_sorted_order():
    """Calibration images often come sorted (a folder by class): every first 1/2, 1/4, 1/8 of the
    searched batches is spread evenly over all of them, each batch and its reference rows kept
    together, and the held-out split is unchanged (every k-th image)."""
    from atmerge.tuning import split_holdout, spread, spread_order

    order = spread_order(16)
    assert sorted(order) == list(range(16))
    assert sorted(order[:2]) == [0, 8] and sorted(order[:4]) == [0, 4, 8, 12]
    assert sorted(order[:8]) == list(range(0, 16, 2))
    assert spread_order(1) == [0] and spread_order(0) == []
    for count in (3, 10, 118):
        first = sorted(spread_order(count)[: max(2, count // 8)])
        assert first[-1] - first[0] >= count * 0.6  # not one end of the images

    images = torch.arange(40, dtype=torch.float32).reshape(40, 1, 1, 1)
    reference = torch.arange(40).reshape(40, 1).float()
    batches, rows = spread(list(images.split(3)), reference)
    assert torch.equal(torch.cat(batches).flatten(), rows.flatten())  # each image keeps its reference
    assert sorted(torch.cat(batches).flatten().tolist()) == list(range(40))
    search, search_ref, held, held_ref = split_holdout(list(images.split(8)), reference, 0.25, 4)
    assert torch.cat(held).flatten().tolist() == list(range(3, 40, 4))
    assert torch.equal(torch.cat(search).flatten(), search_ref.flatten())
    assert search[0].flatten().tolist() == [0, 1, 2, 4] and search[1].flatten().tolist()[0] >= 16


def test_methods_searched_together_get_the_same_trials_each_and_share_the_bar(model_and_images):
    """auto's search: the methods' trials in turn, each method its `trials` trials, and a trial of
    one method is stopped against the best finished trial of any method."""
    from atmerge.tuning import hopeless, staged_trials_together

    model, images = model_and_images
    batches = list(images.split(3))
    _, reference, _ = unpatched_outputs(model, [(x, None) for x in batches])
    goal = Goal("budget", 0.7 * atmerge.gflops(model, tuple(images.shape[1:])))
    bases = [atmerge.ATM(), atmerge.ToMe()]
    found = staged_trials_together(model, batches, bases, reference, measure="agreement", goal=goal, trials=3)
    assert [len(rows) for rows in found] == [3, 3]
    assert all("alpha_level" in r or "alpha" in r for r in found[0]) and all("r" in r for r in found[1])
    finished = [r for rows in found for r in rows if not r["pruned"]]
    for r in (r for rows in found for r in rows if r["pruned"] and r["fidelity"] is not None):
        assert r["images"] < images.shape[0]
    assert not any(hopeless(goal, 1.0, r["gflops"], finished) for r in finished if goal.met_by(r))
