"""A slow, obviously-correct ATM forward pass for timm ViTs, written from the paper with plain
Python loops over images and tokens.  Tests compare the vectorised library against it."""

from __future__ import annotations

import math

import torch


def _attention(blk, x, size, prop_attn):
    """Multi-head attention written out: softmax(q kᵀ/√d + log size) v.  x [N, C]."""
    attn = blk.attn
    n = x.shape[0]
    qkv = attn.qkv(x).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
    if prop_attn:
        logits = logits + torch.log(torch.tensor(size, dtype=x.dtype))[None, None, :]
    out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(n, -1)
    return attn.proj(attn.norm(out)), k.mean(0)


def _cos(u, v):
    return float(torch.dot(u, v) / (u.norm() * v.norm()))


@torch.no_grad()
def reference_forward(
    model, images, alpha=1.0, beta=0.0, theta_min=1.0, split_layer=None, prop_attn=True, fixed_r=None, prune_last=True
):
    """Returns (model output [B, ...], groups: per image the list of sets of original token
    positions held by the tokens entering the last block, r of every block).

    Threshold merging (ATM) by default; with ``fixed_r`` (one count per block) the r best pairs
    merge instead, as in ToMe.  prune_last: keep only CLS in the last block of CLS-pooled models."""
    depth = len(model.blocks)
    ls = round(0.75 * depth) if split_layer is None else split_layer
    p = model.num_prefix_tokens
    cls_pooled = model.global_pool == "token" and prune_last
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    batch = x.shape[0]
    toks = [[x[b, i] for i in range(x.shape[1])] for b in range(batch)]
    sizes = [[1.0] * x.shape[1] for _ in range(batch)]
    groups = [[{i} for i in range(x.shape[1])] for _ in range(batch)]
    rs = []
    for l, blk in enumerate(model.blocks, start=1):
        keys = []
        for b in range(batch):
            xb = torch.stack(toks[b])
            out, k = _attention(blk, blk.norm1(xb), sizes[b], prop_attn)
            xb = xb + blk.ls1(out)
            toks[b] = list(xb)
            keys.append(k)
        if l == depth and cls_pooled:
            rs.append(0)
            final_groups = [list(g) for g in groups]
            for b in range(batch):
                toks[b], sizes[b] = toks[b][:p], sizes[b][:p]
        else:
            theta = max(alpha - (math.exp(beta * (l - 1)) - 1), theta_min)
            plans, counts = [], []
            for b in range(batch):
                free = list(range(p, len(toks[b])))
                if l <= ls:
                    A = [t for t in free if t % 2 == 0]
                    B = [t for t in free if t % 2 == 1]
                else:
                    ordered = sorted(free, key=lambda t: (sizes[b][t], t))
                    A, B = ordered[: len(free) // 2], ordered[len(free) // 2 :]
                best = []
                for a in A:
                    best_score, best_j = -math.inf, None
                    for j in B:
                        c = min(max(_cos(keys[b][a], keys[b][j]), -1.0), 1.0)
                        if c > best_score:
                            best_score, best_j = c, j
                    best.append((best_score, a, best_j))
                counts.append(sum(1 for s, _, _ in best if s > theta))
                plans.append((A, B, best))
            r = math.floor(sum(counts) / batch + 0.5) if fixed_r is None else fixed_r[l - 1]
            r = min(r, len(plans[0][0]) if plans[0][1] else 0)
            rs.append(r)
            for b in range(batch):
                A, B, best = plans[b]
                ranked = sorted(range(len(A)), key=lambda i: (-best[i][0], i))
                merged = {best[i][1]: best[i][2] for i in ranked[:r]}
                kept_a = [a for a in A if a not in merged]
                new_t, new_s, new_g = [], [], []
                for t in list(range(p)) + kept_a:
                    new_t.append(toks[b][t]), new_s.append(sizes[b][t]), new_g.append(set(groups[b][t]))
                for j in B:
                    members = [j] + [a for a in A if merged.get(a) == j]
                    total = sum(sizes[b][m] for m in members)
                    new_t.append(sum(toks[b][m] * sizes[b][m] for m in members) / total)
                    new_s.append(total)
                    new_g.append(set().union(*(groups[b][m] for m in members)))
                toks[b], sizes[b], groups[b] = new_t, new_s, new_g
            if l == depth:
                final_groups = [list(g) for g in groups]
        for b in range(batch):
            xb = torch.stack(toks[b])
            toks[b] = list(xb + blk.ls2(blk.mlp(blk.norm2(xb))))
    feats = []
    for b in range(batch):
        xb = model.norm(torch.stack(toks[b]))
        if model.global_pool == "avg":
            w = torch.tensor(sizes[b][p:], dtype=xb.dtype)[:, None]
            feats.append((xb[p:] * w).sum(0) / w.sum())
        else:
            feats.append(xb)
    if model.global_pool == "avg":
        out = model.head(model.head_drop(model.fc_norm(torch.stack(feats))))
    else:
        out = model.forward_head(torch.stack(feats))
    return out, final_groups, rs
