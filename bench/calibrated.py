"""Every method calibrated the same way, then judged on images the calibration never saw:

    python bench/calibrated.py --model cifar10-vit      # CIFAR-10 reference ViT, 95 min (the JSON's minutes.previous)
    python bench/calibrated.py --model dinov2-probe     # DINOv2-S + linear probe, 224 px, 83 min (minutes.previous, one thread)
    python bench/calibrated.py --model cifar10-vit --markdown   # the README table from the JSON
    python bench/calibrated.py --model cifar10-vit --method auto   # method="auto" against each method alone
    python bench/calibrated.py --model dinov2-probe --method auto  # the same on DINOv2-S: > 75 min (see below)

The DINOv2 auto run is the longest: on 2026-12-02 it was stopped after 72 minutes, sharing the 2-core CPU with
two other runs, with its trials done and its landing begun; start it alone, on both cores.

``--method auto`` runs ``atmerge.calibrate_goals(..., method="auto")`` once over the merging
methods: with several goals it calibrates each method exactly as alone (same trials, seed, split;
no trial is stopped against another method), lands each chosen setting on its goal, and picks per
goal on the held-out images.  Each method's own calibration (``Calibration.alternatives``) and
auto's pick are run on the report images, and auto's goals are checked: its agreement at
least the best single method's minus one standard error, its report cost within 1 point below each
budget, and every floor auto marks met holding on the report images.

For each method, one Optuna search of ``--trials`` trials over the method's own settings, fitted
to the model's similarity scores (``atmerge.calibrate_goals``: multivariate TPE, judged by
agreement with the unpatched model on unlabeled cifar10-train images, every trial on every
searched image; a quarter of the images — half for DINOv2 — is held out of the search); from the same trials each
goal picks its setting — budgets of 75%, 60%, 50% of the
unpatched GFLOPs (the most faithful trial within budget) and agreement floors 0.99 and 0.98 (the
cheapest trial whose one-sided 95% Wilson lower bound clears the floor), confirmed on the held-out
images (the next candidate is taken where it fails there: ``atmerge.calibrate.confirm``).  "ATM (paper grid)" is
ATM searched over the paper's Appendix-A ranges instead of the fitted ones; "ATM, paper DeiT-S
setting" is the fixed default (α 0.99, β 0.04, θ_min 0.88), not calibrated.  Every chosen
setting is then run on cifar10-test images (report set, disjoint): GFLOPs share, agreement with
its 95% Wilson interval, top-1 change with its paired SE — next to its calibration numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import atmerge
from atmerge import data
from atmerge.calibrate import folder_batches
from atmerge.fidelity import paired_fidelity
from common import cifar10_model, dinov2_probe_model, describe, loader_batches, run_header, table, write_json

GOALS = ({"budget": 0.75}, {"budget": 0.6}, {"budget": 0.5}, {"min_agreement": 0.99}, {"min_agreement": 0.98})
METHODS = (
    ("ATM", "atm", True),
    ("ATM (paper grid)", "atm", False),
    ("ToMe", "tome", True),
    ("top-r", "topr", True),
    ("MCTF", "mctf", True),
    ("constant θ", "constant", True),
)


# name: (setup, calibration images, held-out share of them, report images, batch size, trials,
# methods) — DINOv2 at 224 px costs ~40× the CIFAR ViT per image on the CPU, so it gets fewer
# methods and trials; a 0.99 floor can only be confirmed on ≥ 270 held-out images (all agreeing:
# one-sided 95% Wilson lower bound 270/272.7 = 0.990), so half of its 600 images are held out.
MODELS = {
    "cifar10-vit": (cifar10_model, 2000, 0.25, 5000, 250, 30, METHODS),
    "dinov2-probe": (dinov2_probe_model, 600, 0.5, 1000, 50, 12, METHODS[:3] + METHODS[4:5]),
}


def goal_name(goal: dict) -> str:
    return f"budget {goal['budget']:.0%}" if "budget" in goal else f"floor {goal['min_agreement']}"


def calibration_numbers(c) -> dict:
    return dict(
        met=c.met,
        calib_gflops_share=c.gflops_share,
        calib_agreement=c.fidelity,
        calib_agreement_low=c.fidelity_low,
        search=c.search,
        held_out_images=c.images,
        landing=c.landing,
    )


def auto_goals(rows: list[dict]) -> list[dict]:
    """Per goal: auto's report agreement against the best single method's minus one standard
    error, auto's report cost within 1 point below a budget, a floor auto marks met holding."""
    checks = []
    for goal in dict.fromkeys(r["goal"] for r in rows):
        singles = [r for r in rows if r["goal"] == goal and not r["method"].startswith("auto")]
        picked = next(r for r in rows if r["goal"] == goal and r["method"].startswith("auto"))
        if goal.startswith("budget"):
            singles = [r for r in singles if r["met"]] or singles
        if not goal.startswith("budget"):  # a floor: auto's pick must hold it; cost beside the cheapest single
            floor = float(goal.split()[1])
            holding = [r for r in singles if r["report_agreement"] >= floor]
            cheapest = min(holding, key=lambda r: r["report_gflops_share"], default=None)
            checks.append(
                dict(
                    goal=goal,
                    auto=picked["method"],
                    auto_report_agreement=picked["report_agreement"],
                    auto_report_gflops_share=picked["report_gflops_share"],
                    cheapest_single_holding=cheapest and cheapest["method"],
                    cheapest_single_report_gflops_share=cheapest and cheapest["report_gflops_share"],
                    auto_marked_met=picked["met"],
                    floor_holds=(not picked["met"]) or picked["report_agreement"] >= floor,
                )
            )
            continue
        best = max(singles, key=lambda r: r["report_agreement"])
        n = picked["report_images"]
        se = (best["report_agreement"] * (1 - best["report_agreement"]) / n) ** 0.5
        check = dict(
            goal=goal,
            auto=picked["method"],
            auto_report_agreement=picked["report_agreement"],
            best_single=best["method"],
            best_single_report_agreement=best["report_agreement"],
            best_single_se=se,
            agreement_met=picked["report_agreement"] >= best["report_agreement"] - se,
        )
        share = float(goal.split()[1].rstrip("%")) / 100
        check["auto_report_gflops_share"] = picked["report_gflops_share"]
        check["cost_met"] = share - 0.01 <= picked["report_gflops_share"] <= share
        checks.append(check)
    return checks


