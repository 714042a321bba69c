"""docs/design.md's architecture matches the code (issue 21): its module list names every module
under atmerge/ and no other, and its layers are the import-linter contracts of pyproject.toml."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = (ROOT / "docs" / "design.md").read_text()
ARCHITECTURE = DESIGN[DESIGN.index("## Architecture") :]
ARCHITECTURE = ARCHITECTURE[: ARCHITECTURE.index("\n## ", 1)]
BLOCKS = re.findall(r"```text\n(.*?)```", ARCHITECTURE, re.S)
NAME_COLUMN = 24  # module names start before it; descriptions and their continuations at it


def listed_modules(block: str) -> set[str]:
    """The modules of the ``atmerge/`` tree: one per line, folders ending in '/', indented two
    spaces per level; a folder stands for its ``__init__.py``."""
    lines = block.splitlines()
    top = lines.index("atmerge/")
    found, folders = set(), []
    for line in lines[top + 1 :]:
        if not line.startswith("  "):  # back at the top level: tests/, bench/
            break
        indent = len(line) - len(line.lstrip(" "))
        if indent >= NAME_COLUMN:  # a description's continuation
            continue
        name = line.split()[0]
        level = indent // 2 - 1
        folders = folders[:level]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
            found.add("/".join(folders) + "/__init__.py")
        else:
            assert name.endswith(".py"), f"design.md: {line!r} is neither a module nor a folder"
            found.add("/".join([*folders, name]))
    return found


def modules_on_disk() -> set[str]:
    return {p.relative_to(ROOT / "atmerge").as_posix() for p in (ROOT / "atmerge").rglob("*.py")}


def test_the_module_list_names_every_module_on_disk_and_no_other():
    tree = next(b for b in BLOCKS if b.startswith("atmerge/"))
    listed, on_disk = listed_modules(tree), modules_on_disk()
    assert not on_disk - listed, f"modules missing from docs/design.md's architecture: {sorted(on_disk - listed)}"
    assert not listed - on_disk, f"docs/design.md lists modules that do not exist: {sorted(listed - on_disk)}"


def test_the_layers_are_the_import_linter_contracts():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layered = [c["layers"] for c in contracts if c["type"] == "layers"]
    shown = [b.strip().splitlines() for b in BLOCKS if not b.startswith("atmerge/")]
    assert shown == layered, "docs/design.md's layers differ from pyproject.toml's import-linter contracts"


def test_the_listing_parser_reads_folders_and_continuations():
    block = (
        "atmerge/\n  __init__.py           x\n  core/                 y\n    a.py                z\n"
        "                        more about a\n  b.py                  w\ntests/\n"
    )
    assert listed_modules(block) == {"__init__.py", "core/__init__.py", "core/a.py", "b.py"}
