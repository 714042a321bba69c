"""One dialect on the command line (issue 23): help without torch, the same flag for the same
concept in every sub-command (old spellings kept for one release, each with a one-line
deprecation message), defaults in every --help, method settings grouped under their methods,
a description per study, and a lazy ``import atmerge`` that still registers atmerge's timm models."""

import argparse
import json
import subprocess
import sys
import textwrap
import warnings

import pytest

from atmerge import cli
from atmerge.cli import build_parser, main


def _run(code: str) -> str:
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _sub_parsers(parser: argparse.ArgumentParser, prefix=()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every sub-command's parser (analyze's studies included), by its words."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[(*prefix, name)] = sub
                found.update(_sub_parsers(sub, (*prefix, name)))
    return found


def _help(*words: str) -> str:
    """``atmerge WORDS --help``, whitespace folded to single spaces."""
    parser = _sub_parsers(build_parser())[words]
    return " ".join(parser.format_help().split())


# ----------------------------------------------------------------------------- help without torch


def test_help_imports_neither_torch_nor_timm():
    """The console script is ``atmerge.cli:main``: its help (and every sub-command's) is printed
    without importing torch, timm or the method modules."""
    out = _run(
        """
        import contextlib, io, sys
        from atmerge.cli import build_parser, main
        words = [[], ["eval"], ["calibrate"], ["search"], ["analyze"], ["analyze", "info-loss"], ["visualize"],
                 ["finetune"], ["export"], ["probe"]]
        for argv in words:
            with contextlib.redirect_stdout(io.StringIO()) as printed:
                try:
                    main([*argv, "--help"])
                except SystemExit as e:
                    assert e.code == 0, (argv, e.code)
            assert "usage: atmerge" in printed.getvalue(), argv
        heavy = [m for m in ("torch", "timm", "atmerge.methods.registry", "atmerge.finetune") if m in sys.modules]
        print("heavy:", heavy)
        """
    )
    assert out.strip() == "heavy: []"


