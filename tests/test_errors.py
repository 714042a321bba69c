"""Bad input gets a clear error that names the bad value and what is allowed."""

import pytest
import torch
from torch import nn

import atmerge
from atmerge import data
from conftest import small_vit


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=1.5), r"alpha=1.5 is out of range; allowed \[0.0, 1.0\]"),
        (dict(alpha=-0.1), r"alpha=-0.1 is out of range"),
        (dict(beta=-0.01), r"beta=-0.01 is out of range"),
        (dict(theta_min=2), r"theta_min=2 is out of range"),
        (dict(alpha=float("nan")), r"alpha must be a finite number"),
        (dict(alpha="0.9"), r"alpha must be a finite number, got '0.9'"),
        (dict(split_layer=-1), r"split_layer must be None or an integer >= 0, got -1"),
        (dict(split_layer=2.5), r"split_layer must be None or an integer >= 0, got 2.5"),
        (dict(similarity="dot"), r"similarity='dot' is not supported; choose one of \('raw', 'centered'\)"),
    ],
)
def test_atm_settings_out_of_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        atmerge.ATM(**kwargs)


def test_split_layer_beyond_depth():
    with pytest.raises(ValueError, match=r"split_layer=7 is beyond the model's depth; allowed 0..6"):
        atmerge.patch(small_vit(), atmerge.ATM(split_layer=7))
    atmerge.patch(small_vit(), atmerge.ATM(split_layer=6))  # depth itself is allowed


def test_non_vit_model():
    with pytest.raises(atmerge.UnsupportedModelError, match="timm VisionTransformer.*got Sequential"):
        atmerge.patch(nn.Sequential(nn.Linear(2, 2)), atmerge.ATM())
    with pytest.raises(atmerge.UnsupportedModelError, match="got Sequential"):
        atmerge.gflops(nn.Sequential(nn.Linear(2, 2)))


def test_unsupported_pooling():
    with pytest.raises(
        atmerge.UnsupportedModelError, match="global_pool='max' is not supported; supported: 'token', 'avg', 'map'"
    ):
        atmerge.patch(small_vit(global_pool="max"), atmerge.ATM())


def test_method_must_be_a_method():
    with pytest.raises(TypeError, match="method must be an atmerge method.*got dict"):
        atmerge.patch(small_vit(), {"alpha": 0.9})


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (2, 1, 32, 32), (3, 32, 32)])
def test_wrong_image_size(shape):
    model = atmerge.patch(small_vit(), atmerge.ATM())
    with pytest.raises(ValueError, match=r"images of shape .* given; this model takes \[B, 3, 32, 32\]"):
        model(torch.randn(*shape))


def test_wrong_input_size_for_gflops():
    with pytest.raises(
        ValueError, match=r"images of shape \[1, 3, 224, 224\] given; this model takes \[B, 3, 32, 32\]"
    ):
        atmerge.gflops(small_vit())


def test_gflops_of_patched_model_points_to_last_stats():
    with pytest.raises(ValueError, match="last_stats"):
        atmerge.gflops(atmerge.patch(small_vit(), atmerge.ATM()), (3, 32, 32))


def test_last_stats_needs_a_patched_model_and_a_forward():
    with pytest.raises(ValueError, match="not patched"):
        atmerge.last_stats(small_vit())
    with pytest.raises(RuntimeError, match="no complete forward pass"):
        atmerge.last_stats(atmerge.patch(small_vit(), atmerge.ATM()))


def test_missing_data_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass a folder of class folders"):
        data.image_folder(tmp_path / "nope", None)


def test_missing_shared_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ATMERGE_SHARED", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="set ATMERGE_SHARED"):
        data.cifar10_folder("test")
