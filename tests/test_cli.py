"""Every sub-command end to end on a tiny subset; outputs checked, bad options refused."""

import csv
import json

import pytest
import torch

import atmerge
from atmerge.cli import main
from atmerge.evaluate import evaluate
from conftest import require_shared


# The default preset runs on what ships with the package (the float16 reference ViT and 100
# CIFAR-10 test images per class) when the shared folder is absent; tests that need more are
# marked shared.


def _json(path):
    return json.loads(path.read_text())


def test_eval_default_preset(tmp_path, capsys):
    assert main(["eval", "--limit", "16", "--batch-size", "8", "--no-progress", "--out", str(tmp_path)]) == 0
    result = _json(tmp_path / "eval.json")
    assert result["images"] == 16 and result["method"]["method"] == "atm"
    base, merged = result["baseline"], result["merged"]
    assert base["gflops"] == pytest.approx(0.3667, abs=1e-4)  # the reference ViT at 65 tokens
    assert merged["gflops"] < base["gflops"]
    assert result["difference"]["gflops_ratio"] == pytest.approx(merged["gflops"] / base["gflops"])
    assert result["difference"]["top1"] == pytest.approx(merged["top1"] - base["top1"])
    assert len(merged["tokens_per_block"]) == 12 and merged["tokens_per_block"][0] == 65
    rows = list(csv.DictReader((tmp_path / "eval.csv").open()))
    assert [r["run"] for r in rows] == ["baseline", "ATM"]
    assert "difference: top-1" in capsys.readouterr().out


