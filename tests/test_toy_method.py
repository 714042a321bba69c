"""Adding a method is one file: a toy method defined in this test file alone (a dataclass with
``decide``, ``search_space`` and ``one_knob``, registered with ``register_method``) runs through
``atmerge.patch``, ``atmerge.calibrate``, configs and the command line, with no edit elsewhere."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import pytest
import torch

import atmerge
from atmerge import data
from atmerge.cli import main
from atmerge.methods.base import METHODS, BlockContext, Decision, Method, knob_r, register_method
from atmerge.methods.bipartite import match_tokens
from atmerge.methods.registry import build_method
from atmerge.methods.space import ints
from conftest import blocky_images, small_vit


@dataclass(frozen=True)
class MergeInFirstBlocks(Method):
    """ToMe's matching, but only in the first ``blocks`` blocks, ``r`` pairs each."""

    r: int = 2
    blocks: int = 2
    display_name = "toy: first blocks only"

    @classmethod
    def search_space(cls, depth, num_patches, profile=None):
        return {"r": ints(0, 8)}

    @classmethod
    def one_knob(cls, t, depth, num_patches, **fixed):
        return cls(r=knob_r(t, num_patches), **fixed)

    def decide(self, ctx: BlockContext) -> Decision:
        r = self.r if ctx.block < self.blocks else 0
        return match_tokens(ctx).decision(r, ctx.num_protected, requested=r)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    """``@register_method("toyfirst")`` on the class, done here so that the registry's other
    users (tests iterating over every registered method) never see the toy."""
    register_method("toyfirst")(MergeInFirstBlocks)
    yield
    METHODS.pop("toyfirst", None)


def test_the_toy_method_patches_merges_where_it_says_and_unpatches():
    model = small_vit()
    x = blocky_images(4)
    with torch.no_grad():
        dense = model(x)
        atmerge.patch(model, build_method("toyfirst", r=3))
        model(x)
        stats = atmerge.last_stats(model)
        atmerge.unpatch(model)
        again = model(x)
    assert stats.merged_per_block[:2] == [3, 3] and set(stats.merged_per_block[2:]) == {0}
    assert torch.equal(dense, again)


def test_the_toy_method_calibrates_and_its_config_round_trips(tmp_path):
    model = small_vit()
    images = blocky_images(16)
    c = atmerge.calibrate(model, images, method=MergeInFirstBlocks(), budget=0.95, trials=3, seed=0)
    assert isinstance(c.method, MergeInFirstBlocks)
    path = atmerge.save_config(tmp_path / "toy.json", model, c, "16 blocky images")
    assert atmerge.load_method(path, model) == c.method


def test_the_toy_method_runs_from_the_command_line(tmp_path, capsys):
    assert (
        main(
            [
                "eval",
                "--limit",
                "8",
                "--method",
                "toyfirst",
                "--r",
                "2",
                "--no-progress",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["method"] == {"method": "toyfirst", "r": 2, "blocks": 2}
    assert result["merged"]["tokens_per_block"][:3] == [65, 63, 61]
    assert "toy: first blocks only" in capsys.readouterr().out
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, f in enumerate(sorted(data.EMBEDDED_SAMPLE.rglob("*.jpg"))[::100][:10]):
        shutil.copy(f, folder / f"{i}.jpg")
    assert main(
        [
            "calibrate",
            "--data",
            str(folder),
            "--method",
            "toyfirst",
            "--budget",
            "0.95",
            "--trials",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path / "cal"),
        ]
    ) in (0, 1)
    saved = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert saved["method"]["name"] == "toyfirst"
