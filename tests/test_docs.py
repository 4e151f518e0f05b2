"""The documentation stands alone: every relative link in README.md, docs/, deploy/README.md and
bench/README.md reaches a file in this repository (and a heading, for a `#anchor`), none points
outside it, and README.md stays a front page.

Plain text, no services: the links are read the way GitHub renders them (fenced code and inline
code are not links; a heading's anchor is its GitHub slug).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250

# `[text](target)` or `[text](target "title")`, and reference definitions `[label]: target`.
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)"
)
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    files += [ROOT / "deploy" / "README.md", ROOT / "bench" / "README.md"]
    return files


def prose_lines(text: str) -> Iterator[str]:
    """The lines outside fenced code blocks, with inline code spans blanked."""
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield _INLINE_CODE.sub("", line)


def link_targets(text: str) -> list[str]:
    prose = "\n".join(prose_lines(text))
    return _INLINE_LINK.findall(prose) + _REFERENCE_LINK.findall(prose)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, punctuation removed
    except `-` and `_`, each space a `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    return "".join(ch for ch in text if ch.isalnum() or ch in "-_ ").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a markdown file; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    fenced = False
    for line in path.read_text().splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else _HEADING.match(line)
        if match is None:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def link_problem(source: Path, target: str, root: Path = ROOT) -> str | None:
    """Why a link in `source` does not resolve inside `root`, or None when it does."""
    if _SCHEME.match(target) or target.startswith("//"):
        return None  # a web address: not this test's business
    path_part, _, fragment = target.partition("#")
    if path_part.startswith("/"):
        return f"{target}: an absolute path points outside the repository"
    resolved = (source.parent / path_part).resolve() if path_part else source
    if not resolved.is_relative_to(root):
        return f"{target}: points outside the repository"
    if not resolved.exists():
        return f"{target}: no such file {resolved.relative_to(root)}"
    if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
        return f"{target}: no heading #{fragment} in {resolved.relative_to(root)}"
    if fragment and resolved.suffix != ".md":
        return f"{target}: an anchor on a file that has no headings"
    return None


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(doc: Path) -> None:
    problems = [
        problem
        for target in link_targets(doc.read_text())
        if (problem := link_problem(doc, target)) is not None
    ]
    assert problems == []


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_refers_to_files_outside_the_repository(doc: Path) -> None:
    # Not only links: a path in code or prose to the sibling checkout is as dead on a clone.
    text = doc.read_text()
    assert "../shared" not in text
    assert "CONTRACT.md" not in text


def test_the_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES


def test_the_documentation_pages_exist() -> None:
    # The README's table of pages: each one is a file (the link test checks the links too).
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert names >= {
        "reference.md",
        "operating.md",
        "console.md",
        "webhooks.md",
        "security.md",
        "deploying.md",
        "performance.md",
        "reliability.md",
        "development.md",
        "design.md",
    }


# --- the checker itself ----------------------------------------------------------------------


def test_slugs_follow_githubs_rules() -> None:
    assert github_slug("Skipped on purpose: suppression and rate limits") == (
        "skipped-on-purpose-suppression-and-rate-limits"
    )
    assert github_slug("The ledger's cost per email") == "the-ledgers-cost-per-email"
    assert github_slug("`email.deliveries`") == "emaildeliveries"
    assert github_slug("What gets which role (each on one resource; nothing on the project)") == (
        "what-gets-which-role-each-on-one-resource-nothing-on-the-project"
    )
    assert github_slug("snake_case and-dash") == "snake_case-and-dash"


def test_links_in_code_are_not_links() -> None:
    text = "see [a](a.md) and `[b](b.md)`\n```\n[c](c.md)\n```\n[d]: d.md\n"
    assert sorted(link_targets(text)) == ["a.md", "d.md"]


def test_the_checker_refuses_what_it_should(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    page = root / "docs" / "page.md"
    page.write_text("# Title\n\n## Same\n\n## Same\n")
    (tmp_path / "outside.md").write_text("# Outside\n")
    assert link_problem(page, "page.md#title", root) is None
    assert link_problem(page, "#same-1", root) is None
    assert link_problem(page, "https://example.com/x#y", root) is None
    assert link_problem(page, "../../outside.md", root) is not None  # escapes the root
    assert link_problem(page, "/etc/passwd", root) is not None
    assert link_problem(page, "missing.md", root) is not None
    assert link_problem(page, "page.md#nowhere", root) is not None
    assert link_problem(page, "#same-2", root) is not None
