"""GPU throughput, ToMe-README style — needs a CUDA device, never run in tests:

    python bench/gpu.py [--batch 256] [--repeats 11] [--out bench/results/gpu.json]
    python bench/gpu.py --markdown       # the README table from the JSON

DeiT-T, DeiT-S and DeiT-B shapes at 224 px (random weights: speed does not need trained ones),
fed the shared ImageNet photos (tiled to the batch).  For fp16 and bf16 autocast: images/s of the
unpatched model, of ATM at the paper's DeiT-S setting (α 0.99, β 0.04, θ_min 0.88), of ToMe with
r bisected to ATM's mean GFLOPs, and of per-image ATM (``batch_adaptive=False``, padded batch)
with θ_min bisected to the same GFLOPs; the speed-up of each beside its FLOPs ratio.  Timing:
CUDA-synchronised, after warm-up, the models timed alternately (unpatched, ATM, ToMe, per-image
ATM, ...), median of ``--repeats`` runs each.  Attention with a bias (proportional attention)
runs through PyTorch's SDPA with an additive mask.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch

import atmerge
from atmerge.methods.registry import knob_factory
from common import alternate_timings, imagenet_batches, method_runs, run_header, write_json

SHAPES = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")
PAPER_DEIT_S = dict(alpha=0.99, beta=0.04, theta_min=0.88)
WARMUP = 3  # rounds before timing (CUDA kernels, autotuning)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def batch_of(model, size: int, device) -> torch.Tensor:
    photos = torch.cat(imagenet_batches(model, 64, 64))
    return photos.repeat((size + photos.shape[0] - 1) // photos.shape[0], 1, 1, 1)[:size].to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matched(model, factory, target: float, x: torch.Tensor):
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        return atmerge.match_gflops(model, factory, target, [x], steps=10).method


def timed(model, methods: dict, x: torch.Tensor, dtype, repeats: int) -> dict:
    """Median seconds per batch of each method (None = unpatched), timed alternately after three
    warm-up rounds, CUDA-synchronised."""
    with torch.autocast(x.device.type, dtype=dtype):
        seconds = alternate_timings(method_runs(model, methods, x), repeats, warmup=WARMUP, sync=lambda: sync(x.device))
    atmerge.unpatch(model)
    return seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", default="bench/results/gpu.json")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, DeiT-T only, batch 8, bf16: checks the script runs")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return 0
    shapes, dtypes, device = SHAPES, DTYPES, torch.device("cuda")
    if args.smoke:
        shapes, dtypes, device, args.batch, args.repeats = (
            SHAPES[:1],
            {"bf16": torch.bfloat16},
            torch.device("cpu"),
            8,
            1,
        )
    elif not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device; none is available here", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows, bisected = [], {}
    for shape in shapes:
        model = timm.create_model(shape, pretrained=False).eval().to(device)
        x = batch_of(model, args.batch, device)
        depth, patches = len(model.blocks), model.patch_embed.num_patches
        atm = atmerge.ATM(**PAPER_DEIT_S)
        atmerge.patch(model, atm)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            model(x)
        target = atmerge.last_stats(model).gflops
        dense = atmerge.gflops(atmerge.unpatch(model), (3, 224, 224))
        methods = {
            "unpatched": None,
            "ATM": atm,
            "ToMe": matched(model, knob_factory("tome", depth, patches), target, x),
            "ATM per-image": matched(
                model,
                lambda t: atmerge.ATM(**{**PAPER_DEIT_S, "theta_min": 0.5 + 0.5 * t}, batch_adaptive=False),
                target,
                x,
            ),
        }
        bisected[shape] = {
            "target_gflops": target,
            "ToMe": str(methods["ToMe"]),
            "ATM per-image theta_min": methods["ATM per-image"].theta_min,
        }
        gflops = {"unpatched": dense}
        for name, method in methods.items():
            if method is not None:
                atmerge.patch(model, method)
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                    model(x)
                gflops[name] = atmerge.last_stats(model).gflops
        for dtype_name, dtype in dtypes.items():
            seconds = timed(model, methods, x, dtype, args.repeats)
            for name in methods:
                rows.append(
                    dict(
                        model=shape,
                        dtype=dtype_name,
                        method=name,
                        gflops=gflops[name],
                        images_per_s=args.batch / seconds[name],
                        speedup=seconds["unpatched"] / seconds[name],
                        flops_ratio=dense / gflops[name],
                    )
                )
                print(rows[-1], flush=True)
    header = run_header(
        args,
        device=str(device),
        shapes=shapes,
        dtypes=list(dtypes),
        batch=args.batch,
        repeats=args.repeats,
        warmup=WARMUP,
        weights="random init, seed 0",
        images="64 shared ImageNet photos repeated to the batch",
        bisection_steps=10,
        bisected_in="bf16 autocast",
        atm=PAPER_DEIT_S,
        bisected=bisected,
    )
    write_json(
        dict(
            **header,
            device_name=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke run)",
            batch=args.batch,
            rows=rows,
        ),
        args.out,
    )
    return 0


def markdown(report: dict) -> str:
    device = report["device_name"] if "device_name" in report else report["device"]  # older files: "device"
    lines = [
        f"{device}, batch {report['batch']}, median of the runs (`{report['command']}`)",
        "",
        "| model | dtype | method | GFLOPs | images/s | speed-up | FLOPs ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['method']} | {r['gflops']:.2f} | {r['images_per_s']:.0f} | "
            f"{r['speedup']:.2f}× | {r['flops_ratio']:.2f}× |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