def run_on(model, method, batches, reference, labels) -> dict:
    atmerge.patch(model, method)
    res, outputs = atmerge.evaluate(model, batches, keep_outputs=True)
    atmerge.unpatch(model)
    return {"gflops": res.gflops, **paired_fidelity(torch.cat(outputs), reference, labels)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="cifar10-vit")
    ap.add_argument("--out", default=None, help="default: bench/results/calibrated_<model>.json")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument(
        "--method",
        choices=["each", "auto"],
        default="each",
        help="each: every method calibrated alone (the table); auto: method='auto' against each method alone",
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run: 64 images each, 3 trials (numbers meaningless)")
    ap.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="re-run only these methods (labels as in the table) and replace their rows in --out",
    )
    args = ap.parse_args(argv)
    auto = args.method == "auto"
    out = args.out or f"bench/results/calibrated_{'auto_' if auto else ''}{args.model}.json"
    if args.markdown:
        print(markdown(json.loads(Path(out).read_text())))
        return 0
    setup, n_calib, holdout, n_report, batch_size, trials, methods = MODELS[args.model]
    if args.quick:
        n_calib, n_report, batch_size, trials = 64, 64, 32, 3
    chosen = dict(
        calibration_images=n_calib,
        held_out_share=holdout,
        report_images=n_report,
        batch_size=batch_size,
        trials_per_method=trials,
        goals=GOALS,
        methods=[m[0] for m in methods],
        calibration_seed=0,
        optuna_seed=0,
        report_subset_seed=0,
        early_stop=False,
        dtype="float32",
        calibration_data="cifar10-train (seeded subset)",
        report_data="cifar10-test (seeded subset)",
        report_rows="a setting chosen by several goals or methods is run on the report images once",
    )
    torch.manual_seed(0)
    start = time.time()
    model, transform = setup()
    # never calibrate on images the head was trained on (the DINOv2 probe's recorded split): a head
    # is surer of its own training images, so fidelity measured there does not transfer
    trained_on = getattr(model, "atmerge_trained_on", frozenset())
    chosen["calibration_excludes"] = f"{len(trained_on)} images the model's head was trained on" if trained_on else None
    calib, _ = folder_batches(
        data.cifar10_folder("train"), transform, batch_size, limit=n_calib, seed=0, exclude=trained_on
    )
    report = loader_batches(
        data.subset(data.image_folder(data.cifar10_folder("test"), transform), n_report, 0), batch_size
    )
    labels = torch.cat([y for _, y in report])
    atmerge.unpatch(model)
    base, reference = atmerge.evaluate(model, report, keep_outputs=True)
    reference = torch.cat(reference)
    dense = base.gflops
    rows = []
    measured_settings: dict[str, dict] = {}  # the same setting (e.g. auto's pick) is run on the report images once

    def add(label, goal, method, calib_numbers):
        key = repr(method)
        if key not in measured_settings:
            measured_settings[key] = run_on(model, method, report, reference, labels)
        measured = measured_settings[key]
        rows.append(
            dict(
                method=label,
                goal=goal,
                setting=describe(method),
                **calib_numbers,
                report_gflops_share=measured["gflops"] / dense,
                **{f"report_{k}": v for k, v in measured.items()},
            )
        )
        print(
            f"  {label} {goal}: report {measured['gflops'] / dense:.1%} GFLOPs, agreement "
            f"{measured['agreement']:.4f}, top-1 {measured['top1_change']:+.4f}",
            flush=True,
        )

    if args.only:
        unknown = set(args.only) - {m[0] for m in methods} - {"ATM, paper DeiT-S setting"}
        if unknown:
            raise SystemExit(f"--only: unknown method(s) {sorted(unknown)}; choose from {[m[0] for m in methods]}")
        methods = [m for m in methods if m[0] in args.only]
        chosen["methods"] = [m[0] for m in methods]
    if auto:
        merging = [m for m in methods if m[2]]  # the fitted spaces: what auto compares
        chosen["methods"] = [m[0] for m in merging]
        chosen["land"] = True
        t0 = time.time()
        found = atmerge.calibrate_goals(
            model,
            calib,
            list(GOALS),
            method="auto",
            methods=[m[1] for m in merging],
            trials=trials,
            seed=0,
            early_stop=False,
            paired=False,
            holdout=holdout,
        )
        print(f"auto over {len(merging)} methods, {trials} trials each: {time.time() - t0:.0f} s", flush=True)
        chosen["auto_seconds"] = time.time() - t0
        for goal, c in zip(GOALS, found):
            for (label, _, _), alt in zip(merging, c.alternatives):
                if isinstance(alt, str):
                    print(f"  {label} {goal_name(goal)}: none ({alt})")
                    continue
                add(label, goal_name(goal), alt.method, calibration_numbers(alt))
            winner = next(r["method"] for r in c.compared if r["chosen"])
            add(f"auto ({winner})", goal_name(goal), c.method, calibration_numbers(c))
        return finish(args, out, rows, calib, labels, trials, dense, base, start, chosen)
    for label, name, fitted in methods:
        t0 = time.time()
        found = atmerge.calibrate_goals(
            model,
            calib,
            list(GOALS),
            method=name,
            trials=trials,
            seed=0,
            early_stop=False,
            fit_space=fitted,
            paired=False,
            holdout=holdout,
        )
        print(f"{label}: {trials} trials in {time.time() - t0:.0f} s", flush=True)
        for goal, c in zip(GOALS, found):
            add(
                label,
                goal_name(goal),
                c.method,
                calibration_numbers(c),
            )
    paper = atmerge.ATM()
    if args.only and "ATM, paper DeiT-S setting" not in args.only:
        return finish(args, out, rows, calib, labels, trials, dense, base, start, chosen)
    atmerge.patch(model, paper)
    res, outputs = atmerge.evaluate(model, calib, keep_outputs=True)
    atmerge.unpatch(model)
    _, calib_ref = atmerge.evaluate(model, calib, keep_outputs=True)
    from atmerge.calibrate import agreement_lower_bound

    agree = paired_fidelity(torch.cat(outputs), torch.cat(calib_ref))["agreement"]
    add(
        "ATM, paper DeiT-S setting",
        "fixed",
        paper,
        dict(
            met=None,
            calib_gflops_share=res.gflops / dense,
            calib_agreement=agree,
            calib_agreement_low=agreement_lower_bound(agree, res.images),
        ),
    )
    return finish(args, out, rows, calib, labels, trials, dense, base, start, chosen)


