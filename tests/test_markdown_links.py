"""Every relative link and figure in the project's Markdown (README, ARCHITECTURE, bench/'s results, history and
tables) names a file the repository holds, so a reader of a fresh clone sees every plot the text points at.
docs/ is left to `mkdocs build --strict` (tests/test_docs.py), which also checks the figures its hook adds."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "bench").rglob("*.md"))]
    return [path for path in files if path.exists()]


def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    targets = (match.group(1).split("#")[0] for match in LINK.finditer(text))
    return [target for target in targets if target and not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def tracked_files() -> set[Path] | None:
    """The files git holds (what a clone has); None outside a git checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {ROOT / name for name in listed.decode("utf-8").split("\0") if name}


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_names_a_file_the_repository_holds(path):
    tracked = tracked_files()
    broken = []
    for target in relative_links(path):
        resolved = (path.parent / target).resolve()
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif tracked is not None and resolved.is_file() and resolved not in tracked:
            broken.append(f"{target} (not in the repository: a clone lacks it)")
    assert not broken, f"{path.relative_to(ROOT)} links to: {broken}"


def test_the_link_check_sees_links_and_figures(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("![a plot](plots/a.png) and [a table](t.md#row) and [web](https://example.org)\n"
                    "```\n[not a link](inside/a/fence.md)\n```\n", encoding="utf-8")
    assert relative_links(page) == ["plots/a.png", "t.md"]
