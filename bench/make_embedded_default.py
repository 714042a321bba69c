"""Regenerate the embedded default that ships inside the package (atmerge/assets/):

* ``cifar10_vit_tiny_p4_fp16.safetensors``: the project's CIFAR-10 reference ViT
  (``<shared>/models/cifar10_vit_tiny_p4.safetensors``) stored in float16.  Its top-1 on the
  5,000 cifar10-test images is measured with the float32 and the float16 weights (run in float32,
  as atmerge loads them) and both are recorded in the file's metadata; the script stops if they
  differ by more than 0.1 point.
* ``cifar10-test-sample/<class>/NNNN.jpg``: files 0000-0099 of each class of
  ``<shared>/data/cifar10-test.tar.gz``, their bytes copied unchanged (1,000 images, under 2 MB).

Deterministic: the same shared files give byte-identical outputs.

    python bench/make_embedded_default.py            # needs ATMERGE_SHARED or ../shared
    python bench/make_embedded_default.py --check    # measure only, write nothing
"""

from __future__ import annotations

import argparse
import shutil
import tarfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from atmerge import checkpoints, data

ASSETS = Path(checkpoints.__file__).resolve().parent / "assets"
PER_CLASS = 100
MAX_BYTES = 2 * 1024 * 1024
MAX_TOP1_CHANGE = 0.001  # 0.1 point


@torch.no_grad()
def top1(state: dict[str, torch.Tensor], batch_size: int = 500) -> float:
    model = checkpoints.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10).eval()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    dataset = data.image_folder(data.cifar10_folder("test"), data.cifar10_transform())
    correct = total = 0
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        correct += (model(x).argmax(-1) == y).sum().item()
        total += y.numel()
    assert total == 5000, total
    return correct / total


def make_weights(check: bool) -> dict:
    source = data.shared_file("models/cifar10_vit_tiny_p4.safetensors")
    with safe_open(str(source), "pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}
    half = {k: v.to(torch.float16).contiguous() for k, v in state.items()}
    fp32, fp16 = top1(state), top1(half)
    print(
        f"cifar10-test top-1 (5000 images): float32 {100 * fp32:.2f}%, float16 weights {100 * fp16:.2f}% "
        f"(change {100 * (fp16 - fp32):+.2f} pt)"
    )
    if abs(fp16 - fp32) > MAX_TOP1_CHANGE:
        raise SystemExit("float16 changes top-1 by more than 0.1 point: not shipping it")
    info = {
        "source": "cifar10_vit_tiny_p4.safetensors (atmerge's CIFAR-10 reference ViT)",
        "dtype": "float16",
        "epochs": meta.get("epochs_done", ""),
        "cifar10_test_images": "5000",
        "cifar10_test_top1_float32": f"{fp32:.4f}",
        "cifar10_test_top1_float16": f"{fp16:.4f}",
    }
    if not check:
        ASSETS.mkdir(exist_ok=True)
        save_file(half, str(ASSETS / "cifar10_vit_tiny_p4_fp16.safetensors"), metadata=info)
    return info


def make_sample(check: bool) -> int:
    archive = data.shared_file("data/cifar10-test.tar.gz")
    dest = ASSETS / "cifar10-test-sample"
    wanted = {f"{i:04d}.jpg" for i in range(PER_CLASS)}
    files = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[2] in wanted:
                files[(parts[1], parts[2])] = tar.extractfile(member).read()
    size = sum(len(b) for b in files.values())
    print(f"sample: {len(files)} images, {size / 1024:.0f} KiB")
    if len(files) != 10 * PER_CLASS or size > MAX_BYTES:
        raise SystemExit(f"sample must be {10 * PER_CLASS} images under {MAX_BYTES} bytes")
    if not check:
        shutil.rmtree(dest, ignore_errors=True)
        for (cls, name), blob in sorted(files.items()):
            (dest / cls).mkdir(parents=True, exist_ok=True)
            (dest / cls / name).write_bytes(blob)
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="measure and report, write nothing")
    args = parser.parse_args()
    make_sample(args.check)
    print(make_weights(args.check))


if __name__ == "__main__":
    main()
