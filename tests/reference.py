"""A slow, obviously-correct ATM forward pass for timm ViTs, written from the paper with plain
Python loops over images and tokens.  Tests compare the vectorised library against it."""

from __future__ import annotations

import math

import torch


def _probs(blk, x, size, prop_attn):
    """Attention probabilities written out: softmax(q kᵀ/√d + log size of the keys) per head.
    x [N, C] (already normed).  Returns (probs [H, N, N], keys [H, N, d], values [H, N, d])."""
    attn = blk.attn
    n = x.shape[0]
    qkv = attn.qkv(x).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
    if prop_attn:
        logits = logits + torch.log(torch.tensor(size, dtype=x.dtype))[None, None, :]
    return logits.softmax(-1), k, v


def _attend(blk, probs, v):
    """The rest of attention given its probabilities [H, N, N] and values [H, N, d]: [N, C]."""
    attn = blk.attn
    n = probs.shape[-1]
    out = (probs @ v).transpose(0, 1).reshape(n, -1)
    return attn.proj(attn.norm(out))


def _attention(blk, x, size, prop_attn):
    """Multi-head attention written out: softmax(q kᵀ/√d + log size) v.  x [N, C]."""
    probs, k, v = _probs(blk, x, size, prop_attn)
    return _attend(blk, probs, v), k.mean(0)


