"""checkpoints.load_checkpoint and checkpoints.load_weights: the checkpoint formats official
repositories publish (safetensors; PyTorch files holding a state dict, or a dict with it under
"model", "state_dict" or the EMA keys; "module." prefixes), a model family's
``convert_checkpoint``, and the one-line errors for files that cannot be loaded.  Every model is a tiny random-init timm ViT."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from atmerge import checkpoints

NAME = "vit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=8, depth=2, num_classes=10)


def tiny(seed: int, name: str = NAME, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **{**TINY, **kwargs}).eval()


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    """The model whose weights are saved; a fresh tiny() differs from it (other seed)."""
    return tiny(seed=1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def outputs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


def one_line_error(error: type[Exception], call) -> str:
    """The message of the ``error`` that ``call()`` raises, checked to be one line."""
    with pytest.raises(error) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message and raised.value.__cause__ is None
    return message


# (file name, what torch.save / save_file writes, given the state dict)
FORMATS = {
    "plain .pth": ("w.pth", lambda s: s),
    "model (DeiT, MAE)": ("w.pth", lambda s: {"model": s, "epoch": 299}),
    "state_dict (timm, LV-ViT)": ("w.pth", lambda s: {"state_dict": s, "arch": "lvvit_s", "epoch": 5}),
    "module. prefix": ("w.pth", lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}}),
    ".pth.tar (T2T-ViT)": ("w.pth.tar", lambda s: {"state_dict_ema": s}),
    ".pt": ("w.pt", lambda s: s),
    ".bin": ("pytorch_model.bin", lambda s: s),
    "legacy torch.save": ("w.pth", lambda s: s),
    "safetensors": ("w.safetensors", lambda s: s),
    "safetensors named .pth": ("w.pth", lambda s: s),
    "torch file named .safetensors": ("w.safetensors", lambda s: {"model": s}),
    "safetensors with module. prefix": ("w.safetensors", lambda s: {f"module.{k}": v for k, v in s.items()}),
}


def save(obj: object, path, safetensors: bool = False, legacy: bool = False) -> None:
    if safetensors:
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


@pytest.mark.parametrize("fmt", FORMATS)
def test_formats_round_trip(fmt, source, images, tmp_path):
    file_name, wrap = FORMATS[fmt]
    path = tmp_path / file_name
    safetensors = fmt.startswith("safetensors")
    save(wrap(source.state_dict()), path, safetensors=safetensors, legacy=fmt == "legacy torch.save")

    model = checkpoints.load_checkpoint(NAME, path, **TINY)

    assert not model.training
    assert not torch.equal(outputs(tiny(seed=2), images), outputs(source, images))  # the load matters
    assert torch.equal(outputs(model, images), outputs(source, images))


@pytest.mark.parametrize(
    "held, taken",
    [
        (("model", "state_dict", "model_ema", "state_dict_ema"), "model"),
        (("state_dict", "model_ema", "state_dict_ema"), "state_dict"),
        (("model_ema", "state_dict_ema"), "model_ema"),
        (("state_dict_ema",), "state_dict_ema"),
        (("model_ema", "model"), "model"),  # the order of the keys in the file does not matter
    ],
)
def test_ema_preference(held, taken, images, tmp_path):
    """ "model", then "state_dict", then the EMA weights "model_ema", "state_dict_ema"."""
    models = {key: tiny(seed=10 + i) for i, key in enumerate(held)}
    torch.save({key: m.state_dict() for key, m in models.items()}, tmp_path / "w.pth")

    model = checkpoints.load_checkpoint(NAME, tmp_path / "w.pth", **TINY)

    assert torch.equal(outputs(model, images), outputs(models[taken], images))


def test_non_tensor_entries_are_skipped(source, images, tmp_path):
    """A key of the preference order that holds something else than a state dict is passed over."""
    torch.save({"model": None, "state_dict": {"epoch": 3}, "model_ema": source.state_dict()}, tmp_path / "w.pth")
    model = checkpoints.load_checkpoint(NAME, tmp_path / "w.pth", **TINY)
    assert torch.equal(outputs(model, images), outputs(source, images))


class TrainingArgs:
    """Stands for a class a training script pickles into its checkpoints (argparse.Namespace, ...)."""

    lr = 0.1


def test_pickled_class_refused(source, tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"model": source.state_dict(), "args": TrainingArgs()}, path)

    message = one_line_error(ValueError, lambda: checkpoints.load_checkpoint(NAME, path, **TINY))

    assert "needs code to unpickle" in message and "TrainingArgs" in message
    assert "atmerge loads weights only" in message and "state_dict" in message


def test_wrong_depth_names_missing_keys(tmp_path):
    torch.save({"model": tiny(seed=1, name="deit_tiny_patch16_224").state_dict()}, tmp_path / "deit.pth")

    deeper = {**TINY, "depth": 3}
    message = one_line_error(ValueError, lambda: checkpoints.load_checkpoint(NAME, tmp_path / "deit.pth", **deeper))

    assert message.startswith(f"checkpoint {tmp_path / 'deit.pth'} does not fit {NAME} with")
    assert "keys missing: 12 (blocks.2.norm1.weight, blocks.2.norm1.bias, blocks.2.attn.qkv.weight, ...)" in message
    assert "unexpected: 0" in message and "--model-kwargs" in message


def test_wrong_family_names_unexpected_keys_and_shapes(tmp_path):
    """A distilled DeiT has a distillation token and head; another embed_dim changes every shape."""
    state = tiny(seed=1, name="deit_tiny_distilled_patch16_224").state_dict()
    save_file(state, str(tmp_path / "deit.safetensors"))

    message = one_line_error(
        ValueError,
        lambda: checkpoints.load_checkpoint(NAME, tmp_path / "deit.safetensors", **{**TINY, "embed_dim": 96}),
    )

    assert "keys missing: 0" in message
    assert "unexpected: 3 (dist_token, head_dist.bias, head_dist.weight)" in message  # safetensors sorts its keys
    assert "shape mismatches: 31 (cls_token 1x1x192 in the checkpoint vs 1x1x96 in the model, " in message
    assert "pos_embed 1x18x192 in the checkpoint vs 1x17x96 in the model" in message


def test_dict_without_state_dict_names_keys(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}, "best_acc": 0.5}, tmp_path / "w.pth")

    message = one_line_error(ValueError, lambda: checkpoints.load_checkpoint(NAME, tmp_path / "w.pth", **TINY))

    assert "holds no state dict: a dict with keys 'epoch', 'optimizer', 'best_acc'" in message
    assert "'model', 'state_dict', 'model_ema', 'state_dict_ema'" in message


def test_unreadable_files(tmp_path):
    """Missing, a folder, another format, damaged files, and a file that holds no dict."""
    (tmp_path / "notes.txt").write_text("not weights")
    torch.save({"model": tiny(seed=1).state_dict()}, tmp_path / "w.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "w.pth").read_bytes()[:200])
    save_file(tiny(seed=1).state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "truncated.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:100])
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    cases = [
        ("missing.pth", FileNotFoundError, "missing.pth not found"),
        (".", ValueError, "is not a file; pass a .safetensors file or a PyTorch file (.pth, .pth.tar, .pt, .bin)"),
        ("notes.txt", ValueError, "is not a safetensors file nor a PyTorch file"),
        ("truncated.pth", ValueError, "is not a safetensors file nor a readable PyTorch file"),
        ("truncated.safetensors", ValueError, "is not a safetensors file that can be read"),
        ("tensor.pth", ValueError, "holds a Tensor, not a state dict"),
    ]
    for name, error, fragment in cases:
        path = tmp_path / name
        assert fragment in one_line_error(error, lambda: checkpoints.load_checkpoint(NAME, path, **TINY)), name


class RenamingViT(VisionTransformer):
    """A model family whose official checkpoints name the blocks 'layers' and the head 'fc'."""

    @staticmethod
    def convert_checkpoint(state: dict) -> dict:
        renamed = {k.replace("layers.", "blocks.", 1): v for k, v in state.items()}
        return {("head." + k[3:] if k.startswith("fc.") else k): v for k, v in renamed.items()}


class RenamingViTClassmethod(VisionTransformer):
    prefix = "encoder."

    @classmethod
    def convert_checkpoint(cls, state: dict) -> dict:
        return {k.removeprefix(cls.prefix): v for k, v in state.items()}


def official_keys(state: dict, model_class: type) -> dict:
    """The state dict named as ``model_class``'s official checkpoints name it."""
    if model_class is RenamingViT:
        renamed = {k.replace("blocks.", "layers.", 1): v for k, v in state.items()}
        return {("fc." + k[5:] if k.startswith("head.") else k): v for k, v in renamed.items()}
    return {RenamingViTClassmethod.prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize("model_class", [RenamingViT, RenamingViTClassmethod])
def test_convert_checkpoint_applied(model_class, images, tmp_path):
    settings = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    torch.manual_seed(1)
    trained = model_class(**settings).eval()
    torch.save({"model": official_keys(trained.state_dict(), model_class)}, tmp_path / "official.pth")
    torch.manual_seed(2)
    model = model_class(**settings).eval()

    assert checkpoints.load_weights(model, tmp_path / "official.pth") is model
    assert torch.equal(outputs(model, images), outputs(trained, images))

    plain = VisionTransformer(**settings).eval()  # no convert_checkpoint: the official names do not fit
    message = one_line_error(ValueError, lambda: checkpoints.load_weights(plain, tmp_path / "official.pth"))
    assert "does not fit VisionTransformer" in message and "keys missing: " in message
