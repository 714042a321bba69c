"""All methods at matched GFLOPs (issue 3), one command:

    python bench/baselines.py [--out bench/results/baselines.json] [--quick]

For the CIFAR-10 reference ViT (../shared, cifar10-test) and DINOv2-S (../shared weights, the
shared ImageNet photos), every method's knob is bisected (atmerge.match_gflops) on a calibration
subset to about 85%, 75% and 65% of the unmerged model's GFLOPs without exceeding them; then the
chosen setting is evaluated: top-1 where labels exist, else the cosine of the final CLS feature to
the unmerged model's, mean GFLOPs on the evaluation images, and CPU images/s.
"""

from __future__ import annotations

import argparse
import platform
import sys

import timm
import torch

import atmerge
from atmerge import data, zoo
from common import TARGETS, factories, imagenet_batches, loader_batches, matched_rows, table, warm_up, write_json

def run_model(name, model, calib, evaluation, steps, methods) -> dict:
    atmerge.unpatch(model)
    warm_up(model, evaluation)
    base, ref = atmerge.evaluate(model, evaluation, keep_outputs=True)
    labelled = base.top1 is not None
    calib_images = [b[0] if isinstance(b, (tuple, list)) else b for b in calib]
    rows = [dict(model=name, target="100%", method="baseline", setting="", gflops=base.gflops,
                 gflops_share=1.0, top1=base.top1, cls_cosine=None if labelled else 1.0,
                 images_per_s=base.images_per_second)]
    rows += matched_rows(name, model, methods, base, calib_images, evaluation, TARGETS, steps=steps,
                         reference=None if labelled else ref, timed=True)
    return dict(baseline_gflops=base.gflops, rows=rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/baselines.json")
    ap.add_argument("--quick", action="store_true", help="small subsets and few steps, for a smoke run")
    ap.add_argument("--steps", type=int, default=7, help="bisection steps per method and budget")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    q = args.quick
    steps = 3 if q else args.steps
    report = dict(command="python bench/baselines.py" + (" --quick" if q else ""), torch=torch.__version__,
                  timm=timm.__version__, cpu=platform.processor() or platform.machine(),
                  threads=torch.get_num_threads(), steps=steps)

    print("== CIFAR-10 reference ViT (cifar10-test) ==", flush=True)
    model = zoo.cifar10_reference_vit()
    ds = data.image_folder(data.cifar10_folder("test"), data.cifar10_transform())
    calib = loader_batches(data.subset(ds, 64 if q else 500, seed=1), 250)
    evaluation = loader_batches(data.subset(ds, 128 if q else None), 64)
    report["cifar10_reference"] = run_model("cifar10-vit", model, calib, evaluation, steps, factories(12, 64))
    report["cifar10_reference"]["images"] = sum(len(b[1]) for b in evaluation)

    print("== DINOv2-S (shared weights, ImageNet photos; fidelity of the CLS feature) ==", flush=True)
    model = zoo.dinov2_small()
    batches = imagenet_batches(model, 8 if q else 32, 32)
    report["dinov2_s"] = run_model("dinov2-s", model, batches, batches, steps, factories(12, 256))
    report["dinov2_s"]["images"] = sum(len(b) for b in batches)

    cols = ["model", "target", "method", "gflops", "gflops_share", "top1", "cls_cosine", "images_per_s", "setting"]
    print()
    print(table(report["cifar10_reference"]["rows"] + report["dinov2_s"]["rows"], cols))
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