def _embed(model, images):
    """Per image: the tokens entering the first block (a list of [C] vectors), their sizes (1)
    and groups (each token its own original position)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    batch = x.shape[0]
    toks = [[x[b, i] for i in range(x.shape[1])] for b in range(batch)]
    sizes = [[1.0] * x.shape[1] for _ in range(batch)]
    groups = [[{i} for i in range(x.shape[1])] for _ in range(batch)]
    return toks, sizes, groups


def _mlp(blk, toks):
    """The second half of a block on a list of tokens."""
    xb = torch.stack(toks)
    return list(xb + blk.ls2(blk.mlp(blk.norm2(xb))))


def _head(model, toks, sizes):
    """Final norm, pooling (size-weighted mean of the unprotected tokens for 'avg') and head."""
    p = model.num_prefix_tokens
    feats = []
    for b in range(len(toks)):
        xb = model.norm(torch.stack(toks[b]))
        if model.global_pool == "avg":
            w = torch.tensor(sizes[b][p:], dtype=xb.dtype)[:, None]
            feats.append((xb[p:] * w).sum(0) / w.sum())
        else:
            feats.append(xb)
    if model.global_pool == "avg":
        return model.head(model.head_drop(model.fc_norm(torch.stack(feats))))
    return model.forward_head(torch.stack(feats))


def best_partner(candidates, score):
    """(highest score, its candidate) over ``candidates``; the first one wins ties; (−inf, None)
    when there are none."""
    best_score, best = -math.inf, None
    for c in candidates:
        value = score(c)
        if value > best_score:
            best_score, best = value, c
    return best_score, best


def source_groups(source):
    """Per image, the sorted groups of original positions held by each token of a 0/1 source map
    [B, N, N0] (order-free, for comparing with a reference)."""
    return [sorted(tuple(sorted(torch.nonzero(row).flatten().tolist())) for row in img) for img in source]


def real_source_groups(source):
    """:func:`source_groups` without the empty rows of padding (a padded per-image batch)."""
    return [[g for g in image if g] for image in source_groups(source)]


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
    toks, sizes, groups = _embed(model, images)
    batch = len(toks)
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
                    score, j = best_partner(B, lambda j: min(max(_cos(keys[b][a], keys[b][j]), -1.0), 1.0))
                    best.append((score, a, j))
                counts.append(sum(1 for s, _, _ in best if s > theta))
                plans.append((A, B, best))
            r = math.floor(sum(counts) / batch + 0.5) if fixed_r is None else fixed_r[l - 1]
            r = min(r, len(plans[0][0]) if plans[0][1] else 0)
            rs.append(r)
            for b in range(batch if r > 0 else 0):  # nothing merges: the tokens keep their order
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
            toks[b] = _mlp(blk, toks[b])
    return _head(model, toks, sizes), final_groups, rs


# ----------------------------------------------------------------------------- baselines
#
# The three baselines below follow the same conventions as reference_forward: per image, a list
# of tokens, their sizes and their groups (sets of original token positions); they return
# (model output, groups held after the last reduction — before the last block of a CLS-pooled
# model keeps only its protected tokens —, tokens removed in every block).


def _plain_block(blk, tok, size, prop_attn):
    """First half of an unmerged block: tok + ls1(attention(norm1(tok))).  Returns (tokens,
    probs [H, N, N], head-mean keys [N, d])."""
    xb = torch.stack(tok)
    probs, k, v = _probs(blk, blk.norm1(xb), size, prop_attn)
    return list(xb + blk.ls1(_attend(blk, probs, v))), probs, k.mean(0)


def _same_for_all(counts):
    assert len(set(counts)) == 1, counts  # these baselines remove the same count from every image
    return counts[0]


@torch.no_grad()
def reference_evit(model, images, keep_rate=0.7, locations=(4, 7, 10), prop_attn=False, prune_last=True):
    """EViT: after attention in the blocks of ``locations`` (from 1), keep the ⌈keep_rate·n⌉
    unprotected tokens the CLS query attends to most (mean over heads) and fuse the others into
    one token Σ score_i x_i (a weighted sum), size Σ sizes, group ∪ groups."""
    depth = len(model.blocks)
    p = model.num_prefix_tokens
    cls_pooled = model.global_pool == "token" and prune_last
    toks, sizes, groups = _embed(model, images)
    batch = len(toks)
    rs = []
    for l, blk in enumerate(model.blocks, start=1):
        counts = []
        for b in range(batch):
            toks[b], probs, _ = _plain_block(blk, toks[b], sizes[b], prop_attn)
            n_in = len(toks[b])
            if l == depth and cls_pooled:
                toks[b], sizes[b] = toks[b][:p], sizes[b][:p]  # groups stay: they are reported
                counts.append(0)
                continue
            n = n_in - p
            keep = math.ceil(keep_rate * n)
            if l in locations and p > 0 and keep < n:
                heads = probs.shape[0]
                score = {i: sum(float(probs[h, 0, i]) for h in range(heads)) / heads for i in range(p, n_in)}
                ranked = sorted(range(p, n_in), key=lambda i: (-score[i], i))
                kept = set(ranked[:keep])
                rest = [i for i in range(p, n_in) if i not in kept]
                fused = sum(score[i] * toks[b][i] for i in rest)
                order = list(range(p)) + [i for i in range(p, n_in) if i in kept]
                new_t = [toks[b][i] for i in order] + [fused]
                new_s = [sizes[b][i] for i in order] + [sum(sizes[b][i] for i in rest)]
                new_g = [set(groups[b][i]) for i in order] + [set().union(*(groups[b][i] for i in rest))]
                toks[b], sizes[b], groups[b] = new_t, new_s, new_g
            counts.append(n_in - len(toks[b]))
        rs.append(_same_for_all(counts))
        for b in range(batch):
            toks[b] = _mlp(blk, toks[b])
    return _head(model, toks, sizes), [list(g) for g in groups], rs


def _mctf_fuse(X, P, size, group, p, r, tau_sim, tau_info, tau_size):
    """One MCTF fusion of the tokens X (list of [C]) entering a block, with the block's attention
    P [H, N, N] on them.  Returns (tokens, sizes, groups, carried-over attention [H, N', N'])."""
    n = len(X)
    heads = P.shape[0]
    pl = P.tolist()
    # Informativeness: attention received, mean over heads and all queries.
    info = [sum(pl[h][q][i] for h in range(heads) for q in range(n)) / (heads * n) for i in range(n)]
    max_inv_info = max(1.0 / a for a in info)
    inv_info = [(1.0 / a) / max_inv_info for a in info]
    max_inv_size = max(1.0 / s for s in size)
    inv_size = [(1.0 / s) / max_inv_size for s in size]
    A = [i for i in range(p, n) if i % 2 == 0]
    B = [i for i in range(p, n) if i % 2 == 1]

    def weight(a, b):
        w = ((_cos(X[a], X[b]) + 1) / 2) ** (1 / tau_sim) if tau_sim else 1.0
        if tau_info:
            w *= (inv_info[a] * inv_info[b]) ** (1 / tau_info)
        if tau_size:
            w *= (inv_size[a] * inv_size[b]) ** (1 / tau_size)
        return w

    W = {(a, b): weight(a, b) for a in A for b in B}
    r1, r2 = r // 2, r - r // 2
    # Step 1: A → B.
    best1 = []
    for a in A:
        w, b = best_partner(B, lambda b: W[a, b])
        best1.append((w, a, b))
    ranked = sorted(range(len(A)), key=lambda i: (-best1[i][0], i))
    a_to_b = {best1[i][1]: best1[i][2] for i in ranked[:r1]}
    free_a = [a for a in A if a not in a_to_b]
    # Step 2: B (with what it received) → an A token not merged in step 1.
    best2 = []
    for b in B:
        w, a = best_partner(free_a, lambda a: W[a, b])
        best2.append((w, b, a))
    ranked = sorted(range(len(B)), key=lambda i: (-best2[i][0], i))
    b_to_a = {best2[i][1]: best2[i][2] for i in ranked[:r2]}
    unmoved_b = [best2[i][1] for i in ranked[r2:]]  # by descending best score: the release's order
    # Final groups of entering tokens: [protected, unmerged A in token order, unmoved B by score].
    members = [[i] for i in range(p)]
    for a in free_a:
        moved_b = [b for b in B if b_to_a.get(b) == a]
        members.append([a] + moved_b + [a2 for a2 in A if a_to_b.get(a2) in moved_b])
    for b in unmoved_b:
        members.append([b] + [a2 for a2 in A if a_to_b.get(a2) == b])
    assert sorted(i for m in members for i in m) == list(range(n))
    max_size = max(size)
    w = [info[i] * size[i] / max_size for i in range(n)]
    new_t, new_s, new_g = [], [], []
    for m in members:
        total = sum(w[i] for i in m)
        new_t.append(sum(w[i] * X[i] for i in m) / total)
        new_s.append(sum(size[i] for i in m))
        new_g.append(set().union(*(group[i] for i in m)))
    # Attention carried over: keys of a group add up, its queries average with the weights w.
    cols = torch.stack([P[:, :, m].sum(-1) for m in members], dim=-1)  # [H, N, N']
    rows = [sum(w[q] * cols[:, q, :] for q in m) / sum(w[q] for q in m) for m in members]
    return new_t, new_s, new_g, torch.stack(rows, dim=1)  # [H, N', N']


@torch.no_grad()
def reference_mctf(
    model, images, r=16, tau_sim=1.0, tau_info=20.0, tau_size=40.0, blocks=None, prop_attn=True, prune_last=True
):
    """MCTF with one-step-ahead attention: at the start of the blocks of ``blocks`` (None = every
    block but the first), fuse r tokens chosen by bidirectional bipartite matching on the
    multi-criteria weights, then run the block's attention with the carried-over map."""
    depth = len(model.blocks)
    p = model.num_prefix_tokens
    cls_pooled = model.global_pool == "token" and prune_last
    toks, sizes, groups = _embed(model, images)
    batch = len(toks)
    rs = []
    for l, blk in enumerate(model.blocks, start=1):
        fuses = l > 1 if blocks is None else l in blocks
        counts = []
        for b in range(batch):
            X = toks[b]
            n = len(X)
            probs, _, v = _probs(blk, blk.norm1(torch.stack(X)), sizes[b], prop_attn)
            count = 0
            if fuses:
                free = n - p
                count = int(free * r) if isinstance(r, float) else r
                count = max(0, min(count, n - 10, free // 2))
            if count > 0:
                X, sizes[b], groups[b], probs = _mctf_fuse(
                    X, probs, sizes[b], groups[b], p, count, tau_sim, tau_info, tau_size
                )
                _, _, v = _probs(blk, blk.norm1(torch.stack(X)), sizes[b], prop_attn)  # values only
            xb = torch.stack(X) + blk.ls1(_attend(blk, probs, v))
            toks[b] = list(xb)
            counts.append(n - len(toks[b]))
            if l == depth and cls_pooled:
                toks[b], sizes[b] = toks[b][:p], sizes[b][:p]
        rs.append(_same_for_all(counts))
        for b in range(batch):
            toks[b] = _mlp(blk, toks[b])
    return _head(model, toks, sizes), [list(g) for g in groups], rs


@torch.no_grad()
def reference_zerotp(model, images, r=8, importance_share=0.5, iterations=30, prop_attn=True, prune_last=True):
    """Zero-TPrune (simplified): after attention, Weighted-PageRank importance; prune the
    ⌊share·r⌋ least important tokens, then split the rest by importance rank into anchors (even
    ranks) and candidates (odd ranks) and prune the candidates most key-similar to an anchor.
    r: the same count in every block, or the counts block by block written out (a list; missing
    blocks 0) — no schedule of atmerge's is used."""
    depth = len(model.blocks)
    p = model.num_prefix_tokens
    cls_pooled = model.global_pool == "token" and prune_last
    schedule = list(r) + [0] * (depth - len(r)) if isinstance(r, list) else [r] * depth
    toks, sizes, groups = _embed(model, images)
    batch = len(toks)
    rs = []
    for l, blk in enumerate(model.blocks, start=1):
        r_l = schedule[l - 1]
        counts = []
        for b in range(batch):
            toks[b], probs, keys = _plain_block(blk, toks[b], sizes[b], prop_attn)
            n = len(toks[b])
            if l == depth and cls_pooled:
                toks[b], sizes[b] = toks[b][:p], sizes[b][:p]
                counts.append(0)
                continue
            if r_l > 0:
                heads, pl = probs.shape[0], probs.tolist()
                # graph[k][q] = mean over heads of P[h, q, k]
                graph = [[sum(pl[h][q][k] for h in range(heads)) / heads for q in range(n)] for k in range(n)]
                s = [1.0 / n] * n
                for _ in range(iterations):
                    s = [sum(graph[k][q] * s[q] for q in range(n)) for k in range(n)]
                free = list(range(p, n))
                r_imp = min(int(importance_share * r_l), len(free))
                ranked = sorted(free, key=lambda i: (-s[i], i))
                survivors = ranked[: len(free) - r_imp]  # the r_imp least important are pruned
                anchors, candidates = survivors[0::2], survivors[1::2]
                scores = [max((_cos(keys[c], keys[a]) for a in anchors), default=-math.inf) for c in candidates]
                r_sim = min(r_l - r_imp, len(candidates) if anchors else 0)
                order = sorted(range(len(candidates)), key=lambda i: (-scores[i], i))
                pruned = {candidates[i] for i in order[:r_sim]}
                alive = set(survivors) - pruned
                kept = list(range(p)) + [i for i in range(p, n) if i in alive]
                toks[b] = [toks[b][i] for i in kept]
                sizes[b] = [sizes[b][i] for i in kept]
                groups[b] = [set(groups[b][i]) for i in kept]
            counts.append(n - len(toks[b]))
        rs.append(_same_for_all(counts))
        for b in range(batch):
            toks[b] = _mlp(blk, toks[b])
    return _head(model, toks, sizes), [list(g) for g in groups], rs
