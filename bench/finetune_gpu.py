"""One epoch of DeiT-S-shape fine-tuning on a GPU, merged vs unmerged — needs
a CUDA device, never run in tests:

    python bench/finetune_gpu.py [--images 25600] [--out bench/results/finetune_gpu.json]
    python bench/finetune_gpu.py --markdown      # the README table from the JSON
    python bench/finetune_gpu.py --smoke         # CPU, a few images: checks that the script runs

The run goes through ``atmerge.finetune`` with the library's default recipe (AdamW, label
smoothing, Mixup/CutMix), batch 256, bf16 autocast, for two epochs of ``--images`` images each; the
second epoch is reported (the first holds CUDA warm-up).  Model: ``deit_small_patch16_224`` with
random weights (speed needs no trained ones), 1,000 classes.  Images: the 1,000 shared ImageNet
photos, each passed once through the training transform (random resized crop, RandAugment, random
erasing) when the script starts and then kept in memory and repeated to the epoch's length, so
that the timing is the model's training step and not JPEG decoding.  Merged: ATM with the paper's
α 0.99 and β 0.04 and θ_min bisected so that the evaluation forward of the photos costs the
paper's fine-tuned DeiT-S budget, 2.6 GFLOPs (Table 4); random weights merge differently from
trained ones, so the threshold is set by the budget, not copied.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import timm
import torch

import atmerge
from atmerge import data
from atmerge.finetune import FinetuneConfig, finetune
from atmerge.recipe import train_transform
from atmerge.resume import seed_everything
from common import imagenet_photos, run_header, write_json

TARGET_GFLOPS = 2.6  # Table 4: ATM fine-tuned DeiT-S
IMAGENET_TRAIN_IMAGES = 1_281_167


class Repeated(torch.utils.data.Dataset):
    """``images`` [M, 3, H, W] with ``labels`` [M], repeated to ``length`` items."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, length: int):
        self.images, self.labels, self.length = images, labels, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        j = i % len(self.labels)
        return self.images[j], self.labels[j]


def photos(model, config: FinetuneConfig, count: int, training: bool):
    """The shared ImageNet photos as tensors (training transform drawn once, or evaluation
    transform) and their ImageNet-1K class indices."""
    seed_everything(0)  # the augmentation draws from torch, Python's and NumPy's generators
    return imagenet_photos(train_transform(model, config) if training else data.model_transform(model), count)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=25600, help="images per epoch (photos repeated)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--out", default="bench/results/finetune_gpu.json")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, 32 images, batch 8: checks that the script runs")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return 0
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.images, args.batch, args.workers = 32, 8, 0
    elif not torch.cuda.is_available():
        print("bench/finetune_gpu.py needs a CUDA device; none is available here", file=sys.stderr)
        return 2
    count = 16 if args.smoke else 1000
    base_config = FinetuneConfig(
        epochs=2,
        batch_size=args.batch,
        amp="bf16",
        device=device,
        workers=args.workers,
        val_limit=count,
        val_batch_size=min(256, count),
        progress=False,
    )
    torch.manual_seed(0)
    start = timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=1000)
    train_x, train_y = photos(start, base_config, count, training=True)
    val_x, val_y = photos(start, base_config, count, training=False)
    train = Repeated(train_x, train_y, args.images)
    val = torch.utils.data.TensorDataset(val_x, val_y)

    dense = atmerge.gflops(start, (3, 224, 224))
    probe = start.to(device).eval()
    batches = [val_x[:256].to(device)]
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        match = atmerge.match_gflops(
            probe,
            lambda t: atmerge.ATM(alpha=0.99, beta=0.04, theta_min=0.5 + 0.5 * t),
            TARGET_GFLOPS,
            batches,
            steps=12,
        )
    atm = match.method
    atmerge.unpatch(probe)
    state = {k: v.clone() for k, v in start.state_dict().items()}

    rows = []
    for name, method in (("unmerged", None), ("ATM", atm)):
        model = timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=1000)
        model.load_state_dict(state)
        config = FinetuneConfig(**{**base_config.__dict__, "out": str(data.cache_dir() / "finetune_gpu" / name)})
        began = time.perf_counter()
        result = finetune(model, method, train, val, config)
        last = result.epochs[-1]
        rows.append(
            dict(
                method=name,
                setting=None if method is None else dict(alpha=0.99, beta=0.04, theta_min=atm.theta_min),
                train_gflops=last["train_gflops"],
                val_gflops=last["val_gflops"],
                epoch_images=last["train_images"],
                epoch_train_seconds=last["train_seconds"],
                images_per_s=last["train_images_per_s"],
                imagenet_epoch_minutes=IMAGENET_TRAIN_IMAGES / last["train_images_per_s"] / 60,
                wall_seconds=time.perf_counter() - began,
            )
        )
        print(rows[-1], flush=True)
    for row in rows:
        row["speedup"] = row["images_per_s"] / rows[0]["images_per_s"]
        row["flops_ratio"] = dense / row["train_gflops"] if row["method"] != "unmerged" else 1.0
    header = run_header(
        args,
        device=device,
        images_per_epoch=args.images,
        batch=args.batch,
        workers=args.workers,
        photos=count,
        epochs=base_config.epochs,
        timed="the last (second) of the two epochs",
        dtype="bf16 autocast (amp)",
        weights="random init, seed 0",
        augmentation_seed=0,
        target_gflops=TARGET_GFLOPS,
        bisected_theta_min=atm.theta_min,
        atm_bisection_steps=12,
        bisected_on=f"{len(batches[0])} evaluation-transform photos, bf16 autocast",
        matched_eval_gflops=match.gflops,
        finetune_config=base_config.__dict__,
    )
    write_json(
        dict(
            **header,
            device_name=torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run)",
            batch=args.batch,
            dense_gflops=dense,
            target_gflops=TARGET_GFLOPS,
            matched_eval_gflops=match.gflops,
            rows=rows,
        ),
        args.out,
    )
    return 0


def markdown(report: dict) -> str:
    device = report["device_name"] if "device_name" in report else report["device"]  # older files: "device"
    lines = [
        f"{device}, DeiT-S shape, batch {report['batch']}, bf16, second of two epochs (`{report['command']}`)",
        "",
        "| model | train GFLOPs / image | eval GFLOPs | images/s | speed-up | FLOPs ratio | ImageNet epoch (1.28 M images) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['method']} | {r['train_gflops']:.2f} | {r['val_gflops']:.2f} | {r['images_per_s']:.0f} | {r['speedup']:.2f}× | "
            f"{r['flops_ratio']:.2f}× | {r['imagenet_epoch_minutes']:.1f} min |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
