"""Where the merged CIFAR-10 ViT loses to its FLOPs ratio, one command:

    python bench/merge_gap.py [--repeats 11] [--out bench/results/merge_gap.json]

Three forwards of the same 64 cifar10-test images at batch 64, timed alternately (median of
``--repeats``): the unpatched model; ATM at the paper's DeiT-S setting; and an *oracle* — the
unpatched blocks run on exactly the token counts ATM left in each block (the first n tokens
kept by slicing, no matching, no merging, the last block's MLP on CLS only), i.e. what merging
would cost if the merge step itself were free.  Their ratio splits the gap between ATM's
speed-up and its FLOPs ratio into the merge step's share and the rest (smaller matrix products).
"""

from __future__ import annotations

import argparse

import torch

import atmerge
from atmerge import checkpoints, data
from common import WARMUP, alternate_timings, run_header, write_json

PAPER_DEIT_S = dict(alpha=0.99, beta=0.04, theta_min=0.88)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", default="bench/results/merge_gap.json")
    args = ap.parse_args(argv)
    test = data.image_folder(data.cifar10_folder("test"), data.cifar10_transform())
    x = torch.stack([test[i][0] for i in range(64)])
    dense = checkpoints.cifar10_reference_vit()
    merged = atmerge.patch(checkpoints.cifar10_reference_vit(), atmerge.ATM(**PAPER_DEIT_S))
    with torch.no_grad():
        merged(x)
    stats = atmerge.last_stats(merged)
    attn_counts = [int(round(t)) for t in stats.tokens_per_block]
    mlp_counts = [int(round(t)) for t in stats.tokens_mlp_per_block]

    def oracle() -> torch.Tensor:
        t = dense._pos_embed(dense.patch_embed(x))
        for block, n, m in zip(dense.blocks, attn_counts, mlp_counts):
            t = t[:, :n]
            t = t + block.attn(block.norm1(t))
            t = t[:, :m]
            t = t + block.mlp(block.norm2(t))
        return dense.forward_head(dense.norm(t))

    seconds = alternate_timings(
        {
            "unpatched": (lambda: None, lambda: dense(x)),
            "ATM": (lambda: None, lambda: merged(x)),
            "oracle": (lambda: None, oracle),
        },
        args.repeats,
    )
    flops_ratio = atmerge.gflops(dense, (3, 32, 32)) / stats.gflops
    header = run_header(
        args,
        images="the first 64 of cifar10-test",
        batch_size=64,
        repeats=args.repeats,
        warmup=WARMUP,
        dtype="float32",
        atm=PAPER_DEIT_S,
        oracle_mlp_tokens=mlp_counts,
    )
    report = dict(
        **header,
        tokens_per_block=attn_counts,
        gflops=stats.gflops,
        flops_ratio=flops_ratio,
        ms={k: 1e3 * v for k, v in seconds.items()},
        atm_speedup_over_flops_ratio=seconds["unpatched"] / seconds["ATM"] / flops_ratio,
        oracle_speedup_over_flops_ratio=seconds["unpatched"] / seconds["oracle"] / flops_ratio,
        merge_step_share_of_atm_time=1 - seconds["oracle"] / seconds["ATM"],
    )
    for key, value in report.items():
        if key not in header:
            print(f"{key}: {value}")
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
