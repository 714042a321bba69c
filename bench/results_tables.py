"""Rewrite every generated table of docs/results.md from the committed bench JSONs.

    python bench/results_tables.py            # rewrite the marked sections in place
    python bench/results_tables.py --check    # exit 1 (and show a diff) where a section is stale

A generated section of docs/results.md is everything between a marker that names a bench's
``--markdown`` command and the end marker:

    <!-- generated: python bench/core.py --markdown speed -->
    ...what that command prints...
    <!-- end generated -->

Each command only renders its bench's JSON (bench/results/*.json); nothing is measured. The
commands run in this one process (the benches' ``main`` reading ``sys.argv``), so the whole page
renders in seconds. Tables belong inside markers; tests/test_docs_results.py fails on a stale
section and on a table outside one.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import re
import runpy
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "docs" / "results.md"
START = re.compile(r"^<!-- generated: (?P<command>.+?) -->$")
END = "<!-- end generated -->"


@dataclass
class Section:
    command: str  # as written in the marker, e.g. "python bench/core.py --markdown speed"
    start: int  # line index of the start marker
    end: int  # line index of the end marker
    body: str  # the text between the markers, as the page has it


def sections(text: str) -> list[Section]:
    """The marked sections of a page, in order; a ValueError for an unclosed or nested marker."""
    lines, found, open_at = text.split("\n"), [], None
    for i, line in enumerate(lines):
        m = START.match(line.strip())
        if m:
            if open_at is not None:
                raise ValueError(f"line {i + 1}: a generated section opens inside the one of line {open_at + 1}")
            open_at, command = i, m["command"]
        elif line.strip() == END:
            if open_at is None:
                raise ValueError(f"line {i + 1}: an end marker without a start marker")
            found.append(Section(command, open_at, i, "\n".join(lines[open_at + 1 : i])))
            open_at = None
    if open_at is not None:
        raise ValueError(f"line {open_at + 1}: a generated section is never closed ({END})")
    return found


def render(command: str) -> str:
    """What ``command`` (``python bench/X.py ... --markdown ...``) prints, run in this process."""
    argv = shlex.split(command)
    if len(argv) < 3 or argv[0] != "python" or not argv[1].startswith("bench/") or "--markdown" not in argv:
        raise ValueError(f"not a bench --markdown command: {command!r}")
    script = ROOT / argv[1]
    if not script.is_file():
        raise ValueError(f"{argv[1]} does not exist ({command!r})")
    out, old_argv, old_path = io.StringIO(), sys.argv, list(sys.path)
    sys.argv = [str(script), *argv[2:]]
    sys.path.insert(0, str(script.parent))  # the benches import bench/common.py as `common`
    try:
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the benches' imports (fvcore: torch.jit.script)
            try:
                runpy.run_path(str(script), run_name="__main__")
            except SystemExit as stop:
                if stop.code not in (None, 0):
                    raise RuntimeError(f"{command!r} exited with {stop.code}") from None
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    return out.getvalue()


def section_text(printed: str) -> str:
    """The body a section holds for a command's output: a blank line on each side of it."""
    return "\n" + printed.strip("\n") + "\n"


def rewrite(text: str) -> str:
    """The page with every marked section replaced by what its command prints now."""
    lines = text.split("\n")
    for s in reversed(sections(text)):
        lines[s.start + 1 : s.end] = section_text(render(s.command)).split("\n")
    return "\n".join(lines)


def tables_outside_markers(text: str) -> list[int]:
    """1-based numbers of the lines that start a Markdown table outside every marked section."""
    inside = set()
    for s in sections(text):
        inside.update(range(s.start, s.end + 1))
    lines, found, in_fence = text.split("\n"), [], False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence or i in inside:
            continue
        if line.lstrip().startswith("|") and (i == 0 or not lines[i - 1].lstrip().startswith("|")):
            found.append(i + 1)
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 where a section is stale")
    ap.add_argument("--page", default=str(RESULTS_MD), help="the page (default docs/results.md)")
    args = ap.parse_args(argv)
    page = Path(args.page)
    text = page.read_text()
    new = rewrite(text)
    stray = tables_outside_markers(new)
    if stray:
        print(f"{page}: tables outside generated sections at lines {stray}", file=sys.stderr)
    if args.check:
        if new != text:
            sys.stdout.writelines(
                difflib.unified_diff(text.splitlines(True), new.splitlines(True), str(page), f"{page} (regenerated)")
            )
            return 1
        return 1 if stray else 0
    if new != text:
        page.write_text(new)
        print(f"rewrote {page}: {len(sections(new))} generated sections")
    else:
        print(f"{page}: all {len(sections(new))} generated sections up to date")
    return 1 if stray else 0


if __name__ == "__main__":
    sys.exit(main())