def finish(args, out, rows, calib, labels, trials, dense, base, start, chosen) -> int:
    """Write the JSON (with --only: the other methods' rows kept from the previous file, and the
    previous run's header under ``previous_run``)."""
    minutes = (time.time() - start) / 60
    header = run_header(args, **chosen)
    if args.only and Path(out).exists():
        previous = json.loads(Path(out).read_text())
        rerun = {r["method"] for r in rows}
        rows = [r for r in previous["rows"] if r["method"] not in rerun] + rows
        order = [m[0] for m in METHODS] + ["ATM, paper DeiT-S setting"]
        rows.sort(key=lambda r: order.index(r["method"]))
        minutes = {"previous": previous["minutes"], "rerun " + ", ".join(sorted(rerun)): minutes}
        header["previous_run"] = {k: v for k, v in previous.items() if k not in ("rows", "unpatched", "minutes")}
    result = dict(
        **header,
        model=args.model,
        calibration_images=sum(b.shape[0] for b in calib),
        report_images=len(labels),
        trials_per_method=trials,
        unpatched={"gflops": dense, "top1": base.top1},
        minutes=minutes,
        rows=rows,
    )
    if chosen.get("land"):
        result["goals"] = auto_goals(rows)
        print(table(result["goals"], list(result["goals"][0])))
    print(
        table(
            rows,
            [
                "method",
                "goal",
                "met",
                "calib_gflops_share",
                "calib_agreement",
                "calib_agreement_low",
                "report_gflops_share",
                "report_agreement",
                "report_top1_change",
            ],
        )
    )
    write_json(result, out)
    return 0


