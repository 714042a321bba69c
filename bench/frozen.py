"""Frozen ATM on the CPU, batch 64, one command:

    python bench/frozen.py [--repeats 7] [--out bench/results/frozen.json]
    python bench/frozen.py --smoke       # a tiny random ViT, 5 repeats: checks the script runs (seconds)

For the CIFAR-10 reference ViT (65 tokens) and the DeiT-S shape (random weights, 224 px):

1. Speed: the dense model, ATM at the paper's DeiT-S setting (adaptive: one count read per block),
   ATM frozen on calibration images (``atmerge.freeze``: fixed counts, no host sync, one graph)
   and ToMe at the frozen GFLOPs (constant r bisected), each eager and compiled
   (``torch.compile``, inductor defaults; every compiled model against the dense model compiled
   the same way), all timed alternately after warm-up, median of ``--repeats`` each, on one batch
   of 64 images the freezing never saw.
2. Fidelity (CIFAR-10 ViT; DINOv2-S + probe with ``--models cifar10,dinov2``): top-1 agreement with the unpatched model of adaptive and frozen ATM
   (and ToMe) on cifar10-test images the freezing never saw (95% Wilson interval), the paired
   difference frozen − adaptive with its standard error, and GFLOPs on those images.
3. Export (DeiT-S shape; needs atmerge[export]): onnxruntime speed of frozen ATM and ToMe against
   the dense model exported the same way (``atmerge.export_onnx``), batch 64, timed alternately.

The machine's load average is recorded before and after: on a shared CPU timings drift, which is
why every comparison is a ratio within one alternating run.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch._dynamo as dynamo

import atmerge
from atmerge import data
from atmerge.budget import match_gflops
from atmerge.fidelity import wilson_interval
from atmerge.methods.registry import knob_factory
from common import (
    WARMUP,
    alternate_timings,
    cifar10_model,
    dinov2_probe_model,
    imagenet_batches,
    loader_batches,
    run_header,
    table,
    write_json,
)

PAPER_DEIT_S = dict(alpha=0.99, beta=0.04, theta_min=0.88)  # Table A2, DeiT-S row
# On DINOv2-S the paper's DeiT-S setting keeps ~18% of the GFLOPs (24% agreement): useless for
# judging what freezing costs.  Its ATM setting calibrated for a 60% budget instead
# (bench/results/calibrated_dinov2-probe.json, "ATM", "budget 60%"; calibrated on cifar10-train).
ATM_SETTINGS = {
    "DINOv2-S + probe": dict(alpha=0.9172, beta=0.296893, theta_min=0.8685, split_layer=6, similarity="centered")
}


def mean_gflops(model: torch.nn.Module, method, batches: list[torch.Tensor]) -> float:
    """Mean per-image GFLOPs of ``model`` patched with ``method`` over ``batches``."""
    atmerge.patch(model, method)
    total = images = 0
    with torch.no_grad():
        for x in batches:
            model(x)
            total += atmerge.last_stats(model).gflops * x.shape[0]
            images += x.shape[0]
    return total / images


def predictions(model: torch.nn.Module, method, batches: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Top-1 classes [N] of ``model`` (patched with ``method``; None: unpatched) and its mean
    per-image GFLOPs on ``batches``, in one pass."""
    atmerge.patch(model, method) if method is not None else atmerge.unpatch(model)
    classes, total = [], 0.0
    with torch.no_grad():
        for x in batches:
            classes.append(model(x).argmax(-1))
            total += (atmerge.last_stats(model).gflops if method is not None else 0.0) * x.shape[0]
    classes = torch.cat(classes)
    return classes, total / classes.numel()


def agreement_rows(model, methods: dict, batches: list[torch.Tensor]) -> tuple[list[dict], dict]:
    """Agreement with the unpatched model of each method (Wilson 95%), and frozen − adaptive
    paired (mean difference of the per-image agreement and its standard error)."""
    reference, _ = predictions(model, None, batches)
    n = reference.numel()
    agree, rows = {}, []
    for name, method in methods.items():
        classes, gflops = predictions(model, method, batches)
        agree[name] = (classes == reference).double()
        k = int(agree[name].sum())
        low, high = wilson_interval(k, n)
        rows.append(
            dict(
                method=name,
                images=n,
                agreement=round(k / n, 4),
                wilson_low=round(low, 4),
                wilson_high=round(high, 4),
                gflops=round(gflops, 4),
            )
        )
        print(rows[-1], flush=True)
    d = agree["ATM frozen"] - agree["ATM"]
    se = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    paired = dict(
        frozen_minus_adaptive=round(float(d.mean()), 4),
        standard_error=round(se, 4),
        within_one_standard_error=bool(abs(float(d.mean())) <= se) if se == se else None,
        images_that_differ=int((d != 0).sum()),
    )
    atmerge.unpatch(model)
    return rows, paired


