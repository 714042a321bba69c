"""A newcomer's first hour: a fresh clone runs with nothing beside it, calibrate uses
the folder it is given, the calibrate -> eval loop works on one unlabeled folder, and unreadable
files are named the same way by calibrate and eval."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from atmerge import data
from atmerge.cli import main

REPO = Path(__file__).resolve().parents[1]


def _images(dest: Path, count: int, nested: bool = True) -> Path:
    """``count`` CIFAR-10 images from the shipped sample, in no class layout (some nested)."""
    files = sorted(data.EMBEDDED_SAMPLE.rglob("*.jpg"))[::37][:count]
    for i, f in enumerate(files):
        target = dest / ("deeper/still" if nested and i % 2 else "") / f"img{i:03d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    return dest


def test_calibrate_uses_the_data_folder(tmp_path, capsys):
    folder = _images(tmp_path / "mine", 10)
    out = tmp_path / "cal"
    args = ["calibrate", "--data", str(folder), "--budget", "0.6", "--trials", "2", "--no-progress", "--out", str(out)]
    main(args)
    printed = capsys.readouterr().out
    described = json.loads((out / "calibration.json").read_text())["calibration"]["images_description"]
    assert described == f"10 images from {folder}" and described in printed


def test_calibrate_images_is_a_deprecated_spelling(tmp_path, capsys):
    folder = _images(tmp_path / "mine", 8)
    out = tmp_path / "cal"
    with pytest.warns(FutureWarning, match="--images is deprecated; use --data"):
        main(
            [
                "calibrate",
                "--images",
                str(folder),
                "--budget",
                "0.6",
                "--trials",
                "1",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
    assert json.loads((out / "calibration.json").read_text())["calibration"]["images_description"].startswith(
        "8 images"
    )
    other = _images(tmp_path / "other", 2)
    assert main(["calibrate", "--images", str(folder), "--data", str(other), "--budget", "0.6"]) == 2
    err = capsys.readouterr().err
    assert "name two folders; pass --data only" in err and len(err.strip().splitlines()) == 1


def test_calibrate_then_eval_on_one_unlabeled_folder(tmp_path, capsys):
    folder = _images(tmp_path / "photos", 24)
    (folder / "deeper" / "broken.jpg").write_text("not an image")
    cal = tmp_path / "cal"
    named = f"skipped unreadable image {folder / 'deeper' / 'broken.jpg'}"
    with pytest.warns(data.UnreadableImageWarning, match=named):
        main(
            [
                "calibrate",
                "--data",
                str(folder),
                "--min-agreement",
                "0.2",
                "--trials",
                "2",
                "--no-progress",
                "--out",
                str(cal),
            ]
        )
    assert "skipped 1 unreadable image files" in capsys.readouterr().out
    with pytest.warns(data.UnreadableImageWarning, match=named):  # eval: the same policy, the same words
        assert (
            main(
                [
                    "eval",
                    "--config",
                    str(cal / "calibration.json"),
                    "--data",
                    str(folder),
                    "--no-progress",
                    "--out",
                    str(tmp_path / "ev"),
                ]
            )
            == 0
        )
    captured = capsys.readouterr()
    assert "no class folders used, so fidelity to the unpatched model only" in captured.out
    assert "agreement with the unpatched model:" in captured.out
    assert "config promised agreement" in captured.out and "measured here: agreement" in captured.out
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["images"] == 24 and result["baseline"]["top1"] is None
    assert 0 <= result["fidelity"]["agreement"] <= 1 and result["fidelity"]["kl"] >= 0


def test_eval_with_labels_reports_top1_and_agreement(tmp_path, capsys):
    assert main(["eval", "--limit", "20", "--no-progress", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "difference: top-1" in printed and "agreement with the unpatched model:" in printed
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["baseline"]["top1"] is not None and result["fidelity"]["images"] == 20


def test_runs_without_out_get_their_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["eval", "--limit", "4", "--method", "tome", "--no-progress"]) == 0
    runs = sorted((tmp_path / "results" / "eval").iterdir())
    assert len(runs) == 2 and all(r.name.split("-")[-1] in ("tome", "2") for r in runs)
    assert all((r / "eval.json").exists() for r in runs)


def test_misspelled_choice_is_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--method", "atn"])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "invalid choice: 'atn'" in err and "'atm'" in err


def test_fresh_clone_runs_with_nothing_beside_it(tmp_path):
    """``git clone`` into a temporary folder with no ../shared beside it (ATMERGE_SHARED an empty
    folder, an empty cache): eval and calibrate run on the default that ships with the package."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{REPO}", str(clone)], check=True)
    assert not (tmp_path / "shared").exists()
    (tmp_path / "empty").mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(clone),
        "ATMERGE_SHARED": str(tmp_path / "empty"),
        "ATMERGE_CACHE": str(tmp_path / "cache"),
    }
    env.pop("ATMERGE_DOWNLOAD", None)
    script = (
        "import sys, atmerge.cli as c; assert c.__file__.startswith(sys.argv[1]), c.__file__\n"
        "assert c.main(['eval', '--limit', '200', '--no-progress', '--out', 'ev']) == 0\n"
        "c.main(['calibrate', '--limit', '64', '--budget', '0.6', '--trials', '2', '--no-progress', '--out', 'cal'])\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(clone)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["images"] == 200 and result["setup"]["weights"].endswith("cifar10_vit_tiny_p4_fp16.safetensors")
    assert result["data"]["folder"].endswith("cifar10-test-sample") and result["baseline"]["top1"] > 0.4
    config = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert config["calibration"]["images_description"].startswith("64 images from") and "sample" in run.stdout


def test_a_run_without_the_shared_folder_says_what_it_skipped(tmp_path):
    """Tests marked shared are skipped without the shared folder, and the summary counts them and
    says why; ATMERGE_REQUIRE_SHARED=1 (CI) turns the skip into a failure."""
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "ATMERGE_SHARED": str(tmp_path / "empty")}
    env.pop("ATMERGE_REQUIRE_SHARED", None)
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_cli.py::test_visualize"]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "1 tests skipped: they need the shared data" in run.stdout, run.stdout[-2000:]
    assert f"The shared folder {tmp_path / 'empty'}" in run.stdout
    run = subprocess.run(
        command, cwd=REPO, env={**env, "ATMERGE_REQUIRE_SHARED": "1"}, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 1 and "missing (ATMERGE_REQUIRE_SHARED=1)" in run.stdout, run.stdout[-2000:]


@pytest.mark.filterwarnings("ignore::atmerge.config.FingerprintWarning")  # a hand-written config, no model in it
def test_visualize_a_folder_with_a_config(tmp_path, capsys):
    folder = _images(tmp_path / "photos", 2, nested=False)
    config = tmp_path / "tome.json"
    config.write_text(json.dumps({"format": "atmerge-config/1", "method": {"name": "tome", "settings": {"r": 4}}}))
    args = [
        "visualize",
        "--model",
        "cifar10-vit",
        "--data",
        str(folder),
        "--config",
        str(config),
        "--versus",
        "",
        "--out",
        str(tmp_path / "v"),
    ]
    assert main(args) == 0
    result = json.loads((tmp_path / "v" / "visualize.json").read_text())
    assert result["model"] == "cifar10-vit" and "model: cifar10-vit" in capsys.readouterr().out
    assert len(result["images"]) == 2 and list(result["tokens_left"]) == ["ToMe (tome.json)"]
    assert result["tokens_left"]["ToMe (tome.json)"] == [21, 21] and all(
        g > 0 for g in result["gflops"]["ToMe (tome.json)"]
    )
