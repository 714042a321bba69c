"""The README's results, one command:

    python bench/paper.py [--out bench/results/paper.json] [--figures docs/figures] [--quick]
    python bench/paper.py --markdown     # the README's tables, from the JSON written above

For the CIFAR-10 reference ViT and for DINOv2-S + linear probe (both from ../shared), on
cifar10-test split into a calibration part and a disjoint report part:
  * ATM's α, β, θ_min by Optuna (Pareto goal) on the calibration images → Figure 4-style plot;
  * stress test (Table 1): ATM's cheapest setting whose calibration top-1 is no lower than the
    unpatched model's, then evaluated on the report images;
  * Figure 6-style merge profile of that ATM setting vs a constant threshold at the same GFLOPs;
and a Figure 7-style picture of ToMe vs ATM (centred keys) on the shared ImageNet photos.
Every method against every other, with equal tuning effort, is bench/baselines.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

import atmerge
from atmerge import checkpoints, data
from atmerge.experiments import analyze, search as search_mod
from atmerge.experiments.probe import load_probe_classifier, run_probe
from atmerge.experiments.visualize import draw
from atmerge.methods.registry import knob_factory, method_settings
from common import loader_batches, run_header, table, write_json


def split(dataset, calib: int, report: int | None, seed: int = 0):
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    rest = order[calib:] if report is None else order[calib : calib + report]
    return torch.utils.data.Subset(dataset, sorted(order[:calib])), torch.utils.data.Subset(dataset, sorted(rest))


def study(name, model, calib, report, *, trials, base_atm, seed=0) -> dict:
    atmerge.unpatch(model)
    result = search_mod.search(model, calib, method=base_atm, goal="pareto", trials=trials, seed=seed)
    base_cal = result["baseline"]
    depth, patches = len(model.blocks), model.patch_embed.num_patches
    atmerge.unpatch(model)
    base_rep, _ = atmerge.evaluate(model, report)

    def report_row(label, method, cal) -> dict:
        atmerge.patch(model, method)
        res, _ = atmerge.evaluate(model, report)
        atmerge.unpatch(model)
        return {
            "model": name,
            "method": label,
            "calib_top1": cal["top1"],
            "calib_gflops": cal["gflops"],
            "top1": res.top1,
            "gflops": res.gflops,
            "gflops_saved": 1 - res.gflops / base_rep.gflops,
            "top1_change": res.top1 - base_rep.top1,
            "setting": method_settings(method),
        }

    rows = [
        {
            "model": name,
            "method": "unpatched",
            "calib_top1": base_cal["top1"],
            "calib_gflops": base_cal["gflops"],
            "top1": base_rep.top1,
            "gflops": base_rep.gflops,
            "gflops_saved": 0.0,
            "top1_change": 0.0,
        }
    ]
    no_drop = [t for t in result["trials"] if t["top1"] >= base_cal["top1"]]
    atm_choice = None
    if no_drop:
        best = min(no_drop, key=lambda t: t["gflops"])
        atm_choice = search_mod.trial_method(base_atm, best, depth, patches)
        rows.append(report_row("ATM", atm_choice, best))
    profile = analyze.merge_profile(model, calib, atm_choice) if atm_choice else None
    return {
        "search": result,
        "stress": rows,
        "profile": profile,
        "calib_images": result["images"],
        "report_images": base_rep.images,
    }


def plots(r: dict, figures: Path, prefix: str, title: str) -> None:
    search_mod.plot_search({"ATM": r["search"]}, figures / f"{prefix}_accuracy_vs_gflops.png", title)
    if r["profile"]:
        analyze.plot_merge_profile(r["profile"], figures / f"{prefix}_merge_profile.png")


def replot(report: dict, figures: Path) -> None:
    for key, prefix, title in FIGURES:
        plots(report[key], figures, prefix, title.format(**report[key]))


FIGURES = (
    ("cifar10_reference", "cifar10", "CIFAR-10 reference ViT, {calib_images} calibration images"),
    ("dinov2_probe", "dinov2", "DINOv2-S + probe, {calib_images} calibration images"),
)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def markdown(report: dict) -> str:
    """The README's stress-test table from the JSON report."""
    lines = [
        "| model | method | setting | calib top-1 | GFLOPs (saved) | top-1 on report images (change) |",
        "|---|---|---|---|---|---|",
    ]
    for key, _, _ in FIGURES:
        for r in report[key]["stress"]:
            setting = ", ".join(
                f"{k}={v}" for k, v in (r.get("setting") or {}).items() if k != "method" and v is not None
            )
            lines.append(
                f"| {r['model']} | {r['method']} | {setting} | {_pct(r['calib_top1'])} | "
                f"{r['gflops']:.3f} ({r['gflops_saved']:.0%}) | {_pct(r['top1'])} ({100 * r['top1_change']:+.2f}) |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/paper.json")
    ap.add_argument("--figures", default="docs/figures")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--replot", action="store_true", help="only redraw the figures from --out's JSON")
    ap.add_argument("--markdown", action="store_true", help="only print the README's tables from --out's JSON")
    args = ap.parse_args(argv)
    if args.replot:
        replot(json.loads(Path(args.out).read_text()), Path(args.figures))
        return 0
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return 0
    q = args.quick
    torch.manual_seed(0)
    figures = Path(args.figures)
    report: dict = {}

    print("== CIFAR-10 reference ViT ==", flush=True)
    model = checkpoints.cifar10_reference_vit()
    test = data.image_folder(data.cifar10_folder("test"), data.cifar10_transform())
    cal, rep = split(test, 64 if q else 1000, 64 if q else None)
    r = study(
        "cifar10-vit",
        model,
        loader_batches(cal, 250),
        loader_batches(rep, 250),
        trials=4 if q else 40,
        base_atm=atmerge.ATM(),
    )
    report["cifar10_reference"] = r
    plots(r, figures, "cifar10", FIGURES[0][2].format(**r))

    print("== DINOv2-S + linear probe ==", flush=True)
    report["probe"] = run_probe(200 if q else 2000, 100 if q else 1000, progress=False)
    model, _ = load_probe_classifier()
    test = data.image_folder(data.cifar10_folder("test"), data.model_transform(model))
    cal, rep = split(test, 32 if q else 128, 32 if q else 400, seed=1)
    r = study(
        "dinov2-s+probe",
        model,
        loader_batches(cal, 64),
        loader_batches(rep, 64),
        trials=3 if q else 16,
        base_atm=atmerge.ATM(similarity="centered"),
    )
    report["dinov2_probe"] = r
    plots(r, figures, "dinov2", FIGURES[1][2].format(**r))

    print("== Figure 7: ToMe vs ATM on the shared ImageNet photos (DINOv2-S) ==", flush=True)
    backbone = checkpoints.dinov2_small()
    tf = data.model_transform(backbone)
    files = sorted(data.imagenet_samples_folder().iterdir())[::125][: 2 if q else 6]
    images = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    atm = atmerge.ATM(alpha=1.0, beta=0.04, theta_min=0.8, similarity="centered")
    singles = list(images.split(1))
    target = atmerge.budget.mean_gflops(backbone, atm, singles)
    tome = atmerge.match_gflops(backbone, knob_factory("tome", 12, 256), target, singles, steps=8).method
    mean, std = data.normalization(tf)
    vis = draw(
        backbone,
        images,
        {f"ToMe r={tome.r}": tome, "ATM (centred)": atm},
        figures / "visualize.png",
        mean=mean,
        std=std,
    )
    report["visualize"] = {
        "images": [f.name for f in files],
        "atm": method_settings(atm),
        "tome": method_settings(tome),
        "mean_gflops_target": target,
        **vis,
    }

    report = {
        **run_header(
            args,
            seed=0,
            dtype="float32",
            cifar10=dict(
                calib_images=64 if q else 1000,
                report_images=64 if q else "the rest of cifar10-test (the count: cifar10_reference.report_images)",
                split_seed=0,
                batch_size=250,
                trials=4 if q else 40,
                search="Optuna, seed 0, goal pareto, ATM()",
            ),
            dinov2=dict(
                calib_images=32 if q else 128,
                report_images=32 if q else 400,
                split_seed=1,
                batch_size=64,
                trials=3 if q else 16,
                search="Optuna, seed 0, goal pareto, ATM(similarity='centered')",
                probe_train_images=200 if q else 2000,
                probe_test_images=100 if q else 1000,
            ),
            stress_choice="the cheapest trial whose calibration top-1 is no lower than the unpatched model's",
            visualize=dict(
                images=len(files),
                atm=method_settings(atm),
                tome_bisected=method_settings(tome),
                tome_bisection_steps=8,
                mean_gflops_target=target,
            ),
        ),
        **report,
    }
    cols = ["model", "method", "calib_top1", "calib_gflops", "top1", "gflops", "gflops_saved", "top1_change"]
    print(table(report["cifar10_reference"]["stress"] + report["dinov2_probe"]["stress"], cols))
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
