"""GPU throughput of merged DeiTs, eager and compiled — needs a CUDA device, never run in tests:

    python bench/gpu.py --compile [--models deit-s,deit-b] [--batch 256] [--dtypes bf16]
    python bench/gpu.py --compile reduce-overhead --models deit-t --batch 64 --append
    python bench/gpu.py --report bench/results/gpu_compiled.json   # the table and the goals again
    python bench/gpu.py --smoke          # the whole pipeline on the CPU in seconds (tiny ViT)
    bash bench/gpu_all.sh                # every configuration in priority order, one device call

DeiT-T, DeiT-S and DeiT-B shapes at 224 px (random weights, seed 0: speed does not need trained
ones), fed 64 ImageNet photos tiled to the batch (``--photos``: the shared samples, else
``build/gpu-photos`` — make it with ``--copy-photos build/gpu-photos`` and carry it to the
device —, else random images, said so in the JSON).  The models, in one alternating run per
(model, batch, dtype):

- dense: the unpatched model;
- ATM: the paper's DeiT-S setting (α 0.99, β 0.04, θ_min 0.88), batch-adaptive (one count read
  back to the host per block);
- ATM frozen: that ATM frozen by ``atmerge.freeze`` to its mean count per block on 128 other
  photos (calibration; fixed shapes, no host sync, one graph) — ATM's paper setting's GFLOPs;
- ToMe: constant r bisected to ATM's GFLOPs on the timed batch;
- ATM per-image: ``batch_adaptive=False``, θ_min bisected to the same GFLOPs.

Each eager; with ``--compile [MODE]`` also ``torch.compile(model, mode=MODE)`` (inductor; MODE
default, reduce-overhead = CUDA graphs, max-autotune) for the dense model and the methods of
``--compiled-methods`` (ToMe and frozen ATM unless told) — every compiled model against the dense
model compiled the same way, never against an eager one.  Autocast to ``--dtypes`` (bf16, fp16).
Timing: CUDA-synchronised, after warm-up, all variants timed alternately (dense, ToMe, ..., dense
compiled, ...), median of ``--repeats`` each; speed-up = dense time / merged time of the same mode.

Goals (the speed goals for GPU users), printed met or not for every row: ToMe and frozen ATM,
compiled, speed-up ≥ 0.8 × their FLOPs ratio on DeiT-S and DeiT-B and ≥ 1.3× on DeiT-T; per-image
ATM's time within 15% of batch-mean ATM's.  The JSON (``--out``; ``--append`` adds this run to
it) holds one record per run with its header (device, driver, CUDA, torch: ``run_header``), the
rows written after every configuration (a run stopped by a timeout keeps what it finished); a
Markdown table with the goals is written beside it (``.md``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch._dynamo as dynamo

import atmerge
from atmerge import data
from atmerge.methods.registry import knob_factory
from common import alternate_timings, run_header

SHAPES = {
    "deit-t": "deit_tiny_patch16_224",
    "deit-s": "deit_small_patch16_224",
    "deit-b": "deit_base_patch16_224",
}
SMOKE_MODEL = "tiny random ViT"
PAPER_DEIT_S = dict(alpha=0.99, beta=0.04, theta_min=0.88)  # Table A2, DeiT-S row
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("tome", "frozen", "atm", "per-image")  # --methods names
LABELS = {"tome": "ToMe", "frozen": "ATM frozen", "atm": "ATM", "per-image": "ATM per-image"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
WARMUP = 3  # alternating rounds before timing
TIMED_PHOTOS, CALIBRATION_PHOTOS = 64, 128
GOAL_FLOPS_SHARE = 0.8  # DeiT-S, DeiT-B: speed-up >= 0.8 x FLOPs ratio
GOAL_TINY = 1.3  # DeiT-T: speed-up >= 1.3x
GOAL_PER_IMAGE = 1.15  # per-image ATM's time <= 1.15 x batch-mean ATM's
DEFAULT_PHOTOS = Path("build/gpu-photos")


# ---------------------------------------------------------------- images


def photo_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))


def photos_folder(choice: str | None) -> Path | None:
    """--photos, else the shared ImageNet samples, else build/gpu-photos, else None (random)."""
    if choice:
        return Path(choice)
    if data.has_shared("data/imagenet-samples.tar"):
        return data.imagenet_samples_folder()
    return DEFAULT_PHOTOS if DEFAULT_PHOTOS.is_dir() and photo_files(DEFAULT_PHOTOS) else None


def copy_photos(dest: str) -> int:
    """The first 192 shared ImageNet photos into ``dest`` (6 MB), to carry to a device machine."""
    files = photo_files(data.imagenet_samples_folder())[: TIMED_PHOTOS + CALIBRATION_PHOTOS]
    Path(dest).mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, Path(dest) / f.name)
    print(f"copied {len(files)} photos to {dest}; carry it: run(carry=['{dest}'], ...)")
    return 0


def images(model, folder: Path | None, smoke: bool) -> tuple[torch.Tensor, list[torch.Tensor], str]:
    """(the 64 timed images, calibration batches of other images, where they came from)."""
    if smoke:
        g = torch.Generator().manual_seed(0)  # blocky images: many equal patches, so that tokens merge
        x = torch.randn(12, 3, 4, 4, generator=g)
        x = torch.nn.functional.interpolate(x, size=model.patch_embed.img_size, mode="nearest")
        return x[:4], list(x[4:].split(4)), "random blocky images (smoke)"
    if folder is None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(TIMED_PHOTOS + CALIBRATION_PHOTOS, 3, 224, 224, generator=g)
        source = "random normal images (no photos found: ATM's counts are not those of photos)"
        print(f"WARNING: {source}", file=sys.stderr)
    else:
        transform = data.model_transform(model)
        files = photo_files(folder)[: TIMED_PHOTOS + CALIBRATION_PHOTOS]
        if len(files) < 2:
            raise SystemExit(f"{folder} holds {len(files)} photos; need at least 2")
        x = torch.stack([transform(data.load_image(f)) for f in files])
        source = f"{len(files)} photos of {folder}"
    timed = min(TIMED_PHOTOS, max(1, x.shape[0] // 3))
    return x[:timed], list(x[timed:].split(64)), source


def tiled(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` repeated to ``size`` images (the tiles are the same images: ATM's batch mean is
    the same at every batch size)."""
    return x.repeat((size + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:size]


def build_model(name: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == SMOKE_MODEL:
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=10
        )
    else:
        model = timm.create_model(name, pretrained=False)
    return model.eval().to(device)


# ---------------------------------------------------------------- settings


def settings(model, x, calibration, wanted, steps: int) -> tuple[dict, dict, dict]:
    """The methods (label → method; 'dense' → None), their GFLOPs per image on ``x`` and what
    was chosen (bisected r and θ_min, frozen counts), all in bf16 autocast."""
    device = x.device
    depth, patches = len(model.blocks), model.patch_embed.num_patches
    atm = atmerge.ATM(**PAPER_DEIT_S)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        atmerge.patch(model, atm)
        model(x)
        target = atmerge.last_stats(model).gflops
        methods: dict = {"dense": None}
        chosen: dict = {"atm_gflops_on_timed_images": target}
        if "tome" in wanted:
            methods["ToMe"] = atmerge.match_gflops(
                model, knob_factory("tome", depth, patches), target, [x], steps=steps
            ).method
            chosen["ToMe"] = repr(methods["ToMe"])
        if "frozen" in wanted:
            atmerge.patch(model, atm)
            methods["ATM frozen"] = atmerge.freeze(model, [b.to(device) for b in calibration])
            chosen["ATM frozen"] = repr(methods["ATM frozen"])
            chosen["calibration_images"] = sum(b.shape[0] for b in calibration)
        if "atm" in wanted:
            methods["ATM"] = atm
        if "per-image" in wanted:
            methods["ATM per-image"] = atmerge.match_gflops(
                model,
                lambda t: atmerge.ATM(**{**PAPER_DEIT_S, "theta_min": 0.5 + 0.5 * t}, batch_adaptive=False),
                target,
                [x],
                steps=steps,
            ).method
            chosen["ATM per-image theta_min"] = methods["ATM per-image"].theta_min
        gflops = {"dense": atmerge.gflops(atmerge.unpatch(model), tuple(x.shape[1:]))}
        for name, method in methods.items():
            if method is not None:
                atmerge.patch(model, method)
                model(x)
                gflops[name] = atmerge.last_stats(model).gflops
        atmerge.unpatch(model)
    return methods, gflops, chosen


# ---------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compile_variant(model, mode: str, x: torch.Tensor, dtype) -> tuple[object, float, int, int]:
    """``torch.compile(model, mode)`` called three times on ``x`` (compile, CUDA-graph warm-up
    and recording): (compiled, first-call seconds, graphs, graph breaks)."""
    dynamo.utils.counters.clear()
    compiled = torch.compile(model, mode=None if mode == "default" else mode)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype):
        start = time.perf_counter()
        step(compiled, x, mode)
        sync(x.device)
        first = time.perf_counter() - start
        for _ in range(2):
            step(compiled, x, mode)
        sync(x.device)
    graphs = int(dynamo.utils.counters["stats"]["unique_graphs"])
    breaks = int(sum(dynamo.utils.counters["graph_break"].values()))
    return compiled, first, graphs, breaks