def markdown(report: dict) -> str:
    lines = [
        "| goal | method | held-out calibration images: GFLOPs, agreement (one-sided 95% low) | report: GFLOPs, agreement (95% CI) "
        "| report top-1 change ± SE | setting |",
        "|---|---|---|---|---|---|",
    ]
    order = {g: i for i, g in enumerate([goal_name(g) for g in GOALS] + ["fixed"])}
    for r in sorted(report["rows"], key=lambda r: order[r["goal"]]):
        met = "" if r["met"] in (True, None) else " (not met)"
        lines.append(
            f"| {r['goal']}{met} | {r['method']} | {r['calib_gflops_share']:.1%}, {100 * r['calib_agreement']:.2f}% "
            f"({100 * r['calib_agreement_low']:.2f}%) | {r['report_gflops_share']:.1%}, {100 * r['report_agreement']:.2f}% "
            f"({100 * r['report_agreement_low']:.1f}–{100 * r['report_agreement_high']:.1f}) | "
            f"{100 * r['report_top1_change']:+.2f} ± {100 * r['report_top1_change_se']:.2f} | {r['setting']} |"
        )
    if report.get("goals"):
        goals = auto_goals(report["rows"])  # recomputed from the rows, so the check is the current one
        lines += [
            "",
            "| budget | auto's pick | its report agreement | best single method | its report agreement − 1 SE | "
            "agreement goal | auto's report GFLOPs | within 1 point below |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for g in goals:
            if "cost_met" in g:
                lines.append(
                    f"| {g['goal']} | {g['auto']} | {100 * g['auto_report_agreement']:.2f}% | {g['best_single']} | "
                    f"{100 * (g['best_single_report_agreement'] - g['best_single_se']):.2f}% | "
                    f"{'met' if g['agreement_met'] else 'not met'} | {g['auto_report_gflops_share']:.1%} | "
                    f"{'met' if g['cost_met'] else 'not met'} |"
                )
        lines += [
            "",
            "| floor | auto's pick (marked met) | its report agreement | its report GFLOPs | holds on the report images | "
            "cheapest single method that holds there |",
            "|---|---|---|---|---|---|",
        ]
        for g in goals:
            if "floor_holds" in g:
                cheapest = (
                    f"{g['cheapest_single_holding']} ({g['cheapest_single_report_gflops_share']:.1%})"
                    if g["cheapest_single_holding"]
                    else "none"
                )
                lines.append(
                    f"| {g['goal']} | {g['auto']} ({'yes' if g['auto_marked_met'] else 'no'}) | "
                    f"{100 * g['auto_report_agreement']:.2f}% | {g['auto_report_gflops_share']:.1%} | "
                    f"{'yes' if g['floor_holds'] else 'no'} | {cheapest} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