def setups(smoke: bool, report_images: int, deit: bool = True, cifar: bool = True, dinov2: bool = False):
    """(name, model, freezing batches, report batches) of each model; the report batches are
    images the freezing never saw, their first one the timed batch of 64."""
    if smoke:
        torch.manual_seed(0)
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10
        ).eval()
        x = torch.randn(32, 3, 32, 32)
        yield "tiny random ViT", model, list(x[:16].split(8)), list(x[16:].split(8))
        return
    if cifar:
        yield cifar10_test_setup("CIFAR-10 ViT", *cifar10_model(), report_images)
    if dinov2:
        yield cifar10_test_setup("DINOv2-S + probe", *dinov2_probe_model(), report_images)
    if not deit:
        return
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224").eval()
    photos = imagenet_batches(model, 128, 64)
    yield "DeiT-S shape", model, photos[:1], photos[1:2]


def cifar10_test_setup(name: str, model, transform, report_images: int):
    """``model``, 512 shuffled cifar10-test images to freeze on and the next ``report_images`` to
    report on (the DINOv2 probe was trained on cifar10-train: neither set overlaps its images)."""
    test = data.image_folder(data.cifar10_folder("test"), transform)
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0)).tolist()
    freeze_set = torch.utils.data.Subset(test, order[:512])
    report_set = torch.utils.data.Subset(test, order[512 : 512 + report_images])
    return (
        name,
        model,
        [x for x, _ in loader_batches(freeze_set, 64)],
        [x for x, _ in loader_batches(report_set, 64)],
    )