def step(model, x, mode: str | None):
    if mode in ("reduce-overhead", "max-autotune"):  # the modes that run CUDA graphs
        torch.compiler.cudagraph_mark_step_begin()  # each call a new step of the CUDA-graph trees
    return model(x)


def run_config(name, eager, methods, gflops, x, dtype_name, args, compiled_labels) -> list[dict]:
    """One alternating run of every variant for one (model, batch, dtype): the rows."""
    dtype, device = DTYPES[dtype_name], x.device
    variants, first_call, graphs, breaks = {}, {}, {}, {}
    for label in methods:
        variants[f"{label}|eager"] = (lambda: None, lambda m=eager[label]: m(x))
    if args.compile:
        mode = args.compile
        dynamo.reset()
        for label in methods:
            if label != "dense" and label not in compiled_labels:
                continue
            compiled, first_call[label], graphs[label], breaks[label] = compile_variant(eager[label], mode, x, dtype)
            print(
                f"   compiled {label} ({mode}): first call {first_call[label]:.1f} s, "
                f"{graphs[label]} graph(s), {breaks[label]} break(s)",
                flush=True,
            )
            variants[f"{label}|compiled:{mode}"] = (lambda: None, lambda m=compiled: step(m, x, mode))
    with torch.autocast(device.type, dtype=dtype):
        seconds = alternate_timings(variants, args.repeats, warmup=args.warmup, sync=lambda: sync(device))
    rows = []
    for variant, s in seconds.items():
        label, mode = variant.split("|")
        base = seconds[f"dense|{mode}"]
        ratio = gflops["dense"] / gflops[label]
        compiled = mode != "eager"
        rows.append(
            dict(
                model=name,
                batch=x.shape[0],
                dtype=dtype_name,
                mode=mode,
                method=label,
                gflops=round(gflops[label], 4),
                ms_per_batch=round(1e3 * s, 3),
                images_per_s=round(x.shape[0] / s, 1),
                speedup=round(base / s, 3),
                flops_ratio=round(ratio, 3),
                speedup_over_flops_ratio=round(base / s / ratio, 3),
                first_call_seconds=round(first_call[label], 1) if compiled else None,
                graphs=graphs.get(label) if compiled else None,
                graph_breaks=breaks.get(label) if compiled else None,
            )
        )
    return rows


