"""Core benchmark: ATM against the unpatched model on CPU, one command:

    python bench/core.py [--out bench/results/core.json] [--quick] [--no-compile] [--compile MODE]
    python bench/core.py --smoke     # a tiny random ViT in place of 1 and 2, no 3 and 4: checks the script runs
    python bench/core.py --markdown [speed|dinov2]   # docs/results.md's tables, from the JSON (runs nothing)

1. CIFAR-10 reference ViT (../shared) on cifar10-test: top-1, mean GFLOPs, tokens per block;
   images/s at batch 64 (the speed protocol: one process, after warm-up, the models timed
   alternately — dense, merged, dense, … —, median of 11 each), speed-up beside the FLOPs ratio
   of the timed batch; eager and compiled (``torch.compile``, inductor; every compiled model
   against the dense model compiled the same way, all in the same alternating run).
2. DeiT-S shape, random init, 224 px, on the shared ImageNet photos: GFLOPs, tokens, images/s.
3. Merge machinery cost at 197 tokens (DeiT-S block, batch 64) as a share of a block's time.
4. DINOv2-S (../shared weights): raw vs centred key similarity at matched GFLOPs (85/75/65% of
   the unmerged model; ATM(alpha=1, beta, theta_min=0.5) with beta bisected), fidelity = cosine
   of the final CLS feature to the unmerged model's.

Goals printed met or not (CPU, batch 64, eager and compiled): speed-up ≥ 0.9 × FLOPs ratio on
the CIFAR-10 ViT, ≥ 1.0 × on the DeiT-S shape (``goals`` in the JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch._dynamo as dynamo

import atmerge
from atmerge import checkpoints, data
from common import (
    WARMUP,
    alternate_timings,
    imagenet_batches,
    loader_batches,
    method_runs,
    run_header,
    table,
    write_json,
)
from atmerge.core.matching import alternate_split, best_match
from atmerge.core.merging import bipartite_merge, merge_weighted_average
from atmerge.core.schedules import batch_adaptive_r

PAPER_DEIT_S = dict(alpha=0.99, beta=0.04, theta_min=0.88)  # Table A2, DeiT-S row at 3.26 GFLOPs
GOAL_SHARE = {"cifar10_reference": 0.9, "deit_s_random_init": 1.0}  # speed-up >= share x FLOPs ratio


def compiled_runs(model, methods: dict, timed: torch.Tensor, batches, mode: str) -> tuple[dict, dict]:
    """For :func:`alternate_timings`: ``torch.compile(mode=mode)`` of the unpatched model and of a
    copy patched with each method, each fed ``batches`` once before (adaptive ATM's varying counts
    make its shapes dynamic, as in use); and per name (first-call seconds, graphs)."""
    runs, info = {}, {}
    dynamo.reset()
    for name, method in {"baseline": None, **methods}.items():
        m = copy.deepcopy(atmerge.unpatch(model))
        if method is not None:
            atmerge.patch(m, method)
        dynamo.utils.counters.clear()
        compiled = torch.compile(m, mode=None if mode == "default" else mode)
        with torch.no_grad():
            start = time.perf_counter()
            compiled(timed)
            first = time.perf_counter() - start
            for x in batches[:4]:
                compiled(x[0] if isinstance(x, (list, tuple)) else x)  # (images, labels) or images
        info[name] = (first, int(dynamo.utils.counters["stats"]["unique_graphs"]))
        print(f"  compiled {name}: first call {first:.1f} s, {info[name][1]} graph(s)", flush=True)
        runs[f"{name} compiled"] = (lambda: None, lambda c=compiled: c(timed))
    return runs, info


def goal_rows(section: str, rows: list[dict]) -> list[dict]:
    """The CPU goal of ``section`` for every merged row: speed-up >= share x FLOPs ratio."""
    share = GOAL_SHARE[section]
    return [
        dict(
            section=section,
            method=r["method"],
            mode=r["mode"],
            speedup=round(r["speedup"], 3),
            flops_ratio=round(r["flops_ratio"], 3),
            speedup_over_flops_ratio=round(r["speedup_over_flops_ratio"], 3),
            needed=share,
            met=r["speedup_over_flops_ratio"] >= share,
        )
        for r in rows
        if r["method"] != "baseline"
    ]


def print_goals(goals: list[dict]) -> None:
    for g in goals:
        print(
            f"  {'MET' if g['met'] else 'NOT MET'}: {g['section']} {g['method']} {g['mode']}: speed-up "
            f"{g['speedup']:.2f}x at FLOPs ratio {g['flops_ratio']:.2f}x = {g['speedup_over_flops_ratio']:.2f} "
            f"(goal >= {g['needed']})"
        )


def compare(
    model, batches, methods: dict, timed: torch.Tensor, repeats: int = 11, compile_mode: str | None = None
) -> list[dict]:
    """Accuracy, GFLOPs and fidelity of the baseline and each method on all ``batches``; speed on
    the batch ``timed`` (64 images): all models timed alternately (baseline, method, …, baseline,
    …) after warm-up, median of ``repeats`` each, with the FLOPs ratio of that same batch.  With
    ``compile_mode`` the compiled models join the same alternating run (rows with mode
    'compiled', speed-up against the compiled baseline)."""
    atmerge.unpatch(model)
    base, ref = atmerge.evaluate(model, batches, keep_outputs=True)
    results = {"baseline": base}
    for name, method in methods.items():
        atmerge.patch(model, method)
        results[name] = atmerge.evaluate(model, batches, reference=ref)[0]
    atmerge.unpatch(model)
    runs, compiled = method_runs(model, {"baseline": None, **methods}, timed), {}
    if compile_mode:
        more, compiled = compiled_runs(model, methods, timed, batches, compile_mode)
        runs.update(more)
    seconds = alternate_timings(runs, repeats)
    timed_gflops = {"baseline": atmerge.gflops(atmerge.unpatch(model), tuple(timed.shape[1:]))}
    for name, method in methods.items():
        atmerge.patch(model, method)
        with torch.no_grad():
            model(timed)
        timed_gflops[name] = atmerge.last_stats(model).gflops
    atmerge.unpatch(model)
    rows = []
    for name, res in results.items():
        speedup, flops_ratio = seconds["baseline"] / seconds[name], timed_gflops["baseline"] / timed_gflops[name]
        rows.append(
            dict(
                method=name,
                mode="eager",
                top1=res.top1,
                gflops=res.gflops,
                matching_gflops=res.matching_gflops,
                images_per_s=timed.shape[0] / seconds[name],
                speedup=speedup,
                flops_ratio=flops_ratio,
                speedup_over_flops_ratio=speedup / flops_ratio,
                output_cosine=res.output_cosine,
                tokens_per_block=[round(t, 1) for t in res.tokens_per_block],
            )
        )
    for name, (first, graphs) in compiled.items():
        s = seconds[f"{name} compiled"]
        speedup = seconds["baseline compiled"] / s
        flops_ratio = timed_gflops["baseline"] / timed_gflops[name]
        rows.append(
            dict(
                method=name,
                mode="compiled",
                gflops=timed_gflops[name],
                images_per_s=timed.shape[0] / s,
                speedup=speedup,
                flops_ratio=flops_ratio,
                speedup_over_flops_ratio=speedup / flops_ratio,
                first_call_seconds=round(first, 1),
                graphs=graphs,
            )
        )
    return rows


def tiny_vit():
    """A tiny random ViT and blocky random images (many equal patches, so that tokens merge): --smoke."""
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=10
    ).eval()
    x = torch.nn.functional.interpolate(torch.randn(8, 3, 4, 4), size=32, mode="nearest")
    return model, list(x.split(4))


def merge_overhead(batch: int = 64, repeats: int = 21) -> dict:
    """Time of one DeiT-S block at 197 tokens vs. the ATM merge step alone (matching, r, merge),
    timed alternately, median of ``repeats``."""
    torch.manual_seed(0)
    block = timm.create_model("deit_small_patch16_224").blocks[0].eval()
    x = torch.randn(batch, 197, 384)
    metric = torch.randn(batch, 197, 64)
    size = torch.ones(batch, 197)

    def merge_step():
        a, b = alternate_split(197, 1)
        scores, match = best_match(metric, a, b)
        r = batch_adaptive_r(scores, 0.0)  # about half of A above 0 on random keys
        return merge_weighted_average(bipartite_merge(scores, match, a, b, r, 1), x, size)

    seconds = alternate_timings(
        {"block": (lambda: None, lambda: block(x)), "merge": (lambda: None, merge_step)}, repeats
    )
    t_block, t_merge = seconds["block"], seconds["merge"]
    return dict(batch=batch, tokens=197, block_ms=1e3 * t_block, merge_ms=1e3 * t_merge, share=t_merge / t_block)


def dinov2_similarity(count: int, batch_size: int, steps: int) -> list[dict]:
    model = checkpoints.dinov2_small()
    batches = imagenet_batches(model, count, batch_size)
    base, ref = atmerge.evaluate(model, batches, keep_outputs=True)
    rows = []
    for share in (0.85, 0.75, 0.65):
        target = share * base.gflops
        for sim in ("raw", "centered"):
            # One knob for both: t in [0, 1] scales the decay, beta = 0.1 (1 - t); t = 1 merges nothing.
            match = atmerge.match_gflops(
                model,
                lambda t: atmerge.ATM(alpha=1.0, beta=0.1 * (1 - t), theta_min=0.5, similarity=sim),
                target,
                batches,
                steps=steps,
            )
            res, _ = atmerge.evaluate(model, batches, reference=ref)
            rows.append(
                dict(
                    target=f"{share:.0%}",
                    similarity=sim,
                    beta=round(match.method.beta, 5),
                    gflops=res.gflops,
                    gflops_share=res.gflops / base.gflops,
                    within_budget=match.within_budget,
                    cls_cosine=res.output_cosine,
                    tokens_last=round(res.tokens_per_block[-1], 1),
                )
            )
            atmerge.unpatch(model)
    return rows, base.gflops


MODELS = {"cifar10_reference": "CIFAR-10 ViT", "deit_s_random_init": "DeiT-S shape"}


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}%"


def _num(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def markdown_speed(report: dict) -> str:
    """Sections 1 and 2 (top-1, GFLOPs, speed, cosine; compiled rows where the JSON has them), the
    tokens entering each block of the merged rows, the merge machinery (3) and the speed goals."""
    rows = [(key, r) for key in MODELS for r in report.get(key, {}).get("rows", [])]
    compiled = any(r.get("mode", "eager") != "eager" for _, r in rows)
    batch = report.get("batch_size") or report.get("chosen", {}).get("batch_size", 64)
    head = ["model", "method", *(["mode"] if compiled else []), "images", "top-1", "GFLOPs", "images/s", "speed-up"]
    head += ["FLOPs ratio (timed batch)", "speed-up / FLOPs ratio", "output cosine"]
    head += ["first call (s)", "graphs"] if compiled else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    tokens = []
    for key, r in rows:
        eager, merged = r.get("mode", "eager") == "eager", r["method"] != "baseline"
        method = "unpatched" if not merged else r["method"]
        images = f"{report[key]['images']:,}" if eager else f"{batch} (timed batch)"
        cells = [MODELS[key], method, *([r.get("mode", "eager")] if compiled else []), images]
        cells += [_pct(r.get("top1")), f"{r['gflops']:.3f}", f"{r['images_per_s']:.1f}"]
        cells += [f"{r['speedup']:.2f}×", f"{r['flops_ratio']:.2f}×"]
        cells += [f"{r['speedup_over_flops_ratio']:.3f}" if merged else "—", _num(r.get("output_cosine"), ".4f")]
        cells += [_num(r.get("first_call_seconds"), ".1f"), _num(r.get("graphs"), "d")] if compiled else []
        lines.append("| " + " | ".join(cells) + " |")
        if merged and eager and r.get("tokens_per_block"):
            tokens.append((MODELS[key], method, r["tokens_per_block"]))
    if tokens:
        blocks = max(len(t) for _, _, t in tokens)
        lines += ["", "| model | method | " + " | ".join(f"block {i + 1}" for i in range(blocks)) + " |"]
        lines.append("|---|---|" + "---|" * blocks)
        lines += [f"| {m} | {meth} | " + " | ".join(f"{v:.1f}" for v in t) + " |" for m, meth, t in tokens]
    if "merge_overhead" in report:
        o = report["merge_overhead"]
        lines += [
            "",
            "| merge machinery at | batch | block (ms) | merge step (ms) | share of the block |",
            "|---|---|---|---|---|",
            f"| {o['tokens']} tokens | {o['batch']} | {o['block_ms']:.1f} | {o['merge_ms']:.2f} | {o['share']:.1%} |",
        ]
    if report.get("goals"):
        lines += [
            "",
            "| goal: speed-up ≥ share × FLOPs ratio | method | mode | speed-up / FLOPs ratio | share | met |",
            "|---|---|---|---|---|---|",
        ]
        for g in report["goals"]:
            lines.append(
                f"| {MODELS.get(g['section'], g['section'])} | {g['method']} | {g['mode']} | "
                f"{g['speedup_over_flops_ratio']:.3f} | {g['needed']} | {'met' if g['met'] else 'not met'} |"
            )
    return "\n".join(lines)


def markdown_dinov2(report: dict) -> str:
    """Section 4: raw against centred keys on DINOv2-S at matched GFLOPs."""
    d = report["dinov2_similarity"]
    by = {(r["target"], r["similarity"]): r for r in d["rows"]}
    targets = list(dict.fromkeys(r["target"] for r in d["rows"]))
    lines = [
        f"| budget (of {d['baseline_gflops']:.3f} GFLOPs) | raw keys: GFLOPs / CLS cosine (β) | "
        "centred keys: GFLOPs / CLS cosine (β) |",
        "|---|---|---|",
    ]
    for t in targets:
        cells = []
        for sim in ("raw", "centered"):
            r = by.get((t, sim))
            cells.append("—" if r is None else f"{r['gflops']:.3f} / {r['cls_cosine']:.4f} (β = {r['beta']:.4f})")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


MARKDOWN = {"speed": markdown_speed, "dinov2": markdown_dinov2}


def markdown(report: dict, section: str = "all") -> str:
    """docs/results.md's tables of this bench from its JSON: ``speed`` (sections 1-3), ``dinov2`` (4)."""
    names = [n for n in MARKDOWN if section in ("all", n)]
    return "\n\n".join(MARKDOWN[n](report) for n in names if n != "dinov2" or "dinov2_similarity" in report)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="default bench/results/core.json (--smoke: a temporary folder)")
    ap.add_argument(
        "--markdown",
        nargs="?",
        const="all",
        choices=("all", *MARKDOWN),
        help="only print docs/results.md's tables (all, or one section) from --out's JSON; runs nothing",
    )
    ap.add_argument("--quick", action="store_true", help="small subsets, for a smoke run")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny random ViT (batch 4, 1 repeat) in place of sections 1 and 2, eager and compiled; no 3, 4",
    )
    ap.add_argument(
        "--compile",
        default="default",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode of the compiled rows (inductor)",
    )
    ap.add_argument("--no-compile", action="store_true", help="eager rows only")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.out or "bench/results/core.json").read_text()), args.markdown))
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    q, smoke = args.quick, args.smoke
    out = args.out or (
        str(Path(tempfile.gettempdir()) / "atmerge-core-smoke" / "core.json") if smoke else "bench/results/core.json"
    )
    compile_mode = None if args.no_compile else args.compile
    repeats = 1 if smoke else 3 if q else 11
    for limit in ("recompile_limit", "cache_size_limit"):  # adaptive ATM: one graph per count pattern
        if hasattr(dynamo.config, limit):
            setattr(dynamo.config, limit, 64)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # ATM's graph breaks where it reads a count
    report: dict = run_header(
        args,
        batch_size=4 if smoke else 64,
        dtype="float32",
        seed=0,
        warmup=WARMUP,
        repeats=repeats,
        compile_mode=compile_mode,
        backend="inductor" if compile_mode else None,
        merge_overhead_repeats=5 if q else 21,
        cifar10_images=256 if q else "all",
        deit_s_images=64 if q else 256,
        dinov2_images=16 if q else 64,
        dinov2_batch_size=32,
        dinov2_bisection_steps=5 if q else 12,
        atm=PAPER_DEIT_S,
        goals={k: f"speed-up >= {v} x FLOPs ratio, eager and compiled" for k, v in GOAL_SHARE.items()},
        note="the bisected beta of every DINOv2 row is in dinov2_similarity.rows",
    )
    atm = {"ATM (0.99, 0.04, 0.88)": atmerge.ATM(**PAPER_DEIT_S)}
    cols = [
        "method",
        "mode",
        "top1",
        "gflops",
        "images_per_s",
        "speedup",
        "flops_ratio",
        "speedup_over_flops_ratio",
        "output_cosine",
        "first_call_seconds",
        "graphs",
    ]
    goals = []

    print("== 1. CIFAR-10 reference ViT, cifar10-test ==", flush=True)
    methods = {**atm, "ATM centred (0.99, 0.04, 0.88)": atmerge.ATM(**PAPER_DEIT_S, similarity="centered")}
    if smoke:
        model, batches = tiny_vit()
        labelled = [(x, torch.zeros(x.shape[0], dtype=torch.long)) for x in batches]
        images = sum(x.shape[0] for x in batches)
    else:
        model = checkpoints.cifar10_reference_vit()
        ds = data.subset(data.image_folder(data.cifar10_folder("test"), data.cifar10_transform()), 256 if q else None)
        labelled = loader_batches(ds, 64)
        batches, images = [x for x, _ in labelled], len(ds)
    rows = compare(model, labelled, methods, batches[0], repeats=repeats, compile_mode=compile_mode)
    print(table(rows, cols))
    for r in rows:
        if "tokens_per_block" in r:
            print(f"  {r['method']}: tokens per block {r['tokens_per_block']}")
    report["cifar10_reference"] = dict(images=images, rows=rows)
    goals += goal_rows("cifar10_reference", rows)

    print("\n== 2. DeiT-S (random init), 224 px, shared ImageNet photos ==", flush=True)
    if smoke:
        model, batches = tiny_vit()
    else:
        model = timm.create_model("deit_small_patch16_224").eval()
        batches = imagenet_batches(model, 64 if q else 256, 64)
    rows = compare(model, batches, atm, batches[0], repeats=repeats, compile_mode=compile_mode)
    print(table(rows, cols[:2] + cols[3:]))
    for r in rows:
        if "tokens_per_block" in r:
            print(f"  {r['method']}: tokens per block {r['tokens_per_block']}")
    report["deit_s_random_init"] = dict(images=sum(len(b) for b in batches), rows=rows)
    goals += goal_rows("deit_s_random_init", rows)

    if not smoke:
        print("\n== 3. Merge machinery at 197 tokens (DeiT-S block, batch 64) ==", flush=True)
        overhead = merge_overhead(repeats=5 if q else 21)
        print(table([overhead], list(overhead)))
        report["merge_overhead"] = overhead

        print("\n== 4. DINOv2-S: raw vs centred keys at matched GFLOPs (fidelity of the CLS feature) ==", flush=True)
        rows, base_gflops = dinov2_similarity(16 if q else 64, 32, 5 if q else 12)
        print(f"unmerged: {base_gflops:.3f} GFLOPs")
        print(table(rows, list(rows[0])))
        report["dinov2_similarity"] = dict(baseline_gflops=base_gflops, rows=rows)

    print("\n== Goals (CPU, batch 64: speed-up >= share x FLOPs ratio) ==")
    print_goals(goals)
    report["goals"] = goals
    write_json(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
