"""Fair baselines: every method as released, the same last-block rule, the same tuning
effort, chosen on calibration images and measured on disjoint report images. One command:

    python bench/baselines.py [--trials 24] [--quick]      # CIFAR-10 reference ViT
    python bench/baselines.py --model dinov2-probe          # DINOv2-S + linear probe, 224 px
    python bench/baselines.py [--model ...] --markdown      # the README table, from the JSON

Results go to bench/results/baselines_<model>.json and docs/figures/<model>_fair_fronts.png.
CIFAR-10 reference ViT or DINOv2-S + linear probe (both from ../shared; the probe is trained
first if it is missing, as `atmerge probe` does), cifar10-test split (seeded) into calibration
and report images.  For every method the same Optuna search (TPE, seed 0, ``--trials`` trials, Pareto goal)
runs over the method's own settings (``Method.search_space``), judged by agreement with the
unpatched model's predictions on the calibration images (no labels used for the choice).  At
each budget (85%, 75%, 65% of the unpatched GFLOPs) the calibration trial with the highest
agreement within the budget is run on the report images: agreement (95% Wilson interval),
mean KL, top-1 change with its paired standard error, GFLOPs.  Each method's calibration front
is also run on the report images and drawn.  Patch options: the defaults for every method —
only CLS reaches the last MLP (the paper's rule), proportional attention as each method's
release (off for EViT).
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
from atmerge.experiments.search import search_methods, trial_method, unpatched_outputs
from atmerge.fidelity import paired_fidelity
from atmerge.methods.registry import build_method, method_settings
from common import TARGETS, describe, loader_batches, run_header, table, write_json

METHODS = ("atm", "tome", "topr", "constant", "evit", "mctf", "zerotp")


def cifar10_setup():
    model = checkpoints.cifar10_reference_vit()
    return model, data.image_folder(data.cifar10_folder("test"), data.cifar10_transform()), list(METHODS)


def dinov2_setup():
    from atmerge.experiments.probe import default_probe_path, load_probe_classifier, run_probe

    if not default_probe_path().exists():
        run_probe(2000, 1000, progress=False)
    model, _ = load_probe_classifier()
    test = data.image_folder(data.cifar10_folder("test"), data.model_transform(model))
    # raw keys sit near cosine 1 in DINOv2's first blocks; centred keys are ATM's variant for it
    return model, test, list(METHODS) + [atmerge.ATM(similarity="centered")]


# name: (setup, calibration images, report images, batch size, front points per method re-run
# on the report images) — DINOv2 at 224 px costs 17× the CIFAR ViT per image on the CPU
MODELS = {"cifar10-vit": (cifar10_setup, 500, 1500, 250, 6), "dinov2-probe": (dinov2_setup, 64, 320, 32, 4)}


def split(dataset, calib: int, report: int, seed: int = 0):
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return (
        torch.utils.data.Subset(dataset, sorted(order[:calib])),
        torch.utils.data.Subset(dataset, sorted(order[calib : calib + report])),
    )


def run_on(model, method, batches, reference, labels) -> dict:
    """Patch with ``method`` (default options), run ``batches``, pair the outputs with ``reference``."""
    atmerge.patch(model, method)
    res, outputs = atmerge.evaluate(model, batches, keep_outputs=True)
    stats = atmerge.last_stats(model)
    atmerge.unpatch(model)
    return {
        "gflops": res.gflops,
        "prune_last_block": stats.prune_last_block,
        "prop_attn": stats.prop_attn,
        **paired_fidelity(torch.cat(outputs), reference, labels),
    }


def spread(front: list[dict], count: int) -> list[dict]:
    if len(front) <= count:
        return front
    step = (len(front) - 1) / (count - 1)
    return [front[round(i * step)] for i in range(count)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar10-vit", choices=sorted(MODELS))
    ap.add_argument("--out", default=None, help="default: bench/results/baselines_<model>.json")
    ap.add_argument("--figure", default=None, help="default: docs/figures/<model>_fair_fronts.png")
    ap.add_argument("--trials", type=int, default=24, help="Optuna trials per method (the same for every method)")
    ap.add_argument("--calib", type=int, default=None, help="calibration images (default: per model)")
    ap.add_argument(
        "--report", type=int, default=None, help="report images, disjoint from calibration (default: per model)"
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    ap.add_argument("--markdown", action="store_true", help="only print the README table from --out's JSON")
    ap.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="re-run only these methods (labels as in the table, e.g. MCTF) and replace their rows, "
        "searches and fronts in --out; the other methods' results are kept from that file",
    )
    args = ap.parse_args(argv)
    setup, calib_default, report_default, batch_size, front_points = MODELS[args.model]
    args.out = args.out or f"bench/results/baselines_{args.model}.json"
    args.figure = args.figure or f"docs/figures/{args.model}_fair_fronts.png"
    args.calib = args.calib or calib_default
    args.report = args.report or report_default
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return 0
    if args.quick:
        args.trials, args.calib, args.report = 3, 32, 64
    torch.manual_seed(0)
    start = time.time()
    model, test, methods = setup()
    cal, rep = split(test, args.calib, args.report)
    calib, report = loader_batches(cal, batch_size), loader_batches(rep, batch_size)
    depth, patches = len(model.blocks), model.patch_embed.num_patches

    reference = unpatched_outputs(model, calib)
    print(f"calibration: {reference[0]['images']} images, unpatched top-1 {reference[0]['top1']:.4f}", flush=True)
    searches = {}
    bases = {}
    methods = [build_method(m) if isinstance(m, str) else m for m in methods]
    if args.only:
        labels = {m.label(tuple(m.search_space(depth, patches))): m for m in methods}
        unknown = sorted(set(args.only) - set(labels))
        if unknown:
            raise SystemExit(f"--only: unknown method(s) {unknown}; choose from {sorted(labels)}")
        methods = [labels[name] for name in args.only]
    for method in methods:
        t0 = time.time()
        found = search_methods(
            model, calib, [method], goal="pareto", measure="agreement", trials=args.trials, seed=0, reference=reference
        )
        searches.update(found)
        bases[next(iter(found))] = method
        print(f"  searched {next(iter(found))}: {time.time() - t0:.0f} s", flush=True)

    atmerge.unpatch(model)
    base, base_outputs = atmerge.evaluate(model, report, keep_outputs=True)
    base_outputs = torch.cat(base_outputs)
    labels = torch.cat([y for _, y in report])
    dense = base.gflops
    rows, fronts = [], {}
    for label, result in searches.items():
        method = bases[label]
        for share in TARGETS:
            under = [t for t in result["trials"] if t["gflops"] <= share * reference[0]["gflops"]]
            if not under:
                rows.append({"method": label, "target": f"{share:.0%}", "setting": "no trial within budget"})
                continue
            best = max(under, key=lambda t: (t["agreement"], -t["gflops"]))
            chosen = trial_method(method, best, depth, patches)
            measured = run_on(model, chosen, report, base_outputs, labels)
            rows.append(
                {
                    "method": label,
                    "target": f"{share:.0%}",
                    "setting": describe(chosen),
                    "settings": method_settings(chosen),
                    "calib_agreement": best["agreement"],
                    "calib_gflops": best["gflops"],
                    "gflops_share": measured["gflops"] / dense,
                    **measured,
                }
            )
            print(
                f"  {label} {share:.0%}: agreement {measured['agreement']:.4f}, "
                f"{measured['gflops'] / dense:.0%} GFLOPs",
                flush=True,
            )
        fronts[label] = []
        for point in spread(result["pareto_front"], front_points):
            chosen = trial_method(method, point, depth, patches)
            measured = run_on(model, chosen, report, base_outputs, labels)
            fronts[label].append(
                {
                    "setting": method_settings(chosen),
                    "calib_agreement": point["agreement"],
                    "calib_gflops": point["gflops"],
                    **measured,
                }
            )
    if args.only:
        rows, searches, fronts = keep_other_methods(args.out, rows, searches, fronts)
    report_json = dict(
        **run_header(
            args,
            trials_per_method=args.trials,
            calib_images=len(cal),
            report_images=len(rep),
            batch_size=batch_size,
            front_points_per_method=front_points,
            targets=TARGETS,
            dtype="float32",
            split="seeded permutation of cifar10-test (seed 0): the first calib images calibrate, the "
            "next report images report",
            search="Optuna, seed 0, goal pareto, metric agreement",
            chosen_per_target="the most agreeing calibration trial within the target (rows.settings)",
        ),
        model=args.model,
        trials_per_method=args.trials,
        calib_images=len(cal),
        report_images=len(rep),
        patch_options="defaults: prune_last_block on (CLS only in the last MLP) for every method; "
        "prop_attn = each method's default (off for EViT)",
        unpatched={"gflops": dense, "top1": base.top1, "calib_top1": reference[0]["top1"]},
        searches=searches,
        rows=rows,
        fronts=fronts,
        seconds=time.time() - start,
    )
    if args.only and Path(args.out).exists():
        previous = json.loads(Path(args.out).read_text())
        report_json["previous_run"] = {
            k: previous.get(k) for k in ("command", "seconds", "previous_run") if k in previous
        }
        report_json["rerun_methods"] = list(args.only)
    write_json(report_json, args.out)
    print(
        table(
            rows,
            [
                "method",
                "target",
                "gflops_share",
                "agreement",
                "agreement_low",
                "kl",
                "top1_change",
                "top1_change_se",
                "setting",
            ],
        )
    )
    plot_fronts(
        fronts,
        dense,
        Path(args.figure),
        f"{args.model}: fronts chosen on {len(cal)} calibration images, run on {len(rep)} report images",
    )
    return 0


def keep_other_methods(out: str, rows: list, searches: dict, fronts: dict) -> tuple[list, dict, dict]:
    """With ``--only``: the re-run methods' results merged into the previous file's, in its order."""
    if not Path(out).exists():
        return rows, searches, fronts
    previous = json.loads(Path(out).read_text())
    order = list(previous["searches"]) + [m for m in searches if m not in previous["searches"]]
    merged_searches = {m: searches.get(m, previous["searches"].get(m)) for m in order}
    merged_fronts = {m: fronts.get(m, previous["fronts"].get(m)) for m in order}
    kept = [r for r in previous["rows"] if r["method"] not in searches] + rows
    targets = [f"{share:.0%}" for share in TARGETS]
    kept.sort(key=lambda r: (order.index(r["method"]), targets.index(r["target"])))
    return kept, merged_searches, merged_fronts


def plot_fronts(fronts: dict, dense: float, out: Path, title: str) -> None:
    from atmerge.experiments.analyze import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    colours = iter(plt.get_cmap("tab10").colors)
    for label, points in fronts.items():
        pts = sorted(points, key=lambda p: p["gflops"])
        x = [100 * p["gflops"] / dense for p in pts]
        y = [100 * p["agreement"] for p in pts]
        lo = [max(0.0, 100 * (p["agreement"] - p["agreement_low"])) for p in pts]  # ≥ 0 despite rounding
        hi = [max(0.0, 100 * (p["agreement_high"] - p["agreement"])) for p in pts]
        ax.errorbar(x, y, yerr=[lo, hi], fmt="-o", ms=3, capsize=2, lw=1, color=next(colours), label=label)
    ax.set_xlabel("GFLOPs, % of the unpatched model"), ax.set_ylabel("agreement with the unpatched model (%)")
    ax.set_title(title, fontsize=8), ax.legend(fontsize=7)
    _save(fig, out)


def _compact(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    """The README table: per budget and method, report-image measures with their uncertainty;
    the setting column shows the searched settings only."""
    lines = [
        "| target | method | GFLOPs | agreement (95% CI) | KL (nats) | top-1 change ± SE | searched setting |",
        "|---|---|---|---|---|---|---|",
    ]
    by_target = sorted(report["rows"], key=lambda r: -float(r["target"].rstrip("%")))
    for r in by_target:
        if "agreement" not in r:
            lines.append(f"| {r['target']} | {r['method']} | — | — | — | — | {r['setting']} |")
            continue
        searched = report["searches"][r["method"]]["space"]
        settings = r["settings"]
        if "first" in searched:  # EViT's locations are searched as first/every
            searched = {"keep_rate": None, "locations": None}
        setting = ", ".join(f"{k}={_compact(settings[k])}" for k in searched if k in settings)
        if "inflection" in searched:
            setting = f"r={settings['r']}"
        lines.append(
            f"| {r['target']} | {r['method']} | {r['gflops_share']:.1%} | {100 * r['agreement']:.2f}% "
            f"({100 * r['agreement_low']:.1f}–{100 * r['agreement_high']:.1f}) | {r['kl']:.4f} | "
            f"{100 * r['top1_change']:+.2f} ± {100 * r['top1_change_se']:.2f} | {setting} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
