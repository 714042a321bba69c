import torch

from atmerge.core.matching import alternate_split, best_match, center_keys, size_distinctive_split, take_tokens


def test_alternate_split_with_cls():
    a, b = alternate_split(7, 1)
    assert a.tolist() == [2, 4, 6] and b.tolist() == [1, 3, 5]


def test_alternate_split_with_cls_and_distillation_token():
    a, b = alternate_split(8, 2)
    assert a.tolist() == [2, 4, 6] and b.tolist() == [3, 5, 7]


def test_alternate_split_without_prefix():
    a, b = alternate_split(5, 0)
    assert a.tolist() == [0, 2, 4] and b.tolist() == [1, 3]


def test_size_distinctive_split_smaller_half_is_a():
    size = torch.tensor([[1.0, 3, 1, 2, 1, 5]])  # position 0 is CLS
    a, b = size_distinctive_split(size, 1)
    # sizes of 1..5: 3,1,2,1,5 -> stable order 2,4,3,1,5 -> A = first 2
    assert a.tolist() == [[2, 4]] and b.tolist() == [[3, 1, 5]]


def test_size_distinctive_split_is_per_image():
    size = torch.tensor([[1.0, 1, 4], [1.0, 4, 1]])
    a, b = size_distinctive_split(size, 0)
    assert a.tolist() == [[0], [0]] and b.tolist() == [[1, 2], [2, 1]]


def test_best_match_hand_case():
    # tokens: 0 CLS, 1 B(1,0), 2 A(1,0.1), 3 B(0,1), 4 A(-1,0)
    metric = torch.tensor([[[5.0, 5], [1, 0], [1, 0.1], [0, 1], [-1, 0]]])
    a, b = alternate_split(5, 1)
    scores, match = best_match(metric, a, b)
    cos = 1 / (1 + 0.01) ** 0.5
    assert torch.allclose(scores, torch.tensor([[cos, 0.0]]), atol=1e-6)
    assert match.tolist() == [[0, 1]]  # token 2 -> B[0] (token 1); token 4 -> B[1] (token 3, cos 0 > -1)
    assert scores[0, 1].abs() < 1e-6


def test_best_match_scores_clamped_and_empty_b():
    metric = torch.randn(2, 3, 4)
    scores, _ = best_match(metric, torch.tensor([0, 1]), torch.tensor([2]))
    assert scores.max() <= 1.0 and scores.min() >= -1.0
    scores, _ = best_match(metric, torch.tensor([0, 1]), torch.tensor([], dtype=torch.long))
    assert scores.shape == (2, 2) and torch.isinf(scores).all()


def test_center_keys_removes_size_weighted_patch_mean():
    metric = torch.randn(2, 6, 5)
    size = torch.tensor([[1.0, 1, 2, 3, 1, 1], [1.0, 4, 1, 1, 1, 2]])
    c = center_keys(metric, size, 1)
    weighted = (c[:, 1:] * size[:, 1:, None]).sum(1)
    assert torch.allclose(weighted, torch.zeros_like(weighted), atol=1e-5)
    assert torch.allclose(c[:, 0] - metric[:, 0], c[:, 1] - metric[:, 1])  # one shift per image


def test_take_tokens_shared_and_per_image_index():
    x = torch.arange(24.0).view(2, 4, 3)
    assert torch.equal(take_tokens(x, torch.tensor([3, 1])), x[:, [3, 1]])
    per = take_tokens(x, torch.tensor([[0], [2]]))
    assert torch.equal(per[0, 0], x[0, 0]) and torch.equal(per[1, 0], x[1, 2])