# ---------------------------------------------------------------- goals and tables


def goals(rows: list[dict]) -> list[dict]:
    """Every speed goal against the rows: ToMe and frozen ATM speed-up (compiled rows
    count for the goal, eager ones are shown beside), per-image ATM within 15% of ATM."""
    out = []
    for r in rows:
        if r["method"] not in ("ToMe", "ATM frozen"):
            continue
        tiny = r["model"] == SHAPES["deit-t"]
        need = GOAL_TINY if tiny else round(GOAL_FLOPS_SHARE * r["flops_ratio"], 3)
        out.append(
            dict(
                goal=f"speed-up >= {GOAL_TINY}x" if tiny else f"speed-up >= {GOAL_FLOPS_SHARE} x FLOPs ratio",
                model=r["model"],
                batch=r["batch"],
                dtype=r["dtype"],
                mode=r["mode"],
                method=r["method"],
                value=r["speedup"],
                needed=need,
                met=r["speedup"] >= need,
                counts_for_goal=r["mode"] != "eager",
            )
        )
    by_key = {(r["model"], r["batch"], r["dtype"], r["mode"], r["method"]): r for r in rows}
    for (model, batch, dtype, mode, method), r in by_key.items():
        atm = by_key.get((model, batch, dtype, mode, "ATM"))
        if method != "ATM per-image" or atm is None:
            continue
        ratio = round(r["ms_per_batch"] / atm["ms_per_batch"], 3)
        out.append(
            dict(
                goal=f"per-image ATM time <= {GOAL_PER_IMAGE} x batch-mean ATM's",
                model=model,
                batch=batch,
                dtype=dtype,
                mode=mode,
                method=method,
                value=ratio,
                needed=GOAL_PER_IMAGE,
                met=ratio <= GOAL_PER_IMAGE,
                counts_for_goal=True,
            )
        )
    return out


