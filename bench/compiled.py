"""torch.compile of a merged model on the CPU, one command:

    python bench/compiled.py [--repeats 11] [--out bench/results/compiled.json]
    python bench/compiled.py --smoke      # a tiny random model, 2 repeats: checks the script runs
    python bench/compiled.py --markdown   # docs/results.md's table, from the JSON (runs nothing)

For the CIFAR-10 reference ViT (65 tokens, 64 cifar10-test images) and the DeiT-S shape (random
weights, 224 px, 64 shared ImageNet photos), batch 64: images/s of the unpatched model, ToMe
(fixed r, bisected to ATM's GFLOPs: one graph) and ATM at the paper's DeiT-S setting (a
data-dependent count per block: dynamo breaks the graph where it is read), each eager and
compiled (``torch.compile``, inductor, default options), all six timed alternately after
warm-up, median of ``--repeats`` each; the compile time (first call) and the number of graphs
dynamo made.  The compiled models are fed several batches before timing so that ATM's varying
token counts have made its shapes dynamic.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import timm
import torch
import torch._dynamo as dynamo

import atmerge
from atmerge import data
from atmerge.methods.registry import knob_factory
from common import (
    WARMUP,
    alternate_timings,
    cifar10_model,
    describe,
    imagenet_batches,
    loader_batches,
    run_header,
    table,
    write_json,
)

PAPER_DEIT_S = dict(alpha=0.99, beta=0.04, theta_min=0.88)


def models(smoke: bool):
    """(name, model, batches of 64) of each model."""
    if smoke:
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()
        yield "tiny random ViT", model, list(torch.randn(16, 3, 32, 32).split(8))
        return
    model, transform = cifar10_model()
    test = data.subset(data.image_folder(data.cifar10_folder("test"), transform), 256, 0)
    yield "CIFAR-10 ViT", model, [x for x, _ in loader_batches(test, 64)]
    torch.manual_seed(0)
    deit = timm.create_model("deit_small_patch16_224").eval()
    yield "DeiT-S shape", deit, imagenet_batches(deit, 256, 64)


def markdown(report: dict) -> str:
    """docs/results.md's table from the JSON: every model x method x mode, and each row's speed-up
    against the unpatched model run the same way (eager against eager, compiled against compiled)."""
    rows = report["rows"]
    dense = {(r["model"], r["mode"]): r["images_per_s"] for r in rows if r["method"] == "unpatched"}
    lines = [
        "| model | method | mode | GFLOPs | images/s | vs unpatched eager | vs unpatched, same mode | vs own eager "
        "| first call (s) | graphs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = r["images_per_s"] / dense[(r["model"], r["mode"])] if (r["model"], r["mode"]) in dense else None
        first = "—" if r["first_call_seconds"] is None else f"{r['first_call_seconds']:.1f}"
        graphs = "—" if r["graphs"] is None else str(r["graphs"])
        lines.append(
            f"| {r['model']} | {r['method']} | {r['mode']} | {r['gflops']:.3f} | {r['images_per_s']:.0f} | "
            f"{r['speedup_vs_unpatched_eager']:.2f}× | {'—' if same is None else f'{same:.2f}×'} | "
            f"{r['speedup_vs_own_eager']:.2f}× | {first} | {graphs} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", default="bench/results/compiled.json")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="only print docs/results.md's table from --out's JSON")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return 0
    repeats = 2 if args.smoke else args.repeats
    rows, matched = [], {}
    for name, model, batches in models(args.smoke):
        depth, patches = len(model.blocks), model.patch_embed.num_patches
        atm = atmerge.ATM(**PAPER_DEIT_S)
        target = atmerge.budget.mean_gflops(model, atm, batches)
        tome = atmerge.match_gflops(model, knob_factory("tome", depth, patches), target, batches, steps=8).method
        matched[name] = dict(
            target_gflops=target,
            tome=describe(tome),
            atm=describe(atm),
            images=sum(x.shape[0] for x in batches),
            batch_size=batches[0].shape[0],
        )
        atmerge.unpatch(model)
        variants, graphs, compile_seconds, gflops = {}, {}, {}, {}
        for method_name, method in (("unpatched", None), ("ToMe", tome), ("ATM", atm)):
            eager = copy.deepcopy(model)
            if method is not None:
                atmerge.patch(eager, method)
            dynamo.reset()
            dynamo.utils.counters.clear()
            compiled = torch.compile(copy.deepcopy(eager))
            with torch.no_grad():
                start = time.perf_counter()
                compiled(batches[0])
                compile_seconds[method_name] = time.perf_counter() - start
                for x in batches[1:]:  # let varying token counts make the shapes dynamic
                    compiled(x)
                eager(batches[0])
            graphs[method_name] = int(dynamo.utils.counters["stats"]["unique_graphs"])
            gflops[method_name] = (
                atmerge.last_stats(eager).gflops
                if method is not None
                else atmerge.gflops(eager, tuple(batches[0].shape[1:]))
            )
            variants[f"{method_name} eager"] = (lambda: None, lambda m=eager, x=batches[0]: m(x))
            variants[f"{method_name} compiled"] = (lambda: None, lambda m=compiled, x=batches[0]: m(x))
        seconds = alternate_timings(variants, repeats)
        base = seconds["unpatched eager"]
        for variant, s in seconds.items():
            method_name, mode = variant.rsplit(" ", 1)
            rows.append(
                dict(
                    model=name,
                    method=method_name,
                    mode=mode,
                    gflops=round(gflops[method_name], 3),
                    images_per_s=round(batches[0].shape[0] / s, 1),
                    speedup_vs_unpatched_eager=round(base / s, 3),
                    speedup_vs_own_eager=round(seconds[f"{method_name} eager"] / s, 3),
                    flops_ratio=round(gflops["unpatched"] / gflops[method_name], 3),
                    first_call_seconds=round(compile_seconds[method_name], 1) if mode == "compiled" else None,
                    graphs=graphs[method_name] if mode == "compiled" else None,
                )
            )
            print(rows[-1], flush=True)
    print(
        table(
            rows,
            [
                "model",
                "method",
                "mode",
                "gflops",
                "images_per_s",
                "speedup_vs_unpatched_eager",
                "speedup_vs_own_eager",
                "flops_ratio",
                "first_call_seconds",
                "graphs",
            ],
        )
    )
    header = run_header(
        args,
        repeats=repeats,
        warmup=WARMUP,
        dtype="float32",
        backend="inductor (torch.compile default)",
        tome_bisection_steps=8,
        matched_per_model=matched,
        timed="batches[0] of each model; the other batches run once first to make shapes dynamic",
    )
    write_json(dict(**header, repeats=repeats, rows=rows), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
