"""docs/results.md's tables are generated, never typed (issue 21): every table sits between a
``<!-- generated: python bench/X.py --markdown ... -->`` marker and ``<!-- end generated -->``,
and each section holds exactly what its bench prints from the committed JSON now.  When a bench's
JSON or its ``--markdown`` changes, ``python bench/results_tables.py`` rewrites the page."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "results.md"
_spec = importlib.util.spec_from_file_location("results_tables", ROOT / "bench" / "results_tables.py")
results_tables = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("results_tables", results_tables)  # its dataclass looks its module up
_spec.loader.exec_module(results_tables)

SECTIONS = results_tables.sections(PAGE.read_text())
REGENERATE = "python bench/results_tables.py"


def test_the_page_has_generated_sections():
    assert len(SECTIONS) >= 10


@pytest.mark.parametrize("section", SECTIONS, ids=[s.command.removeprefix("python ") for s in SECTIONS])
def test_each_generated_section_is_what_its_bench_prints_from_the_committed_json(section):
    printed = results_tables.section_text(results_tables.render(section.command))
    assert section.body == printed, (
        f"docs/results.md line {section.start + 1}: the section of `{section.command}` differs from what it prints "
        f"now; run `{REGENERATE}`"
    )


def test_no_table_outside_the_generated_sections():
    stray = results_tables.tables_outside_markers(PAGE.read_text())
    assert not stray, (
        f"docs/results.md: tables at lines {stray} are not generated; print them from the bench's JSON with its "
        "--markdown and put them between markers"
    )


def test_every_committed_bench_json_is_named_on_the_page():
    """A result nobody can find is not a result: each JSON is a table's source or named in the prose."""
    text = PAGE.read_text()
    commands = " ".join(s.command for s in SECTIONS)
    missing = []
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        named = path.name in text or re.search(rf"{re.escape(path.stem.split('_')[0])}\*\.json", text)
        if not named and path.stem not in commands:
            missing.append(path.name)
    assert not missing, f"bench/results JSONs that docs/results.md never mentions: {missing}"


# ------------------------------------------------------------------ the generator itself


def test_the_generator_rewrites_a_stale_section_and_leaves_the_prose(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Prose before.\n\n<!-- generated: python bench/core.py --markdown dinov2 -->\n| stale | table |\n"
        "<!-- end generated -->\n\nProse after.\n"
    )
    assert results_tables.main(["--check", "--page", str(page)]) == 1
    assert results_tables.main(["--page", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("Prose before.\n\n<!-- generated: python bench/core.py --markdown dinov2 -->\n\n| budget")
    assert text.endswith("|\n\n<!-- end generated -->\n\nProse after.\n")
    assert "stale" not in text
    assert results_tables.main(["--check", "--page", str(page)]) == 0


def test_the_generator_finds_tables_outside_markers_but_not_in_code_blocks():
    text = "a\n\n| x |\n|---|\n| 1 |\n\n```\n| not | a table |\n```\n<!-- generated: python bench/a.py --markdown -->\n"
    text += "| inside |\n<!-- end generated -->\n"
    assert results_tables.tables_outside_markers(text) == [3]


@pytest.mark.parametrize(
    "text, message",
    [
        ("<!-- generated: python bench/a.py --markdown -->\n| x |\n", "never closed"),
        ("| x |\n<!-- end generated -->\n", "without a start marker"),
        (
            "<!-- generated: python bench/a.py --markdown -->\n<!-- generated: python bench/b.py --markdown -->\n",
            "opens inside",
        ),
    ],
)
def test_the_generator_refuses_broken_markers(text, message):
    with pytest.raises(ValueError, match=message):
        results_tables.sections(text)


@pytest.mark.parametrize(
    "command", ["python bench/core.py", "rm -rf /", "python bench/missing.py --markdown", "python x.py --markdown"]
)
def test_the_generator_runs_only_bench_markdown_commands(command):
    with pytest.raises(ValueError):
        results_tables.render(command)
