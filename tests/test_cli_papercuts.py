"""Issue 23's leftovers on the command line: on/off switches are ``--x / --no-x`` pairs (the old
single ``--no-cache`` and ``--no-merging`` still work), ``visualize --count N`` is how many images
the figure shows in all, and the docs and the benches' docstrings spell every command the
current way."""

import argparse
import importlib
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest

import atmerge.experiments.search
from atmerge import data
from atmerge.cli import DeprecatedSpelling, build_parser, main
from atmerge.experiments.visualize import chosen_images

ROOT = Path(__file__).resolve().parent.parent


def _parser(*words: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in words:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def _sample(dest: Path, count: int, start: int = 0) -> Path:
    """``count`` images of the shipped CIFAR-10 sample, copied flat into ``dest`` (img000.jpg, ...)."""
    dest.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(data.EMBEDDED_SAMPLE.rglob("*.jpg"))[start : start + count]):
        shutil.copy(f, dest / f"img{i:03d}.jpg")
    return dest


# ----------------------------------------------------------------------------- on/off pairs


@pytest.mark.parametrize(
    "words, flag, dest",
    [(("search",), "cache", "cache"), (("finetune",), "merging", "merging")],
)
def test_switches_are_on_off_pairs_and_the_old_spelling_still_works(words, flag, dest):
    parser = _parser(*words)
    action = parser._option_string_actions[f"--{flag}"]
    assert isinstance(action, argparse.BooleanOptionalAction)
    assert parser._option_string_actions[f"--no-{flag}"] is action
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old single flag is now the pair's off side: no deprecation
        assert getattr(build_parser().parse_args([*words, f"--no-{flag}"]), dest) is False
        assert getattr(build_parser().parse_args([*words, f"--{flag}"]), dest) is True
        assert getattr(build_parser().parse_args(list(words)), dest) is True
    text = " ".join(parser.format_help().split())
    assert f"--{flag}, --no-{flag}" in text and "(default: True)" in text


def test_search_no_cache_reaches_the_search_and_cache_is_the_default(monkeypatch, tmp_path):
    seen = []

    def stop(*args, cache_dir=None, **kwargs):
        seen.append(cache_dir)
        raise ValueError("stopped before the search")

    monkeypatch.setattr(atmerge.experiments.search, "search_methods", stop)
    base = ["search", "--limit", "8", "--trials", "1", "--no-progress", "--out", str(tmp_path)]
    assert main([*base, "--no-cache"]) == 2
    assert main([*base, "--cache-dir", str(tmp_path / "c")]) == 2
    assert seen == [None, tmp_path / "c"]


def test_finetune_no_merging_trains_the_unpatched_model(monkeypatch, tmp_path, capsys):
    seen = []

    def stop(model, method, *args, **kwargs):
        seen.append(method)
        raise ValueError("stopped before training")

    module = importlib.import_module("atmerge.finetune")  # (atmerge.finetune is the function of that name)
    monkeypatch.setattr(module, "finetune", stop)
    folder = tmp_path / "d"
    _sample(folder / "cat", 2), _sample(folder / "dog", 2, start=600)
    base = ["finetune", "--data", str(folder), "--val-data", str(folder), "--epochs", "1", "--no-progress"]
    assert main([*base, "--no-merging", "--out", str(tmp_path / "a")]) == 2
    assert main([*base, "--method", "tome", "--r", "2", "--out", str(tmp_path / "b")]) == 2
    assert seen[0] is None and type(seen[1]).__name__ == "ToMe" and seen[1].r == 2
    assert "stopped before training" in capsys.readouterr().err


