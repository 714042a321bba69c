"""Class folders are matched to the model's own classes by name (never numbered 0, 1, ... in
folder order): a subset of classes scores exactly as the same images within all ten folders,
and folders that cannot be matched are refused with one line naming them."""

import json
import shutil

import pytest
import torch

from atmerge import data
from atmerge.cli import main

PER_CLASS = 6


def _copy(dest, classes, rename=None):
    """The first PER_CLASS images of each of ``classes`` from the CIFAR-10 sample the package ships."""
    for c in classes:
        target = dest / (rename or {}).get(c, c)
        target.mkdir(parents=True)
        for f in sorted((data.EMBEDDED_SAMPLE / c).iterdir())[:PER_CLASS]:
            shutil.copy(f, target / f.name)
    return dest


def _eval(folder, out, *extra):
    args = ["eval", "--data", str(folder), "--batch-size", "4", "--no-progress", "--out", str(out), *extra]
    assert main(args) == 0
    return json.loads((out / "eval.json").read_text())


@torch.no_grad()
def test_two_class_folder_scores_as_within_all_ten(tmp_path):
    result = _eval(_copy(tmp_path / "two", ["cat", "dog"]), tmp_path / "out")
    assert result["data"]["classes"] == {"cat": 3, "dog": 5} and result["images"] == 2 * PER_CLASS
    # the same images inside all ten class folders, numbered by torchvision's ImageFolder itself
    ten = _copy(tmp_path / "ten", list(data.CIFAR10_CLASSES))
    full = data.image_folder(ten, data.cifar10_transform())
    idx = [i for i, (_, y) in enumerate(full.samples) if full.classes[y] in ("cat", "dog")]
    import atmerge
    from atmerge import checkpoints

    model = checkpoints.cifar10_reference_vit()
    batches = list(torch.utils.data.DataLoader(torch.utils.data.Subset(full, idx), batch_size=4))
    dense = sum((model(x).argmax(-1) == y).sum().item() for x, y in batches) / len(idx)
    atmerge.patch(model, atmerge.ATM())
    merged = sum((model(x).argmax(-1) == y).sum().item() for x, y in batches) / len(idx)
    assert result["baseline"]["top1"] == dense and result["merged"]["top1"] == merged
    assert 0 < dense  # not the 0.02 of folders numbered 0 and 1


def test_unknown_class_names_are_refused(tmp_path, capsys):
    folder = _copy(tmp_path / "d", ["cat", "dog"], rename={"cat": "kitten", "dog": "puppy"})
    assert main(["eval", "--data", str(folder), "--no-progress", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'kitten', 'puppy'" in err and "match none of the model's 10 class names" in err
    assert "--class-map" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_class_map_file(tmp_path, capsys):
    folder = _copy(tmp_path / "d", ["cat", "dog"], rename={"cat": "kitten", "dog": "puppy"})
    named = _eval(_copy(tmp_path / "named", ["cat", "dog"]), tmp_path / "o1")
    (tmp_path / "map.json").write_text(json.dumps({"kitten": 3, "puppy": 5}))
    mapped = _eval(folder, tmp_path / "o2", "--class-map", str(tmp_path / "map.json"))
    assert mapped["baseline"]["top1"] == named["baseline"]["top1"] and mapped["data"]["classes"] == {
        "kitten": 3,
        "puppy": 5,
    }
    (tmp_path / "bad.json").write_text(json.dumps({"kitten": 3, "puppy": 12}))
    assert main(["eval", "--data", str(folder), "--class-map", str(tmp_path / "bad.json"), "--no-progress"]) == 2
    assert "'puppy': 12 is not a class index of the model; allowed: integers 0 to 9" in capsys.readouterr().err


def test_imagenet_names_synsets_and_hf_labels():
    import timm

    names = data.model_class_names(timm.create_model("deit_tiny_patch16_224"))  # timm's ImageNet class info
    mapping, how = data.map_class_folders(["n01440764", "goldfish", "tabby_cat", "Great White Shark"], names, 1000)
    assert mapping == {"n01440764": 0, "goldfish": 1, "tabby_cat": 281, "Great White Shark": 2} and "timm" in how
    with pytest.raises(ValueError, match="'kitten' of .* match none of the model's 1000 class names"):
        data.map_class_folders(["kitten"], names, 1000)
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "bird"},
        label2id={"cat": 0, "dog": 1, "bird": 2},
    )
    hf = transformers.ViTForImageClassification(config)
    assert data.map_class_folders(["dog"], data.model_class_names(hf), 3)[0] == {"dog": 1}
    placeholder = transformers.ViTForImageClassification(
        transformers.ViTConfig(**{**config.to_dict(), "id2label": None, "label2id": None})
    )
    assert data.model_class_names(placeholder) is None  # LABEL_0, LABEL_1, ...: no names


def test_no_names_needs_as_many_folders_as_classes():
    assert data.map_class_folders(["a", "b", "c"], None, 3)[0] == {"a": 0, "b": 1, "c": 2}
    with pytest.raises(ValueError, match="holds 2 class folders but the model has 3 classes and no class names"):
        data.map_class_folders(["a", "b"], None, 3)