def test_eval_other_method_and_settings(tmp_path):
    args = ["eval", "--limit", "8", "--method", "tome", "--r", "3", "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 0
    result = _json(tmp_path / "eval.json")
    assert result["method"] == {"method": "tome", "r": 3}
    assert result["merged"]["tokens_per_block"][:3] == [65, 62, 59]


def test_eval_names_a_method_as_its_results_do(tmp_path, capsys):
    args = ["eval", "--limit", "8", "--method", "zerotp", "--r", "2", "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 0
    assert _json(tmp_path / "eval.json")["label"] == "Zero-TP (simplified)"
    assert "Zero-TP (simplified)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--method", "tome", "--alpha", "0.9"], "alpha does not apply to tome"),
        (["eval", "--alpha", "1.5"], "alpha=1.5 is out of range"),
        (["eval", "--data", "/nonexistent/folder"], "data folder /nonexistent/folder does not exist"),
        (["eval", "--limit", "0"], "limit must be a positive number of images, got 0"),
        (["eval", "--model", "not_a_model"], "unknown timm model 'not_a_model'"),
        (["eval", "--model", "deit_tiny_patch16_224"], "no data given: pass --data"),
        (["eval", "--model-kwargs", "{oops"], "--model-kwargs must be a JSON object"),
        (["search", "--goal", "budget", "--limit", "4"], "goal 'budget' needs a positive budget"),
        (
            ["eval", "--model", "vit_tiny_patch16_224", "--checkpoint", "/nonexistent.safetensors", "--data", "."],
            "checkpoint /nonexistent.safetensors not found",
        ),
        (["eval", "--model", "vit_tiny_patch16_224", "--checkpoint", "/", "--data", "."], "checkpoint / is not a file"),
        (
            ["eval", "--model", "vit_tiny_patch16_224", "--checkpoint", __file__, "--data", "."],
            "is not a safetensors file",
        ),
        (["analyze", "split-layer", "--method", "tome", "--limit", "4"], "split-layer studies ATM"),
    ],
)
def test_bad_options_give_clear_errors(args, message, tmp_path, capsys):
    assert main(args + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_search_results_match_a_re_evaluation(tmp_path):
    args = [
        "search",
        "--limit",
        "16",
        "--trials",
        "3",
        "--goal",
        "stress",
        "--compare",
        "tome",
        "evit",
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    result = _json(tmp_path / "search.json")
    assert result["baseline_from_cache"] is False and len(list((tmp_path / "cache").iterdir())) == 1
    assert len(result["trials"]) == 3 and (tmp_path / "search.png").exists()
    assert len(list(csv.DictReader((tmp_path / "search.csv").open()))) == 3
    # every compared method got the same number of trials over its own settings
    assert {label: len(r["trials"]) for label, r in result["compared"].items()} == {"ToMe": 3, "EViT": 3}
    assert set(result["compared"]["EViT"]["space"]) == {"keep_rate", "first", "every"}
    trial = result["pareto_front"][0]
    assert 0.945 <= trial["alpha"] <= 1 and 0.015 <= trial["beta"] <= 0.05 and 0.8 <= trial["theta_min"] <= 1
    # re-evaluate the trial's setting on the same images: same GFLOPs and top-1
    from atmerge import checkpoints, data

    model = checkpoints.cifar10_reference_vit()
    ds = data.subset(data.image_folder(data.cifar10_test_or_sample(), data.cifar10_transform()), 16, 0)
    atmerge.patch(model, atmerge.ATM(alpha=trial["alpha"], beta=trial["beta"], theta_min=trial["theta_min"]))
    res, outputs = evaluate(model, torch.utils.data.DataLoader(ds, batch_size=64), keep_outputs=True)
    assert res.gflops == pytest.approx(trial["gflops"]) and res.top1 == pytest.approx(trial["top1"])
    atmerge.unpatch(model)
    _, dense = evaluate(model, torch.utils.data.DataLoader(ds, batch_size=64), keep_outputs=True)
    same = (torch.cat(outputs).argmax(-1) == torch.cat(dense).argmax(-1)).float().mean().item()
    assert trial["agreement"] == pytest.approx(same)
    # the stress goal (the cheapest trial at least as accurate as the unpatched model) is
    # reachable here: trial 0, ATM's own settings, keeps top-1 at 44% of the cost
    best = result["best"]
    assert best is not None and best["feasible"]
    assert best["top1"] >= result["baseline"]["top1"] and best["gflops"] < result["baseline"]["gflops"]


def test_search_reports_an_unreachable_goal(tmp_path, capsys):
    # a budget of 1% of the unpatched GFLOPs is below the first block alone, which sees all 65
    # tokens (1/12 of the blocks' cost): no setting can meet it
    args = [
        "search",
        "--limit",
        "8",
        "--trials",
        "2",
        "--goal",
        "budget",
        "--budget",
        "0.01",
        "--no-progress",
        "--no-cache",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    result = _json(tmp_path / "search.json")
    assert result["best"] is None and not any(t["feasible"] for t in result["trials"])
    out = capsys.readouterr().out
    cheapest = min(t["gflops"] for t in result["trials"])
    assert "no trial met the budget of" in out and f"the cheapest trial cost {cheapest:.4g}" in out


@pytest.mark.parametrize(
    "study, extra, files",
    [
        ("info-loss", ["--thresholds", "0.9"], ["info_loss.json", "info_loss.csv", "info_loss.png"]),
        ("merge-profile", [], ["merge_profile.json", "merge_profile.png"]),
        ("split-layer", [], ["split_layer.json", "split_layer.csv"]),
        ("batch-size", ["--batch-sizes", "1", "4"], ["batch_size.json"]),
        ("merging-error", [], ["merging_error.json", "merging_error.png"]),
    ],
)
def test_analyze(study, extra, files, tmp_path):
    assert main(["analyze", study, "--limit", "8", "--batch-size", "8", "--out", str(tmp_path)] + extra) == 0
    for f in files:
        assert (tmp_path / f).exists()
    result = _json(tmp_path / files[0])
    if study == "info-loss":
        assert len(result["distance"]["0.9"]) == 12 and result["mean"] == result["distance"]["0.9"]
    elif study == "merge-profile":
        assert result["constant"]["gflops"] <= result["atm"]["gflops"] * 1.000001
        assert len(result["atm"]["merged"]) == 12
    elif study == "split-layer":
        assert [r["split_layer"] for r in result["rows"]] == list(range(13))
    elif study == "batch-size":
        assert [r["batch_size"] for r in result["rows"]] == [1, 4]
    else:
        assert result["pairs"] > 0 and result["within_bounds"] == result["pairs"]


@pytest.mark.shared
def test_visualize(tmp_path):
    require_shared("models/dinov2_small_imgfocus.safetensors")
    require_shared("data/imagenet-samples.tar")
    args = ["visualize", "--count", "1", "--steps", "2", "--similarity", "centered", "--out", str(tmp_path)]
    assert main(args) == 0
    result = _json(tmp_path / "visualize.json")
    assert (tmp_path / "visualize.png").exists() and len(result["tokens_left"]) == 2
    assert all(1 <= v[0] <= 257 for v in result["tokens_left"].values())


def test_visualize_missing_image(tmp_path, capsys):
    assert main(["visualize", "--data", str(tmp_path / "nope.jpg"), "--versus", "", "--out", str(tmp_path)]) == 2
    assert "nope.jpg not found" in capsys.readouterr().err


@pytest.mark.shared
def test_probe_and_dinov2_probe_eval(tmp_path):
    require_shared("models/dinov2_small_imgfocus.safetensors")
    require_shared("data/cifar10-train.tar.gz")
    head = tmp_path / "head.safetensors"
    args = [
        "probe",
        "--limit",
        "20",
        "--val-limit",
        "8",
        "--save",
        str(head),
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    result = _json(tmp_path / "probe.json")
    assert result["train_images"] == 20 and result["test_images"] == 8 and head.exists()
    assert 0.0 <= result["test_top1"] <= 1.0 and result["train_top1"] > 0.5
    args = [
        "eval",
        "--model",
        "dinov2-probe",
        "--probe",
        str(head),
        "--limit",
        "4",
        "--no-progress",
        "--similarity",
        "centered",
        "--out",
        str(tmp_path / "e"),
    ]
    assert main(args) == 0
    ev = _json(tmp_path / "e" / "eval.json")
    assert ev["baseline"]["tokens_per_block"][0] == 257 and ev["baseline"]["top1"] is not None


def test_search_keeps_the_unpatched_predictions_on_disk(tmp_path):
    from atmerge import checkpoints, data
    from atmerge.experiments.search import search

    model = checkpoints.cifar10_reference_vit()
    ds = data.subset(data.image_folder(data.cifar10_test_or_sample(), data.cifar10_transform()), 12, 0)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=6))
    first = search(model, batches, trials=1, cache_dir=tmp_path)
    again = search(model, batches, trials=1, cache_dir=tmp_path)
    assert (first["baseline_from_cache"], again["baseline_from_cache"]) == (False, True)
    assert again["baseline"] == first["baseline"] and again["images"] == 12
    # other images or other weights: a new entry, not the old one
    assert search(model, batches[:1], trials=1, cache_dir=tmp_path)["baseline_from_cache"] is False
    with torch.no_grad():
        model.head.bias.add_(1.0)
    assert search(model, batches, trials=1, cache_dir=tmp_path)["baseline_from_cache"] is False
    assert len(list(tmp_path.iterdir())) == 3


def test_batch_size_sweep_stops_at_what_fits():
    from atmerge.experiments import analyze
    from conftest import small_vit

    model = small_vit()
    real_forward = model.forward

    def forward(x):  # a device that holds at most 4 images at once
        if x.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(x)

    torch.manual_seed(0)
    dataset = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long))
    model.forward = forward
    result = analyze.batch_size_sweep(model, dataset, atmerge.ATM(), sizes=(1, 2, 4, 8, 16))
    assert [r["batch_size"] for r in result["rows"]] == [1, 2, 4]
    assert result["stopped"].startswith("batch size 8: out of memory")
    assert not atmerge.is_patched(model)


