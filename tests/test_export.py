"""Export of fixed-count and frozen patched models: torch.export and ONNX (onnxruntime output equal
to eager PyTorch to 1e-4); an adaptive method is refused with a one-line error."""

import importlib.util

import pytest
import timm
import torch

import atmerge
from atmerge.export import export_onnx, export_program
from conftest import blocky_images

HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(
    not HAS_ONNX, reason="ONNX export needs the export extra: pip install 'atmerge[export]'"
)


def tiny_vit(**kwargs) -> torch.nn.Module:
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10, **kwargs
    ).eval()


def frozen_atm() -> atmerge.Frozen:
    model = atmerge.patch(tiny_vit(), atmerge.ATM(alpha=0.9, beta=0.1, theta_min=0.2, split_layer=1))
    return atmerge.freeze(model, blocky_images(8, cells=2, noise=0.05))


METHODS = {
    "tome": lambda: atmerge.ToMe(r=2),
    "frozen-atm": frozen_atm,
    "mctf": lambda: atmerge.MCTF(r=2, blocks=(1, 2, 3)),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_torch_export_equals_eager(name):
    torch.manual_seed(0)
    model = atmerge.patch(tiny_vit(), METHODS[name]())
    x = blocky_images(3, cells=4, noise=0.1)
    program = export_program(model, x)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-6)


@needs_onnx
@pytest.mark.parametrize("name, dynamic_batch", [("tome", True), ("frozen-atm", False), ("mctf", False)])
def test_onnxruntime_equals_eager(name, dynamic_batch, tmp_path):
    import onnxruntime

    torch.manual_seed(0)
    model = atmerge.patch(tiny_vit(), METHODS[name]())
    x = blocky_images(3, cells=4, noise=0.1)
    path = export_onnx(model, tmp_path / "model.onnx", x, dynamic_batch=dynamic_batch)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for images in [x, blocky_images(5, cells=8, noise=0.3, seed=4)] if dynamic_batch else [x]:
        with torch.no_grad():
            expected = model(images).numpy()
        got = session.run(None, {"images": images.numpy()})[0]
        assert abs(got - expected).max() < 1e-4
    assert atmerge.is_patched(model) and all(getattr(m, "fused_attn", True) for m in model.modules())


@needs_onnx
def test_an_unpatched_model_exports_the_same_way(tmp_path):
    import onnxruntime

    model = tiny_vit()
    x = blocky_images(2)
    session = onnxruntime.InferenceSession(str(export_onnx(model, tmp_path / "dense.onnx", x)))
    with torch.no_grad():
        assert abs(session.run(None, {"images": x.numpy()})[0] - model(x).numpy()).max() < 1e-4


@pytest.mark.parametrize("method", [atmerge.ATM(), atmerge.ConstantThreshold(theta=0.9)], ids=["atm", "constant"])
def test_exporting_an_adaptive_method_is_refused(method, tmp_path):
    model = atmerge.patch(tiny_vit(), method)
    for call in (
        lambda: export_onnx(model, tmp_path / "m.onnx", blocky_images(2)),
        lambda: export_program(model, blocky_images(2)),
    ):
        with pytest.raises(ValueError, match="is adaptive") as e:
            call()
        assert "\n" not in str(e.value) and "atmerge.freeze" in str(e.value)


@needs_onnx
def test_a_saved_frozen_config_exports_and_an_adaptive_one_is_refused(tmp_path):
    import onnxruntime
    from atmerge.config import save_method
    from atmerge.export import export_config

    torch.manual_seed(0)
    model = tiny_vit()
    frozen = save_method(tmp_path / "frozen.json", model, frozen_atm())
    path = export_config(frozen, model, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(path))
    x = blocky_images(4, noise=0.2)
    with torch.no_grad():
        assert abs(session.run(None, {"images": x.numpy()})[0] - model(x).numpy()).max() < 1e-4
    adaptive = save_method(tmp_path / "atm.json", atmerge.unpatch(model), atmerge.ATM())
    with pytest.raises(ValueError, match="ATM is adaptive"):
        export_config(adaptive, model, tmp_path / "atm.onnx")
    assert not atmerge.is_patched(model)


@needs_onnx
def test_calibrate_freeze_then_export_from_the_command_line(tmp_path, capsys):
    """`atmerge calibrate --freeze` saves fixed counts, `atmerge export` writes them as ONNX, and
    onnxruntime gives the frozen patched model's outputs; the adaptive config is refused."""
    import json
    import shutil

    import onnxruntime
    from atmerge import data
    from atmerge.cli import main
    from atmerge.config import load_method
    from atmerge.experiments.setup import load_setup

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, f in enumerate(sorted(data.EMBEDDED_SAMPLE.rglob("*.jpg"))[::50][:20]):
        shutil.copy(f, folder / f"{i}.jpg")
    common = ["--data", str(folder), "--budget", "0.6", "--trials", "3", "--no-progress"]
    assert main(["calibrate", *common, "--out", str(tmp_path / "adaptive")]) in (0, 1)
    assert main(["calibrate", *common, "--freeze", "--out", str(tmp_path / "frozen")]) in (0, 1)
    frozen_cfg, adaptive_cfg = tmp_path / "frozen" / "calibration.json", tmp_path / "adaptive" / "calibration.json"
    saved = json.loads(frozen_cfg.read_text())
    assert saved["method"]["name"] == "frozen", saved["method"]
    assert main(["export", "--config", str(frozen_cfg), "--out", str(tmp_path / "m.onnx")]) == 0
    assert main(["export", "--config", str(adaptive_cfg), "--out", str(tmp_path / "a.onnx")]) == 2
    assert "freeze it first" in capsys.readouterr().err
    model = load_setup(None).model
    atmerge.patch(model, load_method(frozen_cfg, model))
    x = blocky_images(3, size=32, noise=0.2)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    with torch.no_grad():
        assert abs(session.run(None, {"images": x.numpy()})[0] - model(x).numpy()).max() < 1e-4
