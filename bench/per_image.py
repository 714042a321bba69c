"""Per-image merging in one padded batch against batch-mean r, one command:

    python bench/per_image.py                 # both models, ~15 min on 2 CPU cores
    python bench/per_image.py --markdown      # the README tables from the JSON

ATM merges, per block, the pairs above its threshold; with ``batch_adaptive=True`` (Section 3.4)
every image of a batch merges the batch's mean count, with ``False`` each image merges its own
(one batched pass, padded to the batch's longest image: ``atmerge.core.padding``).

1. Fidelity at matched mean GFLOPs: for each target (75%, 60%, 50% of the unpatched GFLOPs)
   both modes get β bisected in [0, 0.1] (α = 1, θ_min = 0.5; ``atmerge.match_gflops``) on calibration
   images, at batch 64; then both run on disjoint report images (batch 64): GFLOPs share,
   agreement with the unpatched model (95% Wilson interval), top-1 change (paired SE), KL, and
   the paired difference in agreement between the modes (per-image minus batch-mean, ± SE).
   CIFAR-10 reference ViT on cifar10-test; DINOv2-S + linear probe (224 px) on cifar10-test.
2. Wall-clock at batch 64: both modes at the 60% target, timed alternately (batch-mean,
   per-image, ...), median of 11 each after warm-up; images/s, and the executed GFLOPs of the
   padded batches (what ran, padding included) beside the counted ones.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import atmerge
from atmerge import data
from atmerge.fidelity import paired_fidelity
from common import (
    alternate_timings,
    cifar10_model,
    dinov2_probe_model,
    loader_batches,
    method_runs,
    run_header,
    table,
    write_json,
)

TARGETS = (0.75, 0.6, 0.5)
MODES = {"batch-mean r": True, "per-image r": False}


# name: (setup, calibration images, report images, timing repeats)
MODELS = {"cifar10-vit": (cifar10_model, 512, 3000, 11), "dinov2-probe": (dinov2_probe_model, 64, 256, 11)}
BATCH = 64
WARMUP = 1  # untimed rounds before the timed ones
STEPS = 12  # bisection steps of beta


def factory(batch_adaptive: bool):
    return lambda t: atmerge.ATM(alpha=1.0, beta=0.1 * (1 - t), theta_min=0.5, batch_adaptive=batch_adaptive)


def run(model, method, batches):
    atmerge.patch(model, method)
    outputs, gflops, executed, images = [], 0.0, 0.0, 0
    with torch.no_grad():
        for x in batches:
            outputs.append(model(x))
            s = atmerge.last_stats(model)
            gflops += s.gflops * x.shape[0]
            executed += s.executed_gflops * x.shape[0]
            images += x.shape[0]
    atmerge.unpatch(model)
    return torch.cat(outputs), gflops / images, executed / images


def timings(model, methods: dict, x: torch.Tensor, repeats: int) -> dict:
    """Seconds per batch of each method, timed alternately after one warm-up round, median of ``repeats``."""
    seconds = alternate_timings(method_runs(model, methods, x), repeats, warmup=WARMUP)
    atmerge.unpatch(model)
    return seconds


def bench_model(name: str, quick: bool) -> dict:
    setup, n_calib, n_report, repeats = MODELS[name]
    if quick:
        n_calib, n_report, repeats = 64, 128, 2
    model, transform = setup()
    test = data.image_folder(data.cifar10_folder("test"), transform)
    chosen = data.subset(test, n_calib + n_report, 0)
    calib_set = torch.utils.data.Subset(chosen, range(n_calib))
    report_set = torch.utils.data.Subset(chosen, range(n_calib, n_calib + n_report))
    calib = [x for x, _ in loader_batches(calib_set, BATCH)]
    report = loader_batches(report_set, BATCH)
    images, labels = [x for x, _ in report], torch.cat([y for _, y in report])
    atmerge.unpatch(model)
    with torch.no_grad():
        reference = torch.cat([model(x) for x in images])
    dense = atmerge.gflops(model, tuple(images[0].shape[1:]))
    rows, chosen_methods = [], {}
    for share in TARGETS:
        per_mode = {}
        for mode, batch_adaptive in MODES.items():
            match = atmerge.match_gflops(model, factory(batch_adaptive), share * dense, calib, steps=STEPS)
            outputs, gflops, executed = run(model, match.method, images)
            measured = paired_fidelity(outputs, reference, labels)
            same = (outputs.argmax(-1) == reference.argmax(-1)).double()
            per_mode[mode] = same
            rows.append(
                dict(
                    model=name,
                    target=share,
                    mode=mode,
                    beta=match.method.beta,
                    calib_gflops_share=match.gflops / dense,
                    gflops_share=gflops / dense,
                    executed_gflops_share=executed / dense,
                    **measured,
                )
            )
            if share == 0.6:
                chosen_methods[mode] = match.method
            print(
                f"{name} {share:.0%} {mode}: {gflops / dense:.1%} GFLOPs, agreement {measured['agreement']:.4f}",
                flush=True,
            )
        diff = per_mode["per-image r"] - per_mode["batch-mean r"]
        rows[-1]["agreement_gain"] = float(diff.mean())
        rows[-1]["agreement_gain_se"] = float(diff.std(unbiased=True) / math.sqrt(diff.numel()))
    x = images[0]
    seconds = timings(model, chosen_methods, x, repeats)
    speed = {mode: {"seconds_per_batch": s, "images_per_second": x.shape[0] / s} for mode, s in seconds.items()}
    speed["per_image_slowdown"] = seconds["per-image r"] / seconds["batch-mean r"] - 1
    return dict(
        model=name,
        dense_gflops=dense,
        calib_images=n_calib,
        report_images=n_report,
        rows=rows,
        speed=speed,
        speed_batch=x.shape[0],
        repeats=repeats,
        timed_methods={mode: str(method) for mode, method in chosen_methods.items()},
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    ap.add_argument("--out", default="bench/results/per_image.json")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run (numbers meaningless)")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return 0
    torch.manual_seed(0)
    start = time.time()
    results = [bench_model(name, args.quick) for name in args.models]
    header = run_header(
        args,
        targets=TARGETS,
        modes=MODES,
        batch_size=BATCH,
        warmup=WARMUP,
        bisection_steps=STEPS,
        dtype="float32",
        knob="ATM(alpha=1, beta=0.1 (1 - t), theta_min=0.5), t bisected to each target on the calibration images",
        split="a seeded (0) subset of cifar10-test: the first calib images calibrate, the rest report",
        sizes={
            name: dict(
                zip(("calib_images", "report_images", "repeats"), (64, 128, 2) if args.quick else MODELS[name][1:])
            )
            for name in args.models
        },
        timed="the first report batch, with the methods bisected to the 60% target (models[].timed_methods); "
        "every row's bisected beta is in models[].rows",
    )
    report = dict(**header, minutes=(time.time() - start) / 60, models=results)
    for r in results:
        print(
            table(
                r["rows"],
                ["model", "target", "mode", "gflops_share", "executed_gflops_share", "agreement", "top1_change", "kl"],
            )
        )
        print(r["speed"])
    write_json(report, args.out)
    return 0


def markdown(report: dict) -> str:
    lines = [
        "| model | target | mode | GFLOPs (executed) | agreement (95% CI) | per-image − batch-mean agreement ± SE "
        "| top-1 change ± SE | KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in report["models"]:
        for r in m["rows"]:
            gain = (
                f"{100 * r['agreement_gain']:+.2f} ± {100 * r['agreement_gain_se']:.2f}"
                if "agreement_gain" in r
                else ""
            )
            lines.append(
                f"| {r['model']} | {r['target']:.0%} | {r['mode']} | {r['gflops_share']:.1%} ({r['executed_gflops_share']:.1%}) "
                f"| {100 * r['agreement']:.2f}% ({100 * r['agreement_low']:.1f}–{100 * r['agreement_high']:.1f}) | {gain} "
                f"| {100 * r['top1_change']:+.2f} ± {100 * r['top1_change_se']:.2f} | {r['kl']:.4f} |"
            )
    lines += [
        "",
        "| model | batch | batch-mean r: images/s | per-image r: images/s | per-image slowdown |",
        "|---|---|---|---|---|",
    ]
    for m in report["models"]:
        s = m["speed"]
        lines.append(
            f"| {m['model']} | {m['speed_batch']} | {s['batch-mean r']['images_per_second']:.0f} | "
            f"{s['per-image r']['images_per_second']:.0f} | {100 * s['per_image_slowdown']:+.1f}% |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
