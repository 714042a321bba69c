"""Fine-tuning with merging in the loop (the paper's Table 4 / A3), on the CIFAR-10
reference ViT, one command on the CPU machine (about an hour at the defaults):

    python bench/finetune.py [--epochs 4] [--train-images 12500] [--out bench/results/finetune.json]
    python bench/finetune.py --markdown     # the README's table, from the JSON written above
    python bench/finetune.py --quick        # a smoke run: a few dozen images, one epoch, seconds

Rows (top-1 on all 5,000 cifar10-test images, GFLOPs per image at batch 64):
  - unpatched, ATM and ToMe training-free;
  - ATM fine-tuned with its merges in the loop, at the paper's DeiT-S setting (α 0.99, β 0.04,
    θ_min 0.88: about 60% of this model's GFLOPs removed);
  - ToMe fine-tuned, r bisected to ATM's mean GFLOPs on 512 cifar10-train images;
  - the control: the unpatched model fine-tuned with the same recipe and epochs (the reference
    model is under-trained, so more training alone may raise its accuracy).
Recipe: the library's defaults (the paper's cosine 2e-5 → 3e-6 without warm-up, DeiT's AdamW,
label smoothing, Mixup/CutMix, RandAugment, random erasing), except what the CPU budget sets:
epochs, a seeded subset of cifar10-train and batch 128.  Validation during training runs on a
seeded 1,000 of cifar10-test; the reported top-1 is the last epoch's weights on all 5,000 (no
choice of epoch by test accuracy).  Run files go to $ATMERGE_CACHE/finetune_bench.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

import atmerge
from atmerge import checkpoints, data
from atmerge.budget import mean_gflops
from atmerge.finetune import FinetuneConfig, finetune
from atmerge.recipe import train_transform
from atmerge.methods.registry import knob_factory, method_settings
from atmerge.models.patching import merge_state
from common import describe, loader_batches, run_header, table, write_json

PAPER_DEIT_S = dict(alpha=0.99, beta=0.04, theta_min=0.88)  # Table A2, DeiT-S row at 3.26 GFLOPs
BATCH = 64  # evaluation batch (batch-adaptive merging depends on it)


def report_row(name: str, training: str, model: torch.nn.Module, test, base: dict | None = None) -> dict:
    """Top-1 and GFLOPs of ``model`` (patched or not) on the test images."""
    result, _ = atmerge.evaluate(model, loader_batches(test, BATCH))
    setting = describe(merge_state(model).method) if atmerge.is_patched(model) else ""
    row = {
        "model": name,
        "training": training,
        "top1": result.top1,
        "gflops": result.gflops,
        "images": result.images,
        "method": setting,
    }
    if base is not None:
        row["top1_change"] = result.top1 - base["top1"]
        row["gflops_saved"] = 1 - result.gflops / base["gflops"]
    return row


def fine_tune_row(
    name: str, start: torch.nn.Module, method, train, val, test, config: FinetuneConfig, base: dict
) -> tuple[dict, dict]:
    """Fine-tune a copy of ``start`` with ``method`` in the loop; the last weights on the test images."""
    model = copy.deepcopy(start)
    began = time.perf_counter()
    result = finetune(model, method, train, val, config)
    wall = time.perf_counter() - began
    row = report_row(name, f"fine-tuned {config.epochs} ep", model, test, base)
    epochs = result.epochs
    row.update(
        epochs=config.epochs,
        epoch_seconds=sum(e["epoch_seconds"] for e in epochs) / len(epochs),
        train_images_per_s=sum(e["train_images_per_s"] for e in epochs) / len(epochs),
        train_seconds=result.train_seconds,
        wall_seconds=wall,
        train_gflops=epochs[-1]["train_gflops"],
    )
    return row, result.to_dict()


def markdown(report: dict) -> str:
    """The README's table from the JSON report."""
    lines = [
        "| model | training | top-1 (change) | GFLOPs (saved) | s / epoch | train images/s | training time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        timing = (
            f"{r['epoch_seconds']:.0f} | {r['train_images_per_s']:.0f} | {r['train_seconds'] / 60:.1f} min"
            if "epochs" in r
            else "— | — | —"
        )
        lines.append(
            f"| {r['model']} | {r['training']} | {100 * r['top1']:.2f}% ({100 * r['top1_change']:+.2f}) | "
            f"{r['gflops']:.3f} ({r['gflops_saved']:.0%}) | {timing} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out",
        default=None,
        help="JSON report (default bench/results/finetune.json, finetune_quick.json with --quick)",
    )
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train-images", type=int, default=12500, help="seeded subset of cifar10-train")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--val-images", type=int, default=1000, help="seeded subset of cifar10-test for per-epoch logs")
    ap.add_argument("--work", default=None, help="run folders (default $ATMERGE_CACHE/finetune_bench)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 images, one epoch")
    ap.add_argument("--markdown", action="store_true", help="only print the README's table from --out's JSON")
    args = ap.parse_args(argv)
    q = args.quick
    out = Path(args.out or f"bench/results/finetune{'_quick' if q else ''}.json")
    if args.markdown:
        print(markdown(json.loads(out.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(args.work or data.cache_dir() / "finetune_bench")
    epochs, train_images, batch = (1, 64, 16) if q else (args.epochs, args.train_images, args.batch_size)
    config = FinetuneConfig(
        epochs=epochs, batch_size=batch, train_limit=train_images, val_batch_size=BATCH, progress=not q
    )
    start = checkpoints.cifar10_reference_vit()
    normalization = (data.CIFAR10_MEAN, data.CIFAR10_STD)
    test_all = data.image_folder(data.cifar10_folder("test"), data.cifar10_transform())
    test = data.subset(test_all, 64 if q else None)
    val = data.subset(test_all, 32 if q else args.val_images, seed=1)
    train = data.image_folder(data.cifar10_folder("train"), train_transform(start, config, normalization))
    calibration = data.subset(
        data.image_folder(data.cifar10_folder("train"), data.cifar10_transform()), 64 if q else 512, seed=2
    )
    calib_images = [x for x, _ in loader_batches(calibration, BATCH)]

    print("== training-free ==", flush=True)
    atm = atmerge.ATM(**PAPER_DEIT_S)
    target = mean_gflops(copy.deepcopy(start), atm, calib_images)
    tome = atmerge.match_gflops(
        copy.deepcopy(start),
        knob_factory("tome", len(start.blocks), start.patch_embed.num_patches),
        target,
        calib_images,
        steps=4 if q else 10,
    ).method
    report = run_header(
        args,
        epochs=epochs,
        train_images=train_images,
        batch_size=batch,
        eval_batch_size=BATCH,
        seed=0,
        train_subset_seed=config.seed,
        val_images=32 if q else args.val_images,
        val_subset_seed=1,
        test_images="64" if q else "all of cifar10-test",
        calibration_images=len(calibration),
        calibration_seed=2,
        atm=method_settings(atm),
        tome_bisected=method_settings(tome),
        tome_bisection_steps=4 if q else 10,
        gflops_target=target,
        dtype="float32",
        amp=config.amp,
        timed="epoch_seconds and train_images_per_s: mean over every epoch; train_seconds: all epochs",
        reported_weights="the last epoch's",
        work=str(work),
    )
    base = report_row("unpatched", "none", start, test)
    base.update(top1_change=0.0, gflops_saved=0.0)
    rows = [base]
    for name, method in (("ATM", atm), ("ToMe", tome)):
        rows.append(report_row(name, "none", atmerge.patch(copy.deepcopy(start), method), test, base))
    print(table(rows, ["model", "training", "top1", "gflops", "method"]), flush=True)

    runs = {}
    for name, method in (("ATM", atm), ("ToMe", tome), ("unpatched", None)):
        print(f"== fine-tuning {name}, {epochs} epochs of {train_images} images ==", flush=True)
        run_config = dataclasses.replace(config, out=str(work / name.lower()))
        row, runs[name] = fine_tune_row(name, start, method, train, val, test, run_config, base)
        rows.append(row)
        print(table([row], ["model", "training", "top1", "gflops", "epoch_seconds", "train_images_per_s"]), flush=True)

    report.update(
        config=dataclasses.asdict(config),
        atm=method_settings(atm),
        tome=method_settings(tome),
        gflops_target=target,
        test_images=len(test),
        val_images=len(val),
        train_images=train_images,
        rows=rows,
        runs=runs,
    )
    cols = [
        "model",
        "training",
        "top1",
        "top1_change",
        "gflops",
        "gflops_saved",
        "epoch_seconds",
        "train_images_per_s",
        "train_seconds",
    ]
    print(table(rows, cols))
    print(markdown(report))
    write_json(report, str(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
