"""Per-image merging in one batch against batch-mean r, one command:

    python bench/per_image.py                 # both models, ~10 min on 2 CPU cores
    python bench/per_image.py --speed-only    # only section 2, into the JSON's speed entries (~2 min)
    python bench/per_image.py --markdown      # the README tables from the JSON

ATM merges, per block, the pairs above its threshold; with ``batch_adaptive=True`` (Section 3.4)
every image of a batch merges the batch's mean count, with ``False`` each image merges its own
(one batched pass: the batch is padded to its longest image for attention and the merge,
``atmerge.core.padding``, and the norms, the attention's projections and the MLP run on the real
tokens only, packed: ``atmerge.core.packing``).

1. Fidelity at matched mean GFLOPs: for each target (75%, 60%, 50% of the unpatched GFLOPs)
   both modes get β bisected in [0, 0.1] (α = 1, θ_min = 0.5; ``atmerge.match_gflops``) on calibration
   images, at batch 64; then both run on disjoint report images (batch 64): GFLOPs share,
   agreement with the unpatched model (95% Wilson interval), top-1 change (paired SE), KL, and
   the paired difference in agreement between the modes (per-image minus batch-mean, ± SE).
   CIFAR-10 reference ViT on cifar10-test; DINOv2-S + linear probe (224 px) on cifar10-test.
2. Wall-clock at batch 64: both modes at the 60% target, timed alternately (batch-mean,
   per-image, ...), median of 11 each after warm-up; images/s, and the executed GFLOPs of the
   timed batch (what ran: attention's matmuls on the padded widths) beside the counted ones.
   ``--speed-only`` runs this section alone, with the 60% betas of the JSON's rows (bisected
   again when the JSON has none), and replaces only the speed entries of the JSON.
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


def speed(model, methods: dict, x: torch.Tensor, repeats: int, dense: float) -> dict:
    """Images/s of each method on the batch x, timed alternately after one warm-up round, median
    of ``repeats``; the GFLOPs share of that batch, counted and executed (what ran)."""
    seconds = alternate_timings(method_runs(model, methods, x), repeats, warmup=WARMUP)
    result = {}
    for mode, method in methods.items():
        atmerge.patch(model, method)
        with torch.no_grad():
            model(x)
        stats = atmerge.last_stats(model)
        result[mode] = dict(
            seconds_per_batch=seconds[mode],
            images_per_second=x.shape[0] / seconds[mode],
            gflops_share=stats.gflops / dense,
            executed_gflops_share=stats.executed_gflops / dense,
        )
    atmerge.unpatch(model)
    result["per_image_slowdown"] = seconds["per-image r"] / seconds["batch-mean r"] - 1
    result["per_image_layout"] = "packed"  # real tokens packed for the linear layers (atmerge.core.packing)
    return result


def load(name: str, quick: bool):
    """The model, the calibration batches, the report batches and labels, the repeats."""
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
    return model, calib, images, labels, repeats


def speed_only(name: str, quick: bool, previous: dict | None) -> dict:
    """Section 2 alone: the 60% methods from the previous JSON's rows (bisected again if absent)."""
    model, calib, images, _, repeats = load(name, quick)
    dense = atmerge.gflops(model, tuple(images[0].shape[1:]))
    rows = [r for r in (previous or {}).get("rows", []) if r["target"] == 0.6]
    methods = {}
    for mode, batch_adaptive in MODES.items():
        beta = next((r["beta"] for r in rows if r["mode"] == mode), None)
        if beta is None:
            beta = atmerge.match_gflops(model, factory(batch_adaptive), 0.6 * dense, calib, steps=STEPS).method.beta
        methods[mode] = atmerge.ATM(alpha=1.0, beta=beta, theta_min=0.5, batch_adaptive=batch_adaptive)
    x = images[0]
    return dict(
        speed=speed(model, methods, x, repeats, dense),
        speed_batch=x.shape[0],
        repeats=repeats,
        timed_methods={mode: str(method) for mode, method in methods.items()},
    )


def bench_model(name: str, quick: bool) -> dict:
    model, calib, images, labels, repeats = load(name, quick)
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
    return dict(
        model=name,
        dense_gflops=dense,
        calib_images=sum(c.shape[0] for c in calib),
        report_images=len(labels),
        rows=rows,
        speed=speed(model, chosen_methods, x, repeats, dense),
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
    ap.add_argument(
        "--speed-only",
        action="store_true",
        help="only the wall-clock section; replaces the speed entries of --out (written elsewhere with --speed-out)",
    )
    ap.add_argument("--speed-out", default=None, help="with --speed-only: write the JSON here instead of --out")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return 0
    torch.manual_seed(0)
    if args.speed_only:
        return main_speed_only(args)
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


def main_speed_only(args) -> int:
    """``--speed-only``: time both modes of every model; the JSON keeps its fidelity rows, its speed
    entries are replaced and stamped with this run's header (``models[].speed_run``)."""
    path = Path(args.out)
    report = json.loads(path.read_text()) if path.exists() else dict(models=[])
    previous = {m["model"]: m for m in report["models"]}
    header = run_header(args, batch_size=BATCH, warmup=WARMUP, dtype="float32", section="wall-clock only")
    for name in args.models:
        result = speed_only(name, args.quick, previous.get(name))
        print(name, json.dumps(result["speed"], indent=1), flush=True)
        entry = previous.setdefault(name, dict(model=name, rows=[]))
        entry.update(result, speed_run=header)
    report["models"] = list(previous.values())
    write_json(report, args.speed_out or args.out)
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
        "| model | batch | batch-mean r: images/s | per-image r: images/s | per-image slowdown "
        "| GFLOPs batch-mean | GFLOPs per-image (executed) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in report["models"]:
        s = m.get("speed")
        if not s:
            continue
        mean, own = s["batch-mean r"], s["per-image r"]
        flops = (
            f"| {mean['gflops_share']:.1%} | {own['gflops_share']:.1%} ({own['executed_gflops_share']:.1%}) |"
            if "gflops_share" in own
            else "| | |"
        )
        lines.append(
            f"| {m['model']} | {m['speed_batch']} | {mean['images_per_second']:.0f} | "
            f"{own['images_per_second']:.0f} | {100 * s['per_image_slowdown']:+.1f}% {flops}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
