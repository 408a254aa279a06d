"""The documentation stays navigable: every relative link resolves, and the README stays a landing page."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

DOCS = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md",
               *(ROOT / "docs").rglob("*.md"), *(ROOT / "benchmarks" / "results").glob("*.md")])

# `[text](target)` and `![alt](target)`; the target ends at the first space (a title may follow) or `)`.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?[^)]*\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)

README_MAX_LINES = 250


def relative_links(text: str) -> list[str]:
    """The link targets of a markdown text that point into the repository: not web links, not
    mail links, not same-page anchors, and not inside code, where brackets are code."""
    targets = LINK.findall(CODE.sub("", text))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.IGNORECASE) and not t.startswith("#")]


def test_the_pages_exist():
    """The README names the docs pages and benchmarks/README.md; the link test below only checks
    what exists, so a missing page set would pass it vacuously."""
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert {"README.md", "benchmarks/README.md"} <= names
    assert any(n.startswith("docs/") for n in names)


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    """A moved or renamed file must not leave a dead link in the docs a newcomer reads first.
    Anchors (`#...`) are stripped: only the file or folder is checked."""
    broken = []
    for target in relative_links(page.read_text()):
        path = target.split("#", 1)[0]
        if not path:
            continue
        resolved = (ROOT / path.lstrip("/")) if path.startswith("/") else (page.parent / path)
        if not resolved.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files: {broken}"


def test_relative_links_parses_markdown():
    """The link pattern finds inline and image links, and leaves out web links, anchors and code."""
    text = ("See [a](docs/a.md#x) and ![b](logs/b.png \"title\"), [web](https://x.org), [here](#top), "
            "`[not](code.md)`.\n```\n[nor](block.md)\n```\n")
    assert relative_links(text) == ["docs/a.md#x", "logs/b.png"]


def test_readme_is_a_landing_page():
    """README.md is what a newcomer reads in ten minutes; everything else belongs in docs/ (issue 30)."""
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {README_MAX_LINES})"