def test_finetune_no_merging_with_a_config_is_refused_in_one_line(tmp_path, capsys):
    config = tmp_path / "tome.json"
    config.write_text(json.dumps({"format": "atmerge-config/1", "method": {"name": "tome", "settings": {"r": 4}}}))
    assert main(["finetune", "--no-merging", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--no-merging fine-tunes the unpatched model" in err


# ----------------------------------------------------------------------------- visualize --count


def test_visualize_count_is_the_number_of_images_in_all(tmp_path):
    one, two = _sample(tmp_path / "one", 3), _sample(tmp_path / "two", 3, start=100)
    extra = _sample(tmp_path / "loose", 1, start=200) / "img000.jpg"
    files, found = chosen_images([one, extra, two], 4)
    assert found == 7
    assert files == [one / "img000.jpg", one / "img001.jpg", one / "img002.jpg", extra]  # in the order given
    files, found = chosen_images([two, one], 10)
    assert found == 6 and files[:3] == sorted(two.iterdir()) and files[3:] == sorted(one.iterdir())
    assert chosen_images([], 2, default=one) == ([one / "img000.jpg", one / "img001.jpg"], 3)
    with pytest.raises(ValueError, match="--count must be at least 1"):
        chosen_images([one], 0)
    with pytest.raises(FileNotFoundError, match="nope.jpg not found"):
        chosen_images([tmp_path / "nope.jpg"], 1)


def test_visualize_count_help_says_in_all():
    text = " ".join(_parser("visualize").format_help().split())
    assert "--count N how many images the figure shows, in all: the first N of --data's images" in text
    assert "(default: 4)" in text


def test_visualize_draws_count_images_and_says_what_it_left_out(tmp_path, capsys):
    one, two = _sample(tmp_path / "one", 2), _sample(tmp_path / "two", 2, start=100)
    args = ["visualize", "--model", "cifar10-vit", "--data", str(one), str(two), "--count", "3", "--versus", ""]
    assert main([*args, "--out", str(tmp_path / "v")]) == 0
    result = json.loads((tmp_path / "v" / "visualize.json").read_text())
    assert result["images"] == [str(one / "img000.jpg"), str(one / "img001.jpg"), str(two / "img000.jpg")]
    assert all(len(left) == 3 for left in result["tokens_left"].values())
    assert "drawing the first 3 of 4 images (--count 4 draws them all)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- current spellings in the docs


def _old_spellings() -> list[tuple[str, str]]:
    """(sub-command, old flag) of every deprecated spelling the parser keeps."""
    found = []

    def walk(parser, words):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, (*words, name))
            elif isinstance(action, DeprecatedSpelling):
                found.extend((words[0], flag) for flag in action.option_strings)

    walk(build_parser(), ())
    return sorted(set(found))


def _texts() -> dict[str, str]:
    """docs/*.md, and the docstrings (their commands) of bench/*.py."""
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
    for p in sorted((ROOT / "bench").glob("*.py")):
        match = re.match(r'\s*(?:#.*\n)*\s*"""(.*?)"""', p.read_text(), re.S)
        texts[str(p.relative_to(ROOT))] = match.group(1) if match else ""
    return texts


def test_the_parser_keeps_the_old_spellings_this_test_looks_for():
    old = _old_spellings()
    for expected in [("probe", "--test-images"), ("calibrate", "--fidelity"), ("search", "--metric")]:
        assert expected in old
    assert ("calibrate", "--images") in old or "--images" in _parser("calibrate")._option_string_actions


def test_docs_and_bench_docstrings_use_the_current_spellings():
    old = _old_spellings() + [("calibrate", "--images")]  # calibrate's --images is checked by hand in cmd_calibrate
    bad = []
    for name, text in _texts().items():
        for number, line in enumerate(text.splitlines(), 1):
            if name == "docs/cli.md" and line.startswith("| `"):  # the table of old spellings and their new ones
                continue
            for command, flag in old:
                if re.search(rf"atmerge {command}\b[^`\n]*\s{re.escape(flag)}\b", line):
                    bad.append(f"{name}:{number}: atmerge {command} ... {flag}")
            if re.search(r"atmerge [^`\n]*--(no-)?batch-adaptive[ =](true|false)\b", line, re.I):
                bad.append(f"{name}:{number}: --batch-adaptive true|false")
    assert not bad, "deprecated spellings (see atmerge/cli.py) in the docs: " + "; ".join(bad)


def test_no_message_of_the_package_names_an_old_spelling():
    """Errors and hints say the current flags (the old ones live only in cli.py's deprecation plumbing)."""
    old = re.compile(r"--(images|test-images|train-images|train-limit|metric|fidelity)\b")
    bad = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in sorted((ROOT / "atmerge").rglob("*.py"))
        if p.name != "cli.py"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if old.search(line)
    ]
    assert not bad, f"old flag spellings in messages: {bad}"


# ----------------------------------------------------------------------------- what eval and calibrate print


def test_eval_prints_top1_in_percent_and_says_a_one_batch_speed_is_not_a_timing(tmp_path, capsys):
    assert main(["eval", "--limit", "8", "--batch-size", "8", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("run ") :].splitlines()[1:3]
    assert all(re.search(r"\s\d+\.\d\d%\s+\d+\.\d\d%\s", row) for row in table), table
    assert "(from 1 batch run once each, first calls included: not a timing;" in out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert 0 <= result["baseline"]["top1"] <= 1  # the JSON keeps shares


def test_calibrate_says_why_a_goal_is_not_met_and_how_to_check_a_config(tmp_path, capsys):
    folder = _sample(tmp_path / "photos", 12)
    out = tmp_path / "cal"
    args = ["calibrate", "--data", str(folder), "--budget", "0.02", "--trials", "2", "--no-progress"]
    assert main([*args, "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert re.search(
        r"ATM budget 0.02 not met: the cheapest setting found costs \d+\.\d% of the unpatched GFLOPs on the held-out "
        r"images; ask for a budget at or above that",
        printed,
    ), printed
    assert f"check it on other images: atmerge eval --config {out / 'calibration.json'} --data FOLDER" in printed


def test_search_prints_top1_and_agreement_in_percent(tmp_path, capsys):
    args = ["search", "--limit", "16", "--batch-size", "16", "--trials", "2", "--budget", "0.6", "--no-progress"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"unpatched: top-1 \d+\.\d\d%, 0\.3667 GFLOPs on 16 images", out), out
    front = out[out.index("Pareto front of") :].splitlines()[2]
    assert len(re.findall(r"\d+\.\d\d%", front)) == 2, front
    assert 0 <= json.loads((tmp_path / "search.json").read_text())["baseline"]["top1"] <= 1


def test_visualize_without_the_mirror_points_at_the_model_that_ships(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ATMERGE_SHARED", str(tmp_path / "no-mirror"))
    folder = _sample(tmp_path / "photos", 1)
    assert main(["visualize", "--data", str(folder), "--versus", "", "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert "dinov2_small_imgfocus.safetensors not found" in err and "--model cifar10-vit" in err