def goal_lines(rows: list[dict]) -> list[str]:
    lines = []
    for g in goals(rows):
        verdict = "MET" if g["met"] else "NOT MET"
        note = "" if g["counts_for_goal"] else " (eager: shown beside; the goal is for compiled)"
        lines.append(
            f"- {verdict}: {g['model']} b{g['batch']} {g['dtype']} {g['mode']} {g['method']}: "
            f"{g['value']:.2f} vs {g['goal']} = {g['needed']:.2f}{note}"
        )
    return lines


def all_rows(report: dict) -> list[dict]:
    if "runs" in report:
        return [r for run in report["runs"] for r in run["rows"]]
    return report["rows"]  # the files of the eager-only bench


def markdown(report: dict) -> str:
    """The table (and the goals) of a JSON of this bench, new (runs) or old (rows) format."""
    runs = report.get("runs") or [report]
    lines = []
    for run in runs:
        device = run.get("device_name") or run.get("device")
        lines.append(f"- {device}: `{run['command']}` ({run.get('date_utc', 'date not recorded')})")
        if run.get("gpu"):
            g = run["gpu"]
            lines.append(
                f"  driver {g.get('driver')}, CUDA {g.get('cuda')}, torch {run['versions']['torch']}, "
                f"images: {run.get('images', '?')}"
            )
    rows = all_rows(report)
    lines += [
        "",
        "| model | batch | dtype | mode | method | GFLOPs | images/s | speed-up | FLOPs ratio | speed-up / FLOPs ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r.get('batch', report.get('batch'))} | {r['dtype']} | {r.get('mode', 'eager')} | "
            f"{r['method']} | {r['gflops']:.3f} | {r['images_per_s']:.0f} | {r['speedup']:.2f}× | "
            f"{r['flops_ratio']:.2f}× | {r['speedup'] / r['flops_ratio']:.2f} |"
        )
    if rows and "mode" in rows[0]:
        lines += ["", "Goals:", "", *goal_lines(rows)]
    return "\n".join(lines)


