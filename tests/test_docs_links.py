"""The README's and the model cards' links between files lead somewhere: the file exists and,
where a link names a section, the file has a heading of that name (GitHub's anchor rules)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "models").glob("*.md")), *sorted((ROOT / "data").glob("*.md"))]


def anchor(heading: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def headings(markdown: str) -> set[str]:
    """The anchors of a file's headings, outside fenced code (where '#' starts a comment)."""
    found, fenced = set(), False
    for line in markdown.split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(anchor(line.lstrip("#")))
    return found


def relative_links(markdown: str) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", markdown) if not re.match(r"[a-z]+:", t)]


def broken_links(doc: Path) -> list[str]:
    broken = []
    for link in relative_links(doc.read_text()):
        path, _, section = link.partition("#")
        target = doc.parent / path if path else doc
        if not target.is_file():
            broken.append(f"{link}: no such file")
        elif section and target.suffix == ".md" and section not in headings(target.read_text()):
            broken.append(f"{link}: no such section")
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_between_the_documents_lead_to_a_file_and_section(doc):
    assert broken_links(doc) == []


def test_a_link_to_a_missing_section_or_file_is_caught(tmp_path):
    (tmp_path / "card.md").write_text("# Card\n\n## Tried on 2026-12-04, not kept: an anchor\n\n```sh\n# not a heading\n```\n")
    doc = tmp_path / "README.md"
    doc.write_text("[ok](card.md#tried-on-2026-12-04-not-kept-an-anchor) [web](https://example.org/x)\n"
                   "[gone](card.md#history) [code](card.md#not-a-heading) [lost](cards.md)\n")
    assert broken_links(doc) == ["card.md#history: no such section", "card.md#not-a-heading: no such section",
                                 "cards.md: no such file"]