def onnx_rows(name: str, model, methods: dict, x: torch.Tensor, repeats: int, gflops: dict) -> list[dict]:
    """onnxruntime images/s of each method's export against the dense model exported the same way."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    runs, parity = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for method_name, method in methods.items():
            m = copy.deepcopy(model)
            if method is not None:
                atmerge.patch(m, method)
            path = atmerge.export_onnx(m, Path(folder) / f"{len(runs)}.onnx", x)
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed = {"images": x.numpy()}
            with torch.no_grad():
                parity[method_name] = float(abs(session.run(None, feed)[0] - m(x).numpy()).max())
            runs[method_name] = (lambda: None, lambda s=session, f=feed: s.run(None, f))
        seconds = alternate_timings(runs, repeats)
    base = seconds["dense"]
    return [
        dict(
            model=name,
            method=k,
            runtime="onnxruntime",
            gflops=round(gflops[k], 4),
            images_per_s=round(x.shape[0] / s, 1),
            speedup_vs_dense=round(base / s, 3),
            flops_ratio=round(gflops["dense"] / gflops[k], 3),
            speedup_over_flops_ratio=round(base / s / (gflops["dense"] / gflops[k]), 3),
            max_abs_diff_vs_eager=parity[k],
        )
        for k, s in seconds.items()
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--report-images", type=int, default=2000, help="CIFAR-10 test images for agreement (never frozen on)"
    )
    ap.add_argument(
        "--models",
        default="cifar10,deit-s",
        help="comma-separated: cifar10, deit-s, dinov2 (DINOv2-S + its CIFAR-10 probe, 224 px)",
    )
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--no-fidelity", action="store_true", help="skip the agreement on unseen CIFAR-10 images (2)")
    ap.add_argument(
        "--no-speed",
        action="store_true",
        help="skip the timings (1 and 3) and the DeiT-S shape: fidelity only",
    )
    ap.add_argument("--out", default="bench/results/frozen.json")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch (and onnxruntime) threads; 1 is steadier on a CPU shared with other jobs",
    )
    args = ap.parse_args(argv)
    models = set(args.models.split(","))
    unknown = models - {"cifar10", "deit-s", "dinov2"}
    if unknown:
        ap.error(f"--models {args.models!r}: unknown {', '.join(sorted(unknown))}; choose from cifar10, deit-s, dinov2")
    torch.set_num_threads(args.threads)
    repeats = 5 if args.smoke else args.repeats
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # ATM's graph breaks where it reads a count: expected
    load_before = os.getloadavg()
    speed, fidelity, exported, frozen_settings = [], [], [], {}
    for name, model, freeze_batches, report_batches in setups(
        args.smoke,
        64 if args.smoke or args.no_fidelity else args.report_images,
        deit="deit-s" in models and not args.no_speed,
        cifar="cifar10" in models,
        dinov2="dinov2" in models,
    ):
        depth, patches = len(model.blocks), model.patch_embed.num_patches
        atm = atmerge.ATM(**ATM_SETTINGS.get(name, PAPER_DEIT_S))
        adaptive_freeze_gflops = mean_gflops(model, atm, freeze_batches)
        frozen = atmerge.freeze(model, freeze_batches)
        frozen_gflops = mean_gflops(model, frozen, freeze_batches[:1])
        tome = match_gflops(
            model, knob_factory("tome", depth, patches), frozen_gflops, freeze_batches[:1], steps=8
        ).method
        atmerge.unpatch(model)
        frozen_settings[name] = dict(
            frozen=repr(frozen),
            tome=repr(tome),
            freezing_images=sum(b.shape[0] for b in freeze_batches),
            adaptive_gflops_on_freezing_images=round(adaptive_freeze_gflops, 4),
            frozen_gflops=round(frozen_gflops, 4),
        )
        print(f"== {name}: {frozen_settings[name]}", flush=True)
        methods = {"dense": None, "ATM": atm, "ATM frozen": frozen, "ToMe": tome}
        timed = report_batches[0]
        variants, gflops, first_call, graphs = {}, {}, {}, {}
        for method_name, method in methods.items() if not args.no_speed else ():
            eager = copy.deepcopy(model)
            if method is not None:
                atmerge.patch(eager, method)
            with torch.no_grad():
                eager(timed)
            gflops[method_name] = (
                atmerge.last_stats(eager).gflops
                if method is not None
                else atmerge.gflops(eager, tuple(timed.shape[1:]))
            )
            variants[f"{method_name}|eager"] = (lambda: None, lambda m=eager: m(timed))
            if args.no_compile:
                continue
            dynamo.reset()
            dynamo.utils.counters.clear()
            compiled = torch.compile(copy.deepcopy(eager))
            with torch.no_grad():
                start = time.perf_counter()
                compiled(timed)
                first_call[method_name] = time.perf_counter() - start
                for x in (freeze_batches + report_batches)[:4]:  # ATM: varying counts make the shapes dynamic
                    compiled(x)
            graphs[method_name] = int(dynamo.utils.counters["stats"]["unique_graphs"])
            variants[f"{method_name}|compiled"] = (lambda: None, lambda m=compiled: m(timed))
        seconds = alternate_timings(variants, repeats) if variants else {}
        for variant, s in seconds.items():
            method_name, mode = variant.split("|")
            base = seconds[f"dense|{mode}"]
            ratio = gflops["dense"] / gflops[method_name]
            speed.append(
                dict(
                    model=name,
                    method=method_name,
                    mode=mode,
                    gflops=round(gflops[method_name], 4),
                    images_per_s=round(timed.shape[0] / s, 1),
                    speedup_vs_dense_same_mode=round(base / s, 3),
                    flops_ratio=round(ratio, 3),
                    speedup_over_flops_ratio=round(base / s / ratio, 3),
                    first_call_seconds=round(first_call[method_name], 1) if mode == "compiled" else None,
                    graphs=graphs.get(method_name) if mode == "compiled" else None,
                )
            )
            print(speed[-1], flush=True)
        if name != "DeiT-S shape" and not args.no_fidelity:  # random weights: agreement would say nothing
            rows, paired = agreement_rows(model, {"ATM": atm, "ATM frozen": frozen, "ToMe": tome}, report_batches)
            fidelity.append(dict(model=name, rows=rows, paired=paired))
            print(table(rows, list(rows[0])), "\n", paired, flush=True)
        onnx_ok = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
        if not args.no_onnx and not args.no_speed and onnx_ok and (args.smoke or name == "DeiT-S shape"):
            exported += onnx_rows(
                name, model, {"dense": None, "ATM frozen": frozen, "ToMe": tome}, timed, repeats, gflops
            )
            print(table(exported, list(exported[0])), flush=True)
    print(
        speed
        and table(
            speed,
            [
                "model",
                "method",
                "mode",
                "gflops",
                "images_per_s",
                "speedup_vs_dense_same_mode",
                "flops_ratio",
                "speedup_over_flops_ratio",
                "first_call_seconds",
                "graphs",
            ],
        )
    )
    ort = importlib.util.find_spec("onnxruntime")
    header = run_header(
        args,
        repeats=repeats,
        warmup=WARMUP,
        batch=64,
        dtype="float32",
        backend="inductor (torch.compile defaults)",
        paper_setting=PAPER_DEIT_S,
        atm_settings={"otherwise": PAPER_DEIT_S, **ATM_SETTINGS},
        freezing="mean count per block over the freezing images (atmerge.freeze, quantile=None)",
    )
    write_json(
        dict(
            **header,
            onnxruntime=__import__("onnxruntime").__version__ if ort else None,
            load_average_before=[round(v, 2) for v in load_before],
            load_average_after=[round(v, 2) for v in os.getloadavg()],
            frozen=frozen_settings,
            speed=speed,
            fidelity=fidelity,
            onnxruntime_speed=exported,
        ),
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
