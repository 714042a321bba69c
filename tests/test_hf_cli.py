"""`--hf-model`: Hugging Face models from a save_pretrained directory through the command line,
their fingerprint in calibration configs, and the README's snippet for them.  Tiny models with
random weights saved to tmp_path; no downloads."""

import json
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import atmerge  # noqa: E402
from atmerge.cli import main  # noqa: E402
from atmerge.config import FingerprintWarning, model_fingerprint  # noqa: E402
from atmerge.experiments.hf import ProcessorTransform, load_hf_model, model_class  # noqa: E402

README = Path(__file__).resolve().parents[1] / "docs" / "usage.md"  # the snippet lives in the docs
PLACEHOLDER = "path/to/saved-vit"
TINY = dict(
    image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
)


def processor() -> object:
    return transformers.ViTImageProcessor(size={"height": 32, "width": 32})


def save(model: torch.nn.Module, folder: Path, with_processor: bool = True) -> Path:
    """``model`` (and a 32×32 image processor) written by save_pretrained into ``folder``."""
    model.save_pretrained(folder)
    if with_processor:
        processor().save_pretrained(folder)
    return folder


def classifier(seed: int = 0, **changes) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.ViTConfig(**{**TINY, **changes}, num_labels=3)
    return transformers.ViTForImageClassification(config).eval()


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    return save(classifier(), tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """3 class folders of 4 random 40×48 PNG images (the processor resizes them to 32×32)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir()
        for i in range(4):
            pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def eval_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "--hf-model",
        str(model_dir),
        "--data",
        str(data),
        "--method",
        "tome",
        "--r",
        "2",
        "--batch-size",
        "4",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def test_eval_of_a_saved_classifier(vit_dir, image_folder, tmp_path, capsys):
    assert main(eval_args(vit_dir, image_folder, tmp_path)) == 0
    result = _json(tmp_path / "eval.json")
    model = transformers.ViTForImageClassification.from_pretrained(vit_dir).eval()
    assert result["images"] == 12
    assert result["setup"] == {"hf_model": str(vit_dir), "class": "ViTForImageClassification"}
    assert result["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    assert result["baseline"]["gflops"] == pytest.approx(atmerge.gflops(model, (3, 32, 32)))
    assert result["merged"]["gflops"] < result["baseline"]["gflops"]
    assert result["baseline"]["tokens_per_block"] == [17, 17]  # 16 patches + CLS
    assert result["merged"]["tokens_per_block"] == [17, 15]  # ToMe r = 2
    for run in ("baseline", "merged"):
        assert result[run]["top1"] <= result[run]["top5"] == 1.0  # 3 classes: top-5 holds them all
    assert 0 < result["merged"]["output_cosine"] <= 1 + 1e-6
    assert "difference: top-1" in capsys.readouterr().out


def test_the_images_are_preprocessed_by_the_models_own_processor(vit_dir, image_folder):
    from atmerge.experiments.setup import load_dataset, load_setup

    setup = load_setup(hf_model=str(vit_dir))
    assert isinstance(setup.transform, ProcessorTransform) and not setup.model.training
    x, label = load_dataset(setup, image_folder)[5]
    from PIL import Image

    with Image.open(sorted((image_folder / "b").iterdir())[1]) as img:
        expected = processor()(images=img.convert("RGB"), return_tensors="pt")["pixel_values"][0]
    assert label == 1 and x.shape == (3, 32, 32) and torch.equal(x, expected)
    assert setup.transform.normalization == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # ViTImageProcessor's


def test_eval_of_a_feature_model_reports_fidelity_only(image_folder, tmp_path):
    torch.manual_seed(0)
    config = transformers.Dinov2Config(**{k: v for k, v in TINY.items() if k != "intermediate_size"})
    model_dir = save(transformers.Dinov2Model(config).eval(), tmp_path / "dinov2")
    assert main(eval_args(model_dir, image_folder, tmp_path / "out")) == 0
    result = _json(tmp_path / "out" / "eval.json")
    assert result["setup"]["class"] == "Dinov2Model" and result["images"] == 12
    for run in ("baseline", "merged"):
        assert result[run]["top1"] is None and result[run]["top5"] is None  # features: no classes
    assert result["difference"]["top1"] is None
    assert result["merged"]["tokens_per_block"] == [17, 15]
    assert 0 < result["merged"]["output_cosine"] <= 1 + 1e-6 and result["baseline"]["output_cosine"] is None


def test_the_saved_architecture_is_the_class_loaded():
    """The class a checkpoint was saved as where transformers has it, else an Auto class."""
    config = transformers.ViTConfig(**TINY)
    assert model_class(config, transformers) is transformers.AutoModel  # architectures unknown
    config.architectures = ["CLIPVisionModelWithProjection"]  # AutoModel would drop the projection
    assert model_class(config, transformers) is transformers.CLIPVisionModelWithProjection
    config.architectures = ["MyViTForImageClassification"]  # not a transformers class
    assert model_class(config, transformers) is transformers.AutoModelForImageClassification


def test_bad_hf_model_options_give_one_line_errors(vit_dir, image_folder, tmp_path, capsys):
    def error(args: list[str]) -> str:
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err  # transformers' progress bars, then the error
        assert "Traceback" not in err and err.endswith("\n") and err.count("atmerge eval: error:") == 1
        line = err[err.index("atmerge eval: error:") :].rstrip("\n")
        assert "\n" not in line
        return line

    bare = save(classifier(), tmp_path / "bare", with_processor=False)
    err = error(eval_args(bare, image_folder, tmp_path / "out"))
    assert f"--hf-model {bare} has no image processor config (preprocessor_config.json)" in err
    assert f"processor.save_pretrained('{bare}')" in err
    err = error(eval_args(vit_dir, image_folder, tmp_path / "out", "--model", "vit_tiny_patch16_224"))
    assert f"--hf-model {vit_dir} cannot be combined with --model" in err
    err = error(eval_args(vit_dir, image_folder, tmp_path / "out", "--checkpoint", "w.safetensors"))
    assert "cannot be combined with --checkpoint" in err
    err = error(eval_args(tmp_path / "missing", image_folder, tmp_path / "out"))
    assert f"--hf-model directory {tmp_path / 'missing'} does not exist" in err
    err = error(eval_args(image_folder, image_folder, tmp_path / "out"))
    assert f"--hf-model {image_folder} has no config.json" in err
    err = error(["eval", "--hf-model", str(vit_dir), "--no-progress", "--out", str(tmp_path / "out")])
    assert "no data given: pass --data" in err
    torch.manual_seed(0)
    bert = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50
    )
    err = error(eval_args(save(transformers.BertModel(bert), tmp_path / "bert"), image_folder, tmp_path / "out"))
    assert f"--hf-model {tmp_path / 'bert'}:" in err and "BertModel" in err


def test_fingerprint_of_a_hf_model(vit_dir, tmp_path):
    """A config calibrated on an HF model loads on the same model (built in code or loaded from
    its directory) without a warning, and warns on another one."""
    model = load_hf_model(str(vit_dir))
    fingerprint = model_fingerprint(model)
    assert {k: v for k, v in fingerprint.items() if k != "weights_sha256"} == {
        "class": "ViTForImageClassification",
        "architecture": "ViTForImageClassification",
        "input_size": [32, 32],
        "patch_size": [8, 8],
        "hidden_size": 64,
        "layers": 2,
    }
    assert model_fingerprint(classifier())["architecture"] == "vit"  # not saved yet: its model_type
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    c = atmerge.calibrate(model, images, method="tome", budget=0.8, trials=2, batch_size=8)
    path = atmerge.save_config(tmp_path / "tome.json", model, c)
    assert _json(path)["model"] == fingerprint
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same model: no warning
        assert atmerge.load_method(path, model) == c.method
        assert atmerge.load_method(path, classifier()) == c.method  # the same weights, built in code
    with pytest.warns(FingerprintWarning, match=r"differs in weights_sha256\)"):
        atmerge.load_method(path, classifier(seed=1))
    with pytest.warns(FingerprintWarning, match=r"differs in hidden_size, weights_sha256\)"):
        atmerge.load_method(path, classifier(hidden_size=32))
    with pytest.warns(FingerprintWarning, match=r"differs in class, .*layers"):
        atmerge.load_method(path, transformers.ViTModel(transformers.ViTConfig(**{**TINY, "num_hidden_layers": 3})))


def test_calibrate_then_eval_with_the_config(vit_dir, image_folder, tmp_path):
    args = [
        "calibrate",
        "--hf-model",
        str(vit_dir),
        "--data",
        str(image_folder),
        "--budget",
        "0.8",
        "--trials",
        "2",
        "--method",
        "tome",
        "--batch-size",
        "4",
        "--no-progress",
        "--out",
        str(tmp_path / "cal"),
    ]
    code = main(args)  # 1 where the goal was not met on these few images: the config is written either way
    config = tmp_path / "cal" / "calibration.json"
    assert code == (0 if _json(config)["calibration"]["met"] else 1)
    assert _json(config)["model"]["architecture"] == "ViTForImageClassification"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FingerprintWarning)
        assert main(eval_args(vit_dir, image_folder, tmp_path / "eval", "--config", str(config))) == 0
    assert _json(tmp_path / "eval" / "eval.json")["method"]["method"] == "tome"


@pytest.mark.parametrize(
    "args, written",
    [
        (["search", "--trials", "2", "--method", "tome"], "search.json"),
        (["analyze", "split-layer"], "split_layer.json"),
        (["visualize", "--versus", "tome", "--steps", "2", "--method", "tome", "--r", "3"], "visualize.png"),
    ],
)
def test_other_sub_commands_take_hf_model(args, written, vit_dir, image_folder, tmp_path):
    data = (
        ["--data", str(image_folder / "a" / "0.png")]
        if args[0] == "visualize"
        else ["--data", str(image_folder), "--no-progress"]
    )
    assert main([*args, "--hf-model", str(vit_dir), *data, "--out", str(tmp_path)]) == 0
    assert (tmp_path / written).is_file()
    if args[0] == "visualize":
        assert _json(tmp_path / "visualize.json")["tokens_left"]["ToMe"] == [14]  # 17 tokens, r = 3 in block 1
    else:
        assert _json(tmp_path / written)["setup"]["hf_model"] == str(vit_dir)


def test_info_loss_and_finetune_refuse_hf_model(vit_dir, tmp_path, capsys):
    assert main(["analyze", "info-loss", "--hf-model", str(vit_dir), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "analyze info-loss reads a timm model's pre-logits feature; it does not take --hf-model" in err
    with pytest.raises(SystemExit):  # finetune's recipe is timm's: no such flag
        main(["finetune", "--hf-model", str(vit_dir)])


def readme_snippet() -> str:
    """The code block right below ``<!-- hf-snippet -->`` in docs/usage.md, dedented."""
    text = README.read_text()
    found = re.search(r"<!-- hf-snippet -->\n( *)```python\n(.*?)\n\1```", text, re.S)
    assert found, "docs/usage.md has no ```python block right below <!-- hf-snippet -->"
    return textwrap.dedent(found.group(2))


def test_the_readme_snippet_runs_on_a_locally_saved_model(vit_dir, capsys):
    code = readme_snippet()
    assert code.count(PLACEHOLDER) == 1
    exec(compile(code.replace(PLACEHOLDER, str(vit_dir)), "docs/usage.md <!-- hf-snippet -->", "exec"), {})
    printed = capsys.readouterr().out.split()
    model = transformers.ViTForImageClassification.from_pretrained(vit_dir).eval()
    assert printed[:2] == ["torch.Size([1,", "3])"] and len(printed) == 3  # logits of 3 classes, then GFLOPs
    assert 0 < float(printed[2]) <= atmerge.gflops(model, (3, 32, 32))


def test_atmerge_never_imports_transformers_without_hf_model():
    code = (
        "import sys, atmerge, atmerge.cli, atmerge.config, atmerge.experiments.hf, atmerge.experiments.setup; "
        "atmerge.cli.build_parser(); print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