def test_python_m_atmerge_cli_help_runs():
    run = subprocess.run([sys.executable, "-m", "atmerge.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "usage: atmerge" in run.stdout and "SUB-COMMAND --help" in run.stdout


def test_the_light_method_listing_is_the_registry():
    """The listing read from the methods' source (for --help without torch) says what the real
    classes say: the same methods in the same order, fields, annotations, defaults and help."""
    from_source = cli._methods_from_source()
    from_registry = {m.name: m for m in cli._methods_from_registry()}
    assert [m.name for m in from_source] == [n for n in from_registry if n in {m.name for m in from_source}]
    for m in from_source:
        assert m == from_registry[m.name]
    from atmerge.finetune import FinetuneConfig

    classes, names = cli._source_dataclasses(cli.PACKAGE / "finetune.py")
    assert cli._source_fields(classes["FinetuneConfig"], names) == cli._live_settings(FinetuneConfig)


def test_import_atmerge_is_lazy_and_still_registers_the_timm_models():
    out = _run(
        """
        import sys
        import atmerge
        assert "torch" not in sys.modules and "timm" not in sys.modules
        assert set(atmerge.__all__) <= set(dir(atmerge)) and "ATM" in dir(atmerge)
        import timm  # after atmerge: the names are registered as timm loads
        print(sorted(timm.list_models("lvvit*")), timm.list_models("mae_vit_base_ft"))
        """
    )
    assert out.strip() == "['lvvit_m', 'lvvit_s', 'lvvit_t'] ['mae_vit_base_ft']"
    out = _run(
        """
        import timm, atmerge
        print(timm.list_models("t2t_vit_t_1*"))
        """
    )
    assert out.strip() == "['t2t_vit_t_14', 't2t_vit_t_19']"
    out = _run(
        """
        import atmerge
        atmerge.register_models()
        import atmerge.calibrate, atmerge.finetune  # the submodules do not hide the functions of the same name
        from atmerge import ATM, patch
        print(ATM().alpha, callable(atmerge.calibrate), callable(atmerge.finetune), callable(atmerge.evaluate),
              patch is atmerge.patch, type(atmerge.checkpoints).__name__)
        """
    )
    assert out.split() == ["0.99", "True", "True", "True", "True", "module"]


@pytest.mark.filterwarnings("ignore::atmerge.config.FingerprintWarning")  # a hand-written config
def test_patch_with_a_config_path_is_still_deprecated(tmp_path):
    import atmerge
    from conftest import small_vit

    config = tmp_path / "tome.json"
    config.write_text(json.dumps({"format": "atmerge-config/1", "method": {"name": "tome", "settings": {"r": 2}}}))
    model = small_vit()
    with pytest.warns(DeprecationWarning, match=r"atmerge.patch\(model, path\) is deprecated"):
        atmerge.patch(model, config)
    assert atmerge.is_patched(model)
    atmerge.unpatch(model)


# ----------------------------------------------------------------------------- one flag per concept


def test_progress_is_one_on_off_flag_everywhere():
    for words, parser in _sub_parsers(build_parser()).items():
        actions = {a.dest: a for a in parser._actions}
        if words in (("analyze",), ("export",), ("visualize",)):
            continue  # no loop with a progress bar (analyze: each study has it)
        assert isinstance(actions["progress"], argparse.BooleanOptionalAction), words
        assert (
            parser.parse_args(["--no-progress"]).progress is False
            and getattr(parser.parse_args([]), "progress", True) is True
        )


@pytest.mark.parametrize(
    "argv, old, new, dest, value",
    [
        (["finetune", "--train-limit", "5"], "--train-limit", "--limit", "train_limit", 5),
        (["probe", "--train-images", "7"], "--train-images", "--limit", "limit", 7),
        (["probe", "--test-images", "3"], "--test-images", "--val-limit", "val_limit", 3),
        (["visualize", "--images", "a.jpg", "photos"], "--images", "--data", "data", ["a.jpg", "photos"]),
    ],
)
def test_old_spellings_work_and_say_the_new_one(argv, old, new, dest, value):
    with pytest.warns(FutureWarning, match=f"^{old} is deprecated; use {new}$"):
        args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    renamed = [new if a == old else a for a in argv]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert getattr(build_parser().parse_args(renamed), dest) == value
    assert old not in _help(argv[0])  # the old spelling is not advertised


def test_limit_and_data_are_the_names_everywhere():
    parsers = _sub_parsers(build_parser())
    for words in [("eval",), ("calibrate",), ("search",), ("analyze", "info-loss"), ("finetune",), ("probe",)]:
        assert "--limit" in parsers[words]._option_string_actions, words
    for words in [("eval",), ("calibrate",), ("search",), ("analyze", "merge-profile"), ("finetune",), ("visualize",)]:
        assert "--data" in parsers[words]._option_string_actions, words
    assert build_parser().parse_args(["finetune", "--limit", "9"]).train_limit == 9


def test_boolean_settings_are_flags_and_the_old_words_are_deprecated():
    flags = cli.boolean_method_flags()
    assert "--batch-adaptive" in flags and "--no-batch-adaptive" in flags
    args = build_parser().parse_args(["eval", "--no-batch-adaptive"])
    assert args.batch_adaptive is False
    assert build_parser().parse_args(["eval"]).batch_adaptive is None  # the method's own default
    for argv, expected in [
        (["eval", "--batch-adaptive", "false", "--limit", "4"], ["eval", "--no-batch-adaptive", "--limit", "4"]),
        (["eval", "--batch-adaptive", "True"], ["eval", "--batch-adaptive"]),
        (["eval", "--batch-adaptive=false"], ["eval", "--no-batch-adaptive"]),
        (["eval", "--no-batch-adaptive", "true"], ["eval", "--no-batch-adaptive"]),
    ]:
        with pytest.warns(FutureWarning, match="is deprecated; write --"):
            assert cli.boolean_words(argv, flags) == expected
    assert cli.boolean_words(["eval", "--batch-adaptive", "--limit", "4"], flags) == [
        "eval",
        "--batch-adaptive",
        "--limit",
        "4",
    ]


def test_old_boolean_words_still_run(tmp_path, capsys):
    argv = ["eval", "--limit", "4", "--batch-adaptive", "false", "--no-progress", "--out", str(tmp_path)]
    with pytest.warns(FutureWarning, match="'--batch-adaptive false' is deprecated; write --no-batch-adaptive"):
        assert main(argv) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["method"]["batch_adaptive"] is False


# ----------------------------------------------------------------------------- help


def test_every_option_with_a_default_says_it():
    formatter = cli.DefaultsFormatter("atmerge")
    for words, parser in _sub_parsers(build_parser()).items():
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
                continue
            assert "default" in formatter._get_help_string(action), (words, action.option_strings)
    text = _help("eval")
    for said in ["of the search (default: 0)", "(default: 64)", "(default: cpu)", "progress bars (default: True)"]:
        assert said in text, said
    assert "train on a seeded subset of N images (default: none)" in _help("finetune")
    assert "(default: 2000)" in _help("probe") and "(default: 1000)" in _help("probe")


def test_method_settings_are_grouped_under_their_methods_with_help():
    text = _help("eval")
    for name in cli.method_names():
        assert f"method {name} (" in text, name
    assert "method atm (ATM): Adaptive Token Merging." in text
    assert "--alpha X initial threshold, in [0, 1] (default: 0.99)" in text
    assert "--keep-rate X in (0, 1] (default: 0.7)" in text
    assert "--locations N [N ...] blocks counted from 1 (default: 4 7 10)" in text
    # a setting of several methods is listed once, naming them, with each one's default
    assert text.count("--r N_OR_X ") == 1
    assert "--r N_OR_X [tome, topr, mctf, zerotp] tome: an int, a per-block list" in text
    assert "(default: 8 for tome, topr, zerotp; 16 for mctf)" in text
    assert "--batch-adaptive, --no-batch-adaptive [atm, constant]" in text
    assert "Also --split-layer, --similarity, --batch-adaptive (settings of several methods, below)" in text
    for words in [("calibrate",), ("search",), ("visualize",), ("finetune",), ("analyze", "split-layer")]:
        assert "method atm (ATM)" in _help(*words), words
    for action in _sub_parsers(build_parser())[("eval",)]._actions:
        if action.dest in cli.method_flags():
            assert action.help and len(action.help) > 10, action.dest


def test_method_help_is_read_from_docstrings():
    doc = """A toy.  Merges 50% of the tokens.

    alpha: the threshold, in [0, 1].  beta: the decay; ``None`` = off.
    gamma: a long entry that goes on
        to a second line.
    delta in (0, 1]; eps: the last.
    Defaults: the paper's.
    """
    docs = cli._field_docs(doc, ["alpha", "beta", "gamma", "delta", "eps", "zeta"])
    assert docs == {
        "alpha": "the threshold, in [0, 1]",
        "beta": "the decay; None = off",
        "gamma": "a long entry that goes on to a second line",
        "delta": "in (0, 1]",
        "eps": "the last",
    }
    assert cli._summary(doc) == "A toy."
    parser = argparse.ArgumentParser(formatter_class=cli.DefaultsFormatter)
    parser.add_argument("--x", default=1, help=cli._clean("50% of it"))
    assert "50% of it (default: 1)" in " ".join(parser.format_help().split())


def test_each_study_has_its_own_help():
    assert "Figure 2 of the ATM paper" in _help("analyze", "info-loss")
    assert "--thresholds" in _help("analyze", "info-loss") and "--batch-sizes" not in _help("analyze", "info-loss")
    assert "Table A1" in _help("analyze", "batch-size") and "--batch-sizes" in _help("analyze", "batch-size")
    assert "Table 3" in _help("analyze", "split-layer") and "Figure 6" in _help("analyze", "merge-profile")
    assert "Theorem 1" in _help("analyze", "merging-error")
    overview = _help("analyze")
    assert all(study in overview for study in cli.STUDIES)


@pytest.mark.parametrize(
    "argv, bad",
    [
        (["eval", "--method", "atn"], "'atn'"),
        (["analyze", "info-los"], "'info-los'"),
        (["calibrate", "--compare", "tomee"], "'tomee'"),
        (["eval", "--progress", "yes"], "unrecognized arguments: yes"),
    ],
)
def test_a_bad_choice_is_one_line(argv, bad, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and bad in err, err
