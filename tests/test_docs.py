"""The manual stays navigable: every relative link in README.md and docs/*.md names a file that exists,
and an anchor names a heading of that file (GitHub's rule: lower case, punctuation dropped, spaces -> '-')."""

import re
from pathlib import Path

from tests.data_paths import REPO

LINK = re.compile(r"\]\(([^)\s]+)\)")


def pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def prose_lines(path: Path):
    """(number, line) outside fenced code blocks, where a '](' is code, not a link."""
    fenced = False
    for number, line in enumerate(path.read_text().split("\n"), 1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield number, line


def anchors(path: Path) -> set[str]:
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for _, line in prose_lines(path) if (m := re.match(r"#{1,6} (.*)", line))}


def broken_links(root: Path) -> list[str]:
    broken = []
    for page in pages(root):
        for number, line in prose_lines(page):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+://", target):
                    continue
                path, _, anchor = target.partition("#")
                dest = (page.parent / path) if path else page
                if not dest.exists() or (anchor and anchor not in anchors(dest)):
                    broken.append(f"{page.relative_to(root)}:{number}: {target}")
    return broken


def test_every_relative_link_in_the_docs_resolves():
    assert broken_links(REPO) == []


def test_a_missing_page_or_heading_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## The literature's architectures (`--model`)\n")
    (tmp_path / "README.md").write_text("[ok](docs/a.md#the-literatures-architectures---model) [gone](docs/b.md)\n"
                                        "[no heading](docs/a.md#nope)\n```\n[code](not/a/link.md)\n```\n")
    assert broken_links(tmp_path) == ["README.md:1: docs/b.md", "README.md:2: docs/a.md#nope"]
