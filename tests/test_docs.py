"""The repository stands alone: what it cites is inside it, and every pointer into the design notes lands."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
# build outputs and caches, not the repository's own text
SKIP = {".venv", ".git", "results", "build", "dist", ".pytest_cache", ".hypothesis", "__pycache__"}


def _text_files() -> list[Path]:
    """Every Python, markdown and TOML file of the repository, and the CI script."""
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP and not d.endswith(".egg-info")]  # not walked at all
        for name in files:
            path = Path(folder, name)
            if path.suffix in (".py", ".md", ".toml") or path.relative_to(ROOT).parts == (".ci", "run"):
                out.append(path)
    return sorted(out)


def _headings() -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^#{2,3} (.+)$", DESIGN.read_text(), re.MULTILINE)}


def test_design_notes_have_the_sections_the_code_points_to():
    assert {"The algorithm", "Reference mode", "Models", "ViLT", "METER", "Checkpoints", "Tasks",
            "Speed and FLOPs"} <= _headings()


# the path (in backticks, a markdown link or plain), a comma, then the heading in double quotes, which
# may wrap onto the next line (of a docstring, of markdown, or of a # comment)
_POINTER = re.compile(r'docs/design\.md[`\])(./a-z]*,?\s*(?:#\s*)?"([^"]+)"')


@pytest.mark.parametrize("path", _text_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pointers_into_the_design_notes_name_a_section(path):
    headings = _headings()
    named = {" ".join(m.group(1).split()) for m in _POINTER.finditer(path.read_text(errors="replace"))}
    assert named <= headings, f"{path.relative_to(ROOT)} points to sections docs/design.md lacks: {sorted(named - headings)}"


# written in pieces so that this file does not match itself
_OUTSIDE = re.compile("|".join([r"DESIGN" + r"\.md", r"\.\./" + "shared", r"\bshared" + "/", r"[Ii]ssue" + r" #?[0-9]"]))


@pytest.mark.parametrize("path", _text_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_cites_a_file_or_issue_outside_the_repository(path):
    hits = [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
            if _OUTSIDE.search(line)]
    assert not hits, f"{path.relative_to(ROOT)} cites what a clone does not have:\n" + "\n".join(hits)
