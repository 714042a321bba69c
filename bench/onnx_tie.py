"""Why ToMe's onnxruntime output differs from eager PyTorch on one image (frozen.py, DeiT-S shape),
one command:

    python bench/onnx_tie.py [--out bench/results/onnx_tie.json]

DeiT-S (random init, seed 0) on the 64 shared ImageNet photos that bench/frozen.py times, dense and
ToMe(r = 17) (frozen.py's bisected r). For each: the largest |onnxruntime − eager| over the logits
and how many images differ by more than 1e-4, beside two perturbations of eager itself: the input
plus 1e-6 noise, and the model run in float64. If the export were wrong, eager would be stable
under both; a merge that flips on a near-tie of the matching scores moves eager by the same amount.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import timm
import torch

import atmerge
from common import imagenet_batches, run_header, table, write_json


def gaps(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """Largest logit differences [B, K] of onnxruntime, a 1e-6 input perturbation and float64
    against eager float32, and the images (of B) that onnxruntime moves by more than 1e-4."""
    import onnxruntime

    with torch.no_grad():
        eager = model(x)
        noisy = model(x + 1e-6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))
        double = copy.deepcopy(model).double()(x.double()).float()
    with tempfile.TemporaryDirectory() as folder:
        path = atmerge.export_onnx(model, Path(folder) / "model.onnx", x)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        exported = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    per_image = (exported - eager).abs().amax(-1)
    return dict(
        onnxruntime_vs_eager=float(per_image.max()),
        images_over_1e_4=int((per_image > 1e-4).sum()),
        eager_vs_input_plus_1e_6=float((noisy - eager).abs().max()),
        eager_float32_vs_float64=float((double - eager).abs().max()),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/onnx_tie.json")
    ap.add_argument("--markdown", action="store_true", help="only print docs/results.md's table from --out's JSON")
    args = ap.parse_args(argv)
    cols = [
        "method",
        "onnxruntime_vs_eager",
        "images_over_1e_4",
        "eager_vs_input_plus_1e_6",
        "eager_float32_vs_float64",
    ]
    if args.markdown:
        import json

        rows = json.loads(Path(args.out).read_text())["rows"]
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
        return 0
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224").eval()
    x = imagenet_batches(model, 128, 64)[1]
    rows = []
    for name, method in (("dense", None), ("ToMe(r=17)", atmerge.ToMe(r=17))):
        m = copy.deepcopy(model)
        if method is not None:
            atmerge.patch(m, method)
        rows.append(dict(method=name, **gaps(m, x)))
        print(rows[-1], flush=True)
    print(table(rows, cols))
    write_json(dict(**run_header(args, seed=0, batch=64, images="shared ImageNet photos 64-127"), rows=rows), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
