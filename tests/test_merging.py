import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atmerge.core.matching import alternate_split, best_match, size_distinctive_split
from atmerge.core.merging import (
    Assignment,
    bipartite_merge,
    merge_source,
    merge_weighted_average,
    merging_error,
    merging_error_bounds,
)


def _hand_merge():
    # 1 CLS + 6 tokens; A = positions 2,4,6; B = 1,3,5
    a, b = alternate_split(7, 1)
    scores = torch.tensor([[0.9, 0.2, 0.95]])  # A tokens 2, 4, 6
    match = torch.tensor([[0, 2, 0]])  # 2->1, 4->5, 6->1
    return bipartite_merge(scores, match, a, b, r=2, num_protected=1)


def test_bipartite_merge_picks_top_r():
    m = _hand_merge()
    assert m.r == 2
    assert m.src.tolist() == [[2, 0]]  # A[2]=token 6 (0.95), A[0]=token 2 (0.9)
    assert m.dst.tolist() == [[0, 0]]  # both into B[0] = token 1
    assert m.keep.tolist() == [[1]]  # token 4 stays


def test_weighted_average_hand_computed():
    m = _hand_merge()
    x = torch.tensor([[[100.0], [1.0], [2.0], [3.0], [4.0], [5.0], [6.0]]])
    size = torch.tensor([[1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 3.0]])
    y, s = merge_weighted_average(m, x, size)
    # layout: CLS, unmerged A (token 4), B (tokens 1 <- {2, 6}, 3, 5)
    expected_1 = (2 * 1.0 + 1 * 2.0 + 3 * 6.0) / 6
    assert torch.allclose(y[0, :, 0], torch.tensor([100.0, 4.0, expected_1, 3.0, 5.0]))
    assert s.tolist() == [[1.0, 1.0, 6.0, 1.0, 1.0]]
    assert s.sum() == size.sum()  # Definition 1: sizes accumulate


def test_unmerge_gives_every_original_token_its_group_value():
    m = _hand_merge()
    y = torch.tensor([[[10.0], [40.0], [11.0], [33.0], [55.0]]])
    out = m.unmerge(y)
    assert out[0, :, 0].tolist() == [10.0, 11.0, 11.0, 33.0, 40.0, 55.0, 11.0]


def test_merge_source_tracks_groups():
    m = _hand_merge()
    source = torch.eye(7).unsqueeze(0)
    s = merge_source(m, source)
    groups = [set(torch.nonzero(row).flatten().tolist()) for row in s[0]]
    assert groups == [{0}, {4}, {1, 2, 6}, {3}, {5}]


def test_r_zero_is_identity_without_reordering():
    a, b = alternate_split(7, 1)
    m = bipartite_merge(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.long), a, b, 0, 1)
    x = torch.randn(2, 7, 4)
    assert m(x) is x and m.unmerge(x) is x


def test_r_is_clipped_to_set_a():
    a, b = alternate_split(7, 1)
    m = bipartite_merge(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.long), a, b, 10, 1)
    assert m.r == 3


def test_merge_then_unmerge_is_identity_on_group_constant_tokens():
    torch.manual_seed(1)
    metric = torch.randn(3, 11, 8)
    a, b = alternate_split(11, 1)
    scores, match = best_match(metric, a, b)
    m = bipartite_merge(scores, match, a, b, 3, 1)
    y = torch.randn(3, 8, 5)
    assert torch.equal(m(m.unmerge(y), "amax"), y)


unit = st.lists(st.floats(-1, 1, allow_nan=False), min_size=3, max_size=3).filter(
    lambda v: sum(t * t for t in v) > 1e-2
)
sizes = st.integers(1, 500)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(unit, unit, sizes, sizes)
def test_theorem_1_bounds(x_i, x_j, n_i, n_j):
    xi, xj = torch.tensor(x_i, dtype=torch.float64), torch.tensor(x_j, dtype=torch.float64)
    err = merging_error(xi, xj, float(n_i), float(n_j))
    lower, upper = merging_error_bounds(xi, xj, float(n_i), float(n_j))
    tol = 1e-9 * (n_i + n_j)
    assert lower - tol <= err <= upper + tol


def test_merging_error_closed_form():
    # E_m = N - sqrt(n_i^2 + n_j^2 + 2 n_i n_j cos) for unit vectors (Appendix B)
    xi, xj = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.6, 0.8], dtype=torch.float64)
    n_i, n_j = 3.0, 5.0
    expected = n_i + n_j - (n_i**2 + n_j**2 + 2 * n_i * n_j * 0.6) ** 0.5
    assert torch.isclose(merging_error(xi, xj, n_i, n_j), torch.tensor(expected, dtype=torch.float64))


