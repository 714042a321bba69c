"""Device → host synchronisations per forward pass, counted on the CPU: every scalar read
(``aten::_local_scalar_dense``, behind ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``), every
data-dependent shape (``aten::nonzero``: boolean indexing) and every ``.tolist()`` / ``.numpy()``
(which on a CPU tensor reach no aten op, so they are counted by wrapping them).  Fixed-count and
frozen methods read nothing back; adaptive ATM reads one count per block; ``last_stats`` reads
the recorded counts only when asked."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import atmerge
from atmerge.methods.registry import METHODS
from conftest import blocky_images, small_vit

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")


def count_syncs(model: torch.nn.Module, x: torch.Tensor, monkeypatch) -> dict[str, int]:
    """Synchronisations of one forward of ``model`` on x (after a warm-up forward)."""
    with torch.no_grad():
        model(x)
    calls = {"tolist": 0, "numpy": 0}
    for name in calls:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    monkeypatch.undo()
    counts = {op: sum(e.name == op for e in prof.events()) for op in SYNC_OPS}
    return {**counts, **calls}


FIXED_COUNT = {
    "tome": atmerge.ToMe(r=3),
    "topr": atmerge.TopR(r=3),
    "mctf": atmerge.MCTF(r=4),
    "evit": atmerge.EViT(keep_rate=0.7, locations=(2, 4)),
    "zerotp": atmerge.ZeroTP(r=3),
    "frozen": atmerge.Frozen(counts=(20, 10, 6, 4, 2, 0), split_layer=4),
}


def test_every_registered_method_is_covered():
    fixed = {name for name, cls in METHODS.items() if not cls.adaptive}
    assert fixed == set(FIXED_COUNT)
    assert {name for name, cls in METHODS.items() if cls.adaptive} == {"atm", "constant"}


@pytest.mark.parametrize("name", sorted(FIXED_COUNT))
@pytest.mark.parametrize("variant", [dict(), dict(class_token=False, global_pool="avg")], ids=["cls", "avg"])
def test_fixed_count_methods_never_synchronise(name, variant, monkeypatch):
    if name == "evit" and variant:
        pytest.skip("EViT needs a CLS token")
    model = atmerge.patch(small_vit(**variant), FIXED_COUNT[name])
    x = blocky_images(4, noise=0.1)
    assert count_syncs(model, x, monkeypatch) == {op: 0 for op in (*SYNC_OPS, "tolist", "numpy")}
    stats = atmerge.last_stats(model)  # read lazily, after the forward
    assert len(stats.tokens_per_block) == 6 and stats.gflops > 0


def test_frozen_atm_never_synchronises(monkeypatch):
    model = atmerge.patch(small_vit(), atmerge.ATM(alpha=0.9, beta=0.1, theta_min=0.3))
    x = blocky_images(4, noise=0.1)
    frozen = atmerge.freeze(model, x)
    atmerge.patch(model, frozen)
    assert sum(count_syncs(model, x, monkeypatch).values()) == 0


@pytest.mark.parametrize(
    "method",
    [
        atmerge.ATM(alpha=0.9, beta=0.1, theta_min=0.3),
        atmerge.ConstantThreshold(theta=0.5),
        atmerge.ATM(alpha=0.9, beta=0.1, theta_min=0.3, split_layer=0, similarity="centered"),
    ],
    ids=["atm", "constant", "atm-centered"],
)
def test_adaptive_methods_read_one_count_per_block(method, monkeypatch):
    model = atmerge.patch(small_vit(), method)
    x = blocky_images(4, noise=0.1)
    syncs = count_syncs(model, x, monkeypatch)
    decisions = 5  # depth 6; the last block keeps only CLS, no decision
    assert syncs["aten::_local_scalar_dense"] <= decisions
    assert syncs["aten::nonzero"] == syncs["tolist"] == syncs["numpy"] == 0


def test_per_image_atm_reads_one_count_per_block(monkeypatch):
    """batch_adaptive=False: each block's merge reads its output width and the real tokens left
    together (one read); the splits take their widths from the padded shape and packing the real
    tokens for the linear layers and the MLP (atmerge.core.packing) reads nothing more."""
    model = atmerge.patch(small_vit(), atmerge.ATM(alpha=0.9, beta=0.1, theta_min=0.3, batch_adaptive=False))
    syncs = count_syncs(model, blocky_images(4, noise=0.1), monkeypatch)
    decisions = 5  # depth 6; the last block keeps only CLS, no decision
    assert syncs["aten::_local_scalar_dense"] + syncs["tolist"] <= decisions
    assert syncs["aten::nonzero"] == syncs["numpy"] == 0


def test_last_stats_reads_after_the_forward_what_the_forward_recorded(monkeypatch):
    """The statistics of a padded batch are tensors until asked for; asking reads them (and gives
    the same numbers as before)."""
    model = atmerge.patch(small_vit(), atmerge.ATM(alpha=0.9, beta=0.1, theta_min=0.3, batch_adaptive=False))
    x = blocky_images(4, noise=0.1)
    with torch.no_grad():
        model(x)
    stats = atmerge.last_stats(model)
    assert stats.batch_size == 4 and stats.gflops <= stats.executed_gflops
    assert atmerge.last_stats(model) == stats
