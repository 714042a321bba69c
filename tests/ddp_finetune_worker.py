"""Run by tests/test_finetune.py under ``torchrun --nproc_per_node 2``: one epoch of
data-parallel fine-tuning of a small ViT, each process's weights written out, then ``atmerge
eval`` on the fine-tuned weights with each process a shard of the images.

    torchrun --standalone --nproc_per_node 2 tests/ddp_finetune_worker.py OUT_FOLDER
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import atmerge
from atmerge.cli import main
from atmerge.finetune import FinetuneConfig, finetune
from conftest import blocky_images, small_vit

METHOD = atmerge.ToMe(r=4)  # each image merges on its own: no dependence on the batch
SMALL = dict(img_size=32, patch_size=4, embed_dim=48, depth=6, num_heads=3, num_classes=10)  # = small_vit()


def dataset() -> torch.utils.data.TensorDataset:
    """24 seeded images with labels: three steps of the global batch of 8."""
    return torch.utils.data.TensorDataset(blocky_images(24, seed=3), torch.arange(24) % 10)


def config(out: Path) -> FinetuneConfig:
    """No dropout, Mixup or augmentation: nothing random but the (seeded) shuffling.  SGD (momentum
    0.9), not AdamW: AdamW divides by the root of second moments, which turns the float noise of
    weights whose gradient is zero analytically (the key bias) into full steps of lr."""
    return FinetuneConfig(
        epochs=1,
        batch_size=8,
        opt="sgd",
        lr=0.1,
        min_lr=0.01,
        mixup=0,
        cutmix=0,
        val_batch_size=8,
        progress=False,
        out=str(out),
    )


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return small_vit()


def eval_args(checkpoint: Path, images: Path, out: Path) -> list[str]:
    return [
        "eval",
        "--model",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        json.dumps(SMALL),
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(images),
        "--batch-size",
        "4",
        "--no-progress",
        "--out",
        str(out),
    ]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    model = fresh_model()
    finetune(model, METHOD, dataset(), dataset(), config(out / "ddp"))
    save_file(model.state_dict(), str(out / f"rank{dist.get_rank()}.safetensors"))
    sys.exit(main(eval_args(out / "ddp" / "last.safetensors", out / "images", out / "eval_ddp")))
