"""Calibration speed and transfer, one command:

    python bench/calibrate.py [--images 10000] [--trials 40] [--out bench/results/calibrate.json]
    python bench/calibrate.py --markdown         # the README table, from the JSON written above
    python bench/calibrate.py --method atm auto --out bench/results/calibrate_auto.json   # auto's time vs ATM's

``--method atm auto`` times ``method="auto"`` (every merging method, the same trials each, taken
in turn and stopped against the best of any method so far) beside ATM alone on the same images and
goals, and checks the goal: auto within 2× ATM's time and within 20 minutes.  Each row also counts
the work in images, which the machine's load does not move: ``images_evaluated`` (the trials'
images, a repeated setting counted once) and ``forward_images`` (every image through the model's
forward: trials, confirmation, landing, the unpatched pass); ``forward_ratio`` is auto's over ATM's.

The CIFAR-10 reference ViT is calibrated with ATM (``atmerge.calibrate``, early stopping on
growing subsets) on ``--images`` unlabeled cifar10-train images for a budget goal (60% of the
unpatched GFLOPs) and a floor goal (agreement's one-sided 95% lower bound ≥ 0.98); each run is
timed end to end (the unpatched pass included).  The chosen settings are then measured on all
5,000 cifar10-test images (never seen by the calibration): GFLOPs share, agreement with its 95%
Wilson interval, top-1 change with its paired standard error — next to the calibration-set
numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import atmerge
from atmerge import checkpoints, data
from atmerge.calibrate import folder_batches
from atmerge.fidelity import paired_fidelity
from common import describe, loader_batches, run_header, table, write_json

GOALS = (("budget", 0.6), ("floor", 0.98))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10000, help="unlabeled cifar10-train images to calibrate on")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--out", default="bench/results/calibrate.json")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument(
        "--method", nargs="+", default=["atm"], choices=["atm", "auto"], help="calibrate with these, in turn"
    )
    ap.add_argument("--goals", nargs="+", default=None, choices=["budget", "floor"], help="default: both")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return 0
    torch.manual_seed(0)
    model = checkpoints.cifar10_reference_vit()
    transform = data.cifar10_transform()
    t0 = time.time()
    batches, skipped = folder_batches(data.cifar10_folder("train"), transform, 250, limit=args.images, seed=0)
    load_seconds = time.time() - t0
    report = loader_batches(data.image_folder(data.cifar10_folder("test"), transform), 250)
    labels = torch.cat([y for _, y in report])
    atmerge.unpatch(model)
    base, reference = atmerge.evaluate(model, report, keep_outputs=True)
    reference = torch.cat(reference)
    forwards = [0]  # images through the model's forward (trials, confirmation, landing, unpatched pass)
    model.register_forward_pre_hook(lambda module, inputs: forwards.__setitem__(0, forwards[0] + inputs[0].shape[0]))
    rows = []
    goals = [g for g in GOALS if args.goals is None or g[0] in args.goals]
    for goal, target in goals:
        for name in args.method:
            start, forwards[0] = time.time(), 0
            options = {"budget": target} if goal == "budget" else {"min_agreement": target}
            method = atmerge.ATM() if name == "atm" else "auto"
            c = atmerge.calibrate(model, batches, method=method, trials=args.trials, seed=0, **options)
            minutes = (time.time() - start) / 60
            forward_images = forwards[0]
            atmerge.patch(model, c.method)
            res, outputs = atmerge.evaluate(model, report, keep_outputs=True)
            atmerge.unpatch(model)
            measured = paired_fidelity(torch.cat(outputs), reference, labels)
            trials = [t for a in c.alternatives if not isinstance(a, str) for t in a.trials] or c.trials
            rows.append(
                dict(
                    method=name if name == "atm" else "auto: " + next(r["method"] for r in c.compared if r["chosen"]),
                    goal=goal,
                    target=target,
                    met=c.met,
                    minutes=minutes,
                    trials=len(trials),
                    finished=sum(not t["pruned"] for t in trials),
                    images_evaluated=sum(t["images"] for t in trials if "same_as" not in t),
                    forward_images=forward_images,
                    setting=describe(c.method),
                    landing=c.landing,
                    compared=c.compared,
                    per_method=[
                        dict(
                            method=row["method"],
                            note=row["note"],
                            **(
                                {}
                                if isinstance(a, str)
                                else dict(
                                    trials=len(a.trials),
                                    finished=sum(not t["pruned"] for t in a.trials),
                                    images_evaluated=sum(t["images"] for t in a.trials if "same_as" not in t),
                                    landing=a.landing and {k: a.landing[k] for k in ("steps", "kept")},
                                )
                            ),
                        )
                        for row, a in zip(c.compared, c.alternatives)
                    ],
                    calib_gflops_share=c.gflops_share,
                    calib_agreement=c.agreement,
                    calib_agreement_low=c.fidelity_low,
                    report_gflops_share=res.gflops / base.gflops,
                    **{f"report_{k}": v for k, v in measured.items()},
                )
            )
            print(f"{name} {goal} {target}: {minutes:.1f} min, {c.method}", flush=True)
    time_goals = []
    for goal, target in goals:
        by = {r["method"].split(":")[0]: r for r in rows if r["goal"] == goal}
        if "atm" in by and "auto" in by:
            ratio = by["auto"]["minutes"] / by["atm"]["minutes"]
            time_goals.append(
                dict(
                    goal=goal,
                    atm_minutes=by["atm"]["minutes"],
                    auto_minutes=by["auto"]["minutes"],
                    ratio=ratio,
                    forward_ratio=by["auto"]["forward_images"] / by["atm"]["forward_images"],
                    met=ratio <= 2 and by["auto"]["minutes"] <= 20,
                )
            )
    header = run_header(
        args,
        goals=goals,
        methods=args.method,
        method="ATM() (its default search space, fitted to the model); auto: method='auto' (every merging method)",
        calibration_batch_size=250,
        calibration_seed=0,
        optuna_seed=0,
        holdout=0.25,
        dtype="float32",
        report="all of cifar10-test, batch 250",
    )
    result = dict(
        **header,
        calibration_images=sum(b.shape[0] for b in batches),
        skipped=skipped,
        image_loading_seconds=load_seconds,
        report_images=len(labels),
        unpatched={"gflops": base.gflops, "top1": base.top1},
        rows=rows,
        time_goals=time_goals,
    )
    if time_goals:
        print(table(time_goals, list(time_goals[0])))
    print(
        table(
            rows,
            [
                "method",
                "goal",
                "target",
                "met",
                "minutes",
                "finished",
                "calib_gflops_share",
                "calib_agreement",
                "calib_agreement_low",
                "report_gflops_share",
                "report_agreement",
                "report_top1_change",
            ],
        )
    )
    write_json(result, args.out)
    return 0


def markdown(report: dict) -> str:
    lines = [
        "| method | goal | minutes | trials complete / run | calibration: GFLOPs, agreement (one-sided 95% low) | "
        "report: GFLOPs, agreement (95% CI) | report top-1 change ± SE | setting |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        goal = f"budget {r['target']:.0%}" if r["goal"] == "budget" else f"floor {r['target']}"
        lines.append(
            f"| {r.get('method', 'atm')} | {goal}{'' if r['met'] else ' (not met)'} | {r['minutes']:.1f} | {r['finished']} / {r['trials']} | "
            f"{r['calib_gflops_share']:.1%}, {100 * r['calib_agreement']:.2f}% ({100 * r['calib_agreement_low']:.2f}%) | "
            f"{r['report_gflops_share']:.1%}, {100 * r['report_agreement']:.2f}% "
            f"({100 * r['report_agreement_low']:.1f}–{100 * r['report_agreement_high']:.1f}) | "
            f"{100 * r['report_top1_change']:+.2f} ± {100 * r['report_top1_change_se']:.2f} | {r['setting']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