def _merge_by_hand(x, size, metric, r, p):
    """One ToMe merge step written out per image and per token from its definition, using no
    atmerge code: set A = the even positions from p on, set B = the odd ones; each A token's
    partner is its most cosine-similar B token (by ``metric``; the first on ties); the r A
    tokens with the highest such similarity (the earlier on ties) fold into their partners, as
    size-weighted averages, sizes adding up; laid out [protected, unmerged A, B], each in
    position order."""
    out_x, out_s = [], []
    for img in range(x.shape[0]):
        a_pos = [i for i in range(p, x.shape[1]) if i % 2 == 0]
        b_pos = [j for j in range(p, x.shape[1]) if j % 2 == 1]
        cos = lambda i, j: float(metric[img, i] @ metric[img, j] / (metric[img, i].norm() * metric[img, j].norm()))  # noqa: E731
        partner = {i: max(b_pos, key=lambda j: (cos(i, j), -j)) for i in a_pos}
        merged = sorted(a_pos, key=lambda i: (-cos(i, partner[i]), i))[: min(r, len(a_pos))]
        sums = {j: x[img, j] * size[img, j] for j in b_pos}
        totals = {j: size[img, j] for j in b_pos}
        for i in merged:
            sums[partner[i]] = sums[partner[i]] + x[img, i] * size[img, i]
            totals[partner[i]] = totals[partner[i]] + size[img, i]
        kept = [i for i in a_pos if i not in merged]
        if not merged:  # merging nothing keeps the tokens where they are
            out_x.append(x[img]), out_s.append(size[img])
            continue
        out_x.append(
            torch.stack(
                [x[img, i] for i in range(p)] + [x[img, i] for i in kept] + [sums[j] / totals[j] for j in b_pos]
            )
        )
        out_s.append(
            torch.stack([size[img, i] for i in range(p)] + [size[img, i] for i in kept] + [totals[j] for j in b_pos])
        )
    return torch.stack(out_x), torch.stack(out_s)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(2, 40),
    protected=st.integers(0, 2),
    channels=st.integers(1, 8),
    r_share=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_merge_step_equals_its_definition_written_out(batch, tokens, protected, channels, r_share, seed):
    """split → best_match → bipartite_merge → merge_weighted_average against _merge_by_hand."""
    g = torch.Generator().manual_seed(seed)
    n = tokens + protected
    x = torch.randn(batch, n, channels, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (batch, n), generator=g).double()
    metric = torch.randn(batch, n, 4, generator=g, dtype=torch.float64)
    a, b = alternate_split(n, protected)
    r = round(r_share * a.numel())
    scores, match = best_match(metric, a, b)
    merge = bipartite_merge(scores, match, a, b, r=r, num_protected=protected)
    fused = merge_weighted_average(merge, x, size)
    expected = _merge_by_hand(x, size, metric, r, protected)
    assert fused[0].shape == expected[0].shape
    assert torch.allclose(fused[0], expected[0], atol=1e-12) and torch.equal(fused[1], expected[1])


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(2, 30),
    protected=st.integers(0, 2),
    size_distinctive=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_row_merges_equal_scatter_sums_bit_for_bit(batch, tokens, protected, size_distinctive, dtype, seed):
    """The merges copy and index-add rows of the flattened tokens; each sum must still be the
    one a scatter over the token dimension gives (the B token first, then its partners in A
    order; a slot's tokens in token order), bit for bit, for shared and per-image index sets."""
    g = torch.Generator().manual_seed(seed)
    n = tokens + protected
    x = torch.randn(batch, n, 5, generator=g).to(dtype)
    size = torch.randint(1, 5, (batch, n), generator=g).float()
    a, b = size_distinctive_split(size, protected) if size_distinctive else alternate_split(n, protected)
    scores, match = best_match(torch.randn(batch, n, 4, generator=g), a, b)
    merge = bipartite_merge(
        scores, match, a, b, r=int(torch.randint(1, a.shape[-1] + 1, (1,), generator=g)), num_protected=protected
    )
    a_pos = (a if a.dim() == 2 else a.expand(batch, -1)).gather(1, merge.src)
    b_idx = b if b.dim() == 2 else b.expand(batch, -1)
    take = lambda t, i: t.gather(1, i.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
    keep = take(x, (a if a.dim() == 2 else a.expand(batch, -1)).gather(1, merge.keep))
    dst = merge.dst.unsqueeze(-1)
    summed = take(x, b_idx).scatter_add(1, dst.expand(-1, -1, 5), take(x, a_pos))
    assert torch.equal(merge(x, "sum"), torch.cat([x[:, :protected], keep, summed], 1))
    w = size.to(dtype).unsqueeze(-1)
    total = take(w, b_idx).scatter_add(1, dst, take(w, a_pos))
    weighted = (take(x, b_idx) * take(w, b_idx)).scatter_add(1, dst.expand(-1, -1, 5), take(x, a_pos) * take(w, a_pos))
    fused, sizes = merge_weighted_average(merge, x, size)
    assert torch.equal(fused, torch.cat([x[:, :protected], keep, weighted / total], 1))
    assert sizes.dtype == size.dtype and torch.equal(sizes[:, protected + keep.shape[1] :], total.squeeze(-1).float())
    assign = torch.randint(-1, n - 1, (batch, n), generator=g)
    assign[:, : n - 1] = torch.arange(n - 1)  # every slot filled, some tokens pruned
    expected = x.new_zeros(batch, n, 5).scatter_reduce(
        1, torch.where(assign < 0, n - 1, assign).unsqueeze(-1).expand(-1, -1, 5), x, "sum", include_self=False
    )[:, : n - 1]
    assert torch.equal(Assignment(assign, n - 1)(x, "sum"), expected)
