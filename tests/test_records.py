"""Results that say how they were made: the header every bench JSON starts with
(``bench/common.run_header``), which committed JSON files carry it, and the label Zero-TP
(simplified) wherever a command shows the method."""

import importlib.util
import json
import platform
import sys
from pathlib import Path

import pytest
import torch

from atmerge.cli import main

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# Committed JSON files written before bench/common.run_header existed, or merged from such a run:
# each records its command line and the torch version (most also timm, the CPU architecture and
# the torch threads), but not sys.argv as typed, the CPU model, the cores, the transformers
# version or every setting the bench chose.  They stay until their bench is run again; a file
# that has the header again should then leave this list (every file not in it must have it).
LEGACY = {
    "calibrate.json",
    "calibrated_cifar10-vit.json",  # the MCTF re-run was merged into a run from before the header
    "finetune.json",
    "finetune_gpu.json",  # GPU runs: device name recorded, driver and CUDA version not
    "gpu.json",
    "gpu_1024_h200.json",
    "gpu_256_h200.json",
}


def _common():
    """bench/common.py, imported from its file (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_common_for_tests", ROOT / "bench" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _has_header(record: dict) -> bool:
    machine, versions = record.get("machine") or {}, record.get("versions") or {}
    return (
        isinstance(record.get("argv"), list)
        and bool(record.get("command"))
        and all(machine.get(k) for k in ("cpu", "cores", "torch_threads"))
        and all(k in versions for k in ("torch", "timm", "transformers", "git_commit"))
        and "gpu" in record
        and isinstance(record.get("chosen"), dict)
    )


def test_run_header_records_the_command_machine_versions_and_chosen_settings(monkeypatch):
    common = _common()
    monkeypatch.setattr(sys, "argv", ["bench/example.py", "--batch", "64", "--note", "two words"])
    args = type("Args", (), {})()
    args.batch, args.note = 64, "two words"
    header = common.run_header(args, warmup=2, dtype=torch.bfloat16, bisected={"theta_min": 0.91})
    assert header["argv"] == ["bench/example.py", "--batch", "64", "--note", "two words"]
    assert header["command"] == "python bench/example.py --batch 64 --note 'two words'"  # as typed, quoted
    assert header["arguments"] == {"batch": 64, "note": "two words"}
    machine = header["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["cores_usable"] >= 1
    assert machine["torch_threads"] == torch.get_num_threads()
    versions = header["versions"]
    assert versions["torch"] == torch.__version__ and versions["python"] == platform.python_version()
    assert {"timm", "transformers", "atmerge", "git_commit"} <= versions.keys()
    if torch.cuda.is_available():
        assert {"name", "driver", "cuda"} <= header["gpu"].keys()
    else:
        assert header["gpu"] is None
    assert header["chosen"] == {"warmup": 2, "dtype": "bfloat16", "bisected": {"theta_min": 0.91}}
    json.dumps(header)  # written as it is
    assert _has_header(header)


def _records(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    return data if isinstance(data, list) else [data]  # gpu.py --append keeps a list of runs


@pytest.mark.parametrize("name", sorted(p.name for p in RESULTS.glob("*.json")))
def test_every_bench_json_carries_the_header_or_is_a_named_older_run(name):
    records = _records(RESULTS / name)
    if name in LEGACY:
        assert all(r.get("command") for r in records)  # what the older runs do record
    else:
        assert all(_has_header(r) for r in records), f"{name} lacks run_header's fields"


def test_the_probe_record_says_how_the_probe_was_trained():
    record = json.loads((RESULTS / "probe" / "probe.json").read_text())
    how = record["how_trained"]
    assert how["argv"] and how["command"] and how["versions"]["torch"] and how["machine"]["cpu"]
    assert how["images"]["train"]["images"] == record["train_images"]
    assert how["backbone"]["weights_sha256"] and how["classifier"]["seed"] == record["seed"]


def test_zero_tp_is_labelled_simplified_in_visualize(tmp_path, capsys):
    image = sorted((ROOT / "atmerge" / "assets" / "cifar10-test-sample").rglob("*.jpg"))[0]
    args = ["visualize", "--model", "cifar10-vit", "--data", str(image), "--method", "zerotp", "--r", "2"]
    assert main(args + ["--versus", "", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "visualize.json").read_text())
    assert list(result["tokens_left"]) == ["Zero-TP (simplified)"]
    assert "Zero-TP (simplified): tokens left" in capsys.readouterr().out
