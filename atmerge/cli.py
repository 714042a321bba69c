"""`atmerge` command line: sub-commands that call the library's experiment functions.

    atmerge eval                      # CIFAR-10 reference ViT + ATM vs unpatched, offline
    atmerge eval --model deit_small_patch16_224 --pretrained --data /imagenet/val --method atm
    atmerge search --budget 0.25      # Optuna over alpha, beta, theta_min
    atmerge analyze info-loss | merge-profile | split-layer | batch-size | merging-error
    atmerge visualize --images a.jpg b.jpg
    atmerge probe                     # linear head for the shared DINOv2-S on CIFAR-10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from atmerge.methods.registry import build_method, method_names

METHOD_FLAGS = {
    "alpha": float,
    "beta": float,
    "theta_min": float,
    "split_layer": int,
    "similarity": str,
    "theta": float,
    "r": int,
    "schedule": str,
    "keep_rate": float,
    "locations": int,
    "tau_sim": float,
    "tau_info": float,
    "tau_size": float,
    "importance_share": float,
}


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="timm model name, or a preset: cifar10-vit (default), dinov2-probe")
    g.add_argument("--checkpoint", default=None, help="safetensors weights for --model")
    g.add_argument("--model-kwargs", default=None, help='JSON kwargs for timm.create_model, e.g. \'{"img_size": 32}\'')
    g.add_argument("--pretrained", action="store_true", help="let timm download pretrained weights")
    g.add_argument("--probe", default=None, help="probe head file for --model dinov2-probe")
    g.add_argument("--no-prop-attn", action="store_true", help="switch proportional attention off (MAE)")


def add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="ImageFolder root (class folders); default: the preset's data")
    g.add_argument("--limit", type=int, default=None, help="use N images (seeded random subset)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--device", default="cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    g.add_argument("--no-progress", action="store_true")


def add_method_options(p: argparse.ArgumentParser, default: str = "atm") -> None:
    g = p.add_argument_group("method (settings left out keep the method's defaults)")
    g.add_argument("--method", default=default, choices=method_names())
    for name, kind in METHOD_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        if name == "locations":
            g.add_argument(flag, type=int, nargs="+", default=None)
        else:
            g.add_argument(flag, type=kind, default=None)


def method_from_args(args) -> object:
    settings = {name: getattr(args, name) for name in METHOD_FLAGS}
    if settings.get("locations") is not None:
        settings["locations"] = tuple(settings["locations"])
    return build_method(args.method, **settings)


def _setup_and_batches(args, *, limit=None):
    from atmerge.experiments.setup import load_dataset, load_setup, loader

    torch.manual_seed(args.seed)
    setup = load_setup(args.model, args.checkpoint, args.model_kwargs, args.pretrained, getattr(args, "probe", None))
    dataset = load_dataset(setup, args.data, args.limit if limit is None else limit, args.seed)
    return setup, loader(dataset, args.batch_size, args.workers)


def cmd_eval(args) -> int:
    from atmerge.experiments.eval import eval_rows, run_eval
    from atmerge.experiments.io import format_table, write_csv, write_json

    method = method_from_args(args)
    setup, batches = _setup_and_batches(args)
    result = run_eval(
        setup.model, method, batches, device=args.device, progress=not args.no_progress, prop_attn=not args.no_prop_attn
    )
    result["setup"] = setup.description
    result["data"] = str(args.data or setup.default_data)
    rows = eval_rows(result)
    print(format_table(rows, ["run", "top1", "top5", "gflops", "params_m", "images_per_s", "output_cosine"]))
    d = result["difference"]
    top1 = "n/a" if d["top1"] is None else f"{100 * d['top1']:+.2f} pt"
    print(f"difference: top-1 {top1}, GFLOPs x{d['gflops_ratio']:.3f}, speed x{d['speedup']:.2f}")
    print("tokens per block:", rows[1]["tokens_per_block"])
    out = Path(args.out)
    write_json(result, out / "eval.json")
    write_csv(rows, out / "eval.csv")
    print(f"wrote {out / 'eval.json'} and {out / 'eval.csv'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atmerge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="a method against the unpatched model on the same images")
    add_model_options(p)
    add_data_options(p)
    add_method_options(p)
    p.add_argument("--out", default="results/eval", help="folder for eval.json and eval.csv")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"atmerge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