def test_eval_timm_name_with_local_checkpoint_and_image_folder(tmp_path, capsys):
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 3}
    model = timm.create_model("vit_tiny_patch16_224", **kwargs).eval()
    save_file(model.state_dict(), str(tmp_path / "tiny.safetensors"))
    g = torch.Generator().manual_seed(0)
    for c in ("a", "b", "c"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(2):
            pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "data" / c / f"{i}.png")
    args = [
        "eval",
        "--model",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        json.dumps(kwargs),
        "--checkpoint",
        str(tmp_path / "tiny.safetensors"),
        "--data",
        str(tmp_path / "data"),
        "--method",
        "tome",
        "--r",
        "2",
        "--batch-size",
        "4",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 0
    result = _json(tmp_path / "out" / "eval.json")
    assert result["images"] == 6 and result["params_m"] == pytest.approx(
        sum(p.numel() for p in model.parameters()) / 1e6
    )
    assert result["baseline"]["gflops"] == pytest.approx(atmerge.gflops(model, (3, 32, 32)))
    assert result["merged"]["tokens_per_block"] == [17, 15]  # 16 patches + CLS, ToMe r = 2
    for run in ("baseline", "merged"):
        assert result[run]["top1"] <= result[run]["top5"] == 1.0  # 3 classes: top-5 holds them all
    # the same weights with other settings: a one-line error naming what to pass
    bad = args[:4] + [json.dumps({**kwargs, "embed_dim": 32})] + args[5:]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "does not fit vit_tiny_patch16_224" in err and "--model-kwargs" in err and "Traceback" not in err


def test_calibrate_then_eval_with_the_config(tmp_path):
    out = tmp_path / "cal"
    args = [
        "calibrate",
        "--limit",
        "48",
        "--min-agreement",
        "0.2",
        "--trials",
        "3",
        "--method",
        "tome",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    config = _json(out / "calibration.json")
    assert config["method"]["name"] == "tome"
    assert (config["calibration"]["search_images"], config["calibration"]["held_out_images"]) == (36, 12)
    assert (
        config["measured"]["fidelity_measure"] == "agreement" and config["measured"]["fidelity_low_one_sided_95"] >= 0.2
    )
    assert "images from" in config["calibration"]["images_description"]
    assert len(list(csv.DictReader((out / "trials.csv").open()))) == 3
    assert (
        main(
            [
                "eval",
                "--config",
                str(out / "calibration.json"),
                "--limit",
                "16",
                "--no-progress",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    assert _json(tmp_path / "eval" / "eval.json")["method"]["method"] == "tome"


def test_calibrate_compares_methods_on_several_goals(tmp_path, capsys):
    out = tmp_path / "cal"
    args = [
        "calibrate",
        "--limit",
        "24",
        "--budget",
        "0.7",
        "--min-agreement",
        "0.5",
        "--trials",
        "3",
        "--method",
        "atm",
        "--compare",
        "tome",
        "--no-progress",
        "--out",
        str(out),
    ]
    main(args)
    printed = capsys.readouterr().out
    names = sorted(p.name for p in out.glob("*.json"))
    assert names == [
        "atm_budget_0.7.json",
        "atm_min_agreement_0.5.json",
        "tome_budget_0.7.json",
        "tome_min_agreement_0.5.json",
    ]
    for name in names:  # every config is usable, and says what it was calibrated for
        config = _json(out / name)
        assert config["method"]["name"] == name.split("_")[0] and config["calibration"]["trials"] == 3
    assert "ToMe" in printed and "budget 0.7" in printed and "min_agreement 0.5" in printed


def test_calibrate_bad_goal_is_a_one_line_error(capsys):
    assert main(["calibrate", "--budget", "1.5", "--limit", "4", "--trials", "1", "--no-progress"]) == 2
    assert "budget=1.5 is a share of the unpatched GFLOPs; allowed (0, 1)" in capsys.readouterr().err
    assert main(["calibrate", "--limit", "4", "--trials", "1", "--no-progress"]) == 2
    assert "give at least one goal" in capsys.readouterr().err