def save(report: dict, out: Path) -> None:
    """The JSON and its Markdown table, each replaced at once (a run killed by a timeout while
    saving leaves the previous file whole for the next ``--append``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(report, indent=2)), (out.with_suffix(".md"), markdown(report) + "\n")):
        part = path.with_name(path.name + ".part")
        part.write_text(text)
        os.replace(part, path)


# ---------------------------------------------------------------- main


def listed(text: str, allowed, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: {','.join(bad) or 'nothing'} not among {', '.join(allowed)}")
    return items


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="deit-t,deit-s,deit-b", help="comma-separated: deit-t, deit-s, deit-b")
    ap.add_argument("--batch", "--batches", dest="batches", default="256", help="comma-separated batch sizes")
    ap.add_argument("--dtypes", default="bf16,fp16", help="comma-separated autocast dtypes: bf16, fp16")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    ap.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=COMPILE_MODES,
        help="also time every model compiled (torch.compile, inductor) in this mode (default: default)",
    )
    ap.add_argument(
        "--compiled-methods",
        default="tome,frozen",
        help="which of --methods also run compiled ('all': every one; adaptive ATM recompiles per count)",
    )
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--warmup", type=int, default=WARMUP)
    ap.add_argument("--bisection-steps", type=int, default=10)
    ap.add_argument("--photos", help="folder of photos (default: shared ImageNet samples, else build/gpu-photos)")
    ap.add_argument("--copy-photos", metavar="DIR", help="copy 192 shared photos into DIR (to carry) and exit")
    ap.add_argument("--out", help="JSON (default bench/results/gpu_compiled.json, or gpu.json without --compile)")
    ap.add_argument("--append", action="store_true", help="add this run to the runs already in --out")
    ap.add_argument("--report", metavar="JSON", help="print the table and the goals of a JSON and exit")
    ap.add_argument("--markdown", action="store_true", help="the table of --out (default bench/results/gpu.json)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="CPU, a tiny random ViT, batch 2, one repeat, eager and compiled (inductor): checks the pipeline",
    )
    args = ap.parse_args(argv)
    if args.copy_photos:
        return copy_photos(args.copy_photos)
    if args.report or args.markdown:
        print(markdown(json.loads(Path(args.report or args.out or "bench/results/gpu.json").read_text())))
        return 0
    models = [SHAPES[m] for m in listed(args.models, SHAPES, "models")]
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = listed(args.dtypes, DTYPES, "dtypes")
    wanted = listed(args.methods, METHODS, "methods")
    compiled_methods = (
        wanted if args.compiled_methods == "all" else listed(args.compiled_methods, METHODS, "compiled-methods")
    )
    device = torch.device("cuda")
    if args.smoke:
        models, batches, dtypes, device = [SMOKE_MODEL], [2], ["bf16"], torch.device("cpu")
        args.repeats, args.warmup, args.bisection_steps = 1, 1, 4
        args.compile = args.compile or "default"
        args.out = args.out or str(Path(tempfile.gettempdir()) / "atmerge-gpu-smoke" / "gpu_compiled_smoke.json")
    elif not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device; none is available here (try --smoke)", file=sys.stderr)
        return 2
    out = Path(args.out or ("bench/results/gpu_compiled.json" if args.compile else "bench/results/gpu.json"))
    compiled_labels = {LABELS[m] for m in compiled_methods}
    for limit in ("recompile_limit", "cache_size_limit"):  # every variant is its own entry: keep them all
        if hasattr(dynamo.config, limit):
            setattr(dynamo.config, limit, 64)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # ATM's graph breaks where it reads a count

    report = json.loads(out.read_text()) if args.append and out.exists() else {"bench": "bench/gpu.py", "runs": []}
    if "runs" not in report:
        raise SystemExit(f"{out} is an eager-only file of the older format; --append to a new --out")
    folder = None if args.smoke else photos_folder(args.photos)
    record = dict(
        run_header(
            args,
            models=models,
            batches=batches,
            dtypes=dtypes,
            methods=[LABELS[m] for m in wanted],
            compiled=sorted(compiled_labels) if args.compile else [],
            compile_mode=args.compile,
            backend="inductor" if args.compile else None,
            repeats=args.repeats,
            warmup=args.warmup,
            weights="random init, seed 0",
            bisection_steps=args.bisection_steps,
            bisected_in="bf16 autocast, on the timed images",
            atm=PAPER_DEIT_S,
            freezing=f"atmerge.freeze, mean count per block, on up to {CALIBRATION_PHOTOS} other photos",
            timing="CUDA-synchronised perf_counter per batch, all variants alternately, median",
        ),
        device_name=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke run)",
        triton=_version("triton"),
        images=None,
        settings={},
        rows=[],
        complete=False,
    )
    report["runs"].append(record)
    for name in models:
        start = time.perf_counter()
        model = build_model(name, device)
        timed, calibration, record["images"] = images(model, folder, args.smoke)
        methods, gflops, chosen = settings(model, timed.to(device), calibration, wanted, args.bisection_steps)
        record["settings"][name] = {**chosen, "gflops": gflops}
        print(f"== {name}: {chosen} ({time.perf_counter() - start:.1f} s)", flush=True)
        eager = {}
        for label, method in methods.items():
            eager[label] = copy.deepcopy(model)
            if method is not None:
                atmerge.patch(eager[label], method)
        for batch in batches:
            x = tiled(timed, batch).to(device)
            for dtype_name in dtypes:
                start = time.perf_counter()
                rows = run_config(name, eager, methods, gflops, x, dtype_name, args, compiled_labels)
                record["rows"] += rows
                for r in rows:
                    print(
                        f"   {r['method']:>13} {r['mode']:>24} b{batch} {dtype_name}: {r['images_per_s']:9.1f} img/s  "
                        f"speed-up {r['speedup']:.2f}x  FLOPs ratio {r['flops_ratio']:.2f}x",
                        flush=True,
                    )
                print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)
                save(report, out)  # after every configuration: a run stopped by a timeout keeps it
        del eager, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record["complete"] = True
    save(report, out)
    print("\nGoals (this run):")
    print("\n".join(goal_lines(record["rows"])))
    print(f"\nwrote {out} and {out.with_suffix('.md')}")
    return 0


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
