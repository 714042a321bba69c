"""The paper's other backbones: GFLOPs of atmerge's LV-ViT, T2T-ViT_t and fine-tuned MAE
definitions against the published numbers and fvcore, one command:

    python bench/backbones.py [--out bench/results/backbones.json]
    python bench/backbones.py --markdown   # docs/results.md's table, from the JSON (runs nothing)

Random weights (FLOPs do not depend on them), 224 px, one image; fvcore traces the unpatched
forward with fused attention off (so that it sees the attention matmuls).  Published numbers:
the paper's Tables 2, A4, A5 (LV-ViT-M: 12.7, what fvcore counts on the official code).
Also the GFLOPs with the LV-ViT auxiliary head off (CLS only), and the merged GFLOPs of ToMe r = 8
with and without it, on 16 of the shared ImageNet photos.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import timm
import torch
from fvcore.nn import FlopCountAnalysis

import atmerge
from common import imagenet_batches, run_header, table, write_json

PUBLISHED = {
    "lvvit_t": 2.9,
    "lvvit_s": 6.6,
    "lvvit_m": 12.7,
    "t2t_vit_t_14": 6.1,
    "t2t_vit_t_19": 9.8,
    "t2t_vit_t_24": 15.0,
    "mae_vit_base_ft": 17.6,
}


def fvcore_gflops(model: torch.nn.Module) -> float:
    for block in model.blocks:
        block.attn.fused_attn = False
    logging.disable(logging.WARNING)
    analysis = FlopCountAnalysis(model, torch.randn(1, 3, 224, 224))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    total = analysis.total() / 1e9
    logging.disable(logging.NOTSET)
    return total


def markdown(report: dict) -> str:
    """docs/results.md's table from the JSON."""
    lines = [
        "| model | published | atmerge | fvcore | vs published | params (M) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| `{r['model']}` | {r['published']} | {r['atmerge']:.3f} | {r['fvcore']:.3f} | {r['vs_published']} | "
            f"{r['params_m']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/backbones.json")
    ap.add_argument("--markdown", action="store_true", help="only print docs/results.md's table from --out's JSON")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return 0
    torch.manual_seed(0)
    rows = []
    for name, published in PUBLISHED.items():
        model = timm.create_model(name).eval()
        ours, fv = atmerge.gflops(model), fvcore_gflops(model)
        row = dict(
            model=name,
            published=published,
            atmerge=round(ours, 3),
            fvcore=round(fv, 3),
            vs_published=f"{ours / published - 1:+.1%}",
            vs_fvcore=f"{ours / fv - 1:+.2e}",
            params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        )
        if name.startswith("lvvit"):
            images = torch.cat(imagenet_batches(model, 16, 16))
            for aux in (True, False):
                model.use_aux_head = aux
                key = "aux_head" if aux else "cls_only"
                row[f"dense_{key}"] = round(atmerge.gflops(model), 3)
                atmerge.patch(model, atmerge.ToMe(r=8))
                with torch.no_grad():
                    model(images)
                row[f"tome8_{key}"] = round(atmerge.last_stats(model).gflops, 3)
                atmerge.unpatch(model)
        rows.append(row)
        print(row, flush=True)
    print(table(rows, ["model", "published", "atmerge", "fvcore", "vs_published", "params_m"]))
    header = run_header(
        args,
        seed=0,
        image_size=224,
        weights="random init (timm.create_model, no pretrained)",
        lvvit_images=16,
        lvvit_merging="ToMe(r=8)",
        fvcore="fused attention off, 1 random image",
    )
    write_json(dict(**header, rows=rows), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
