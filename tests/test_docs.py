"""The documentation: README.md stays a manual of at most 15,000 bytes, every relative link of the
Markdown files resolves (file and #anchor), and nothing points outside the repository."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted(p for p in REPO.rglob("*.md") if not any(part.startswith(".") for part in p.relative_to(REPO).parts))
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation other than - and _ dropped, spaces -> -."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        base, n = slug, 1
        while slug in found:
            slug, n = f"{base}-{n}", n + 1
        found.add(slug)
    return found


def test_readme_is_at_most_15000_bytes():
    assert len((REPO / "README.md").read_bytes()) <= 15_000


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    for target in LINK.findall(re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists(), f"{doc.relative_to(REPO)}: {target} does not exist"
        assert REPO in path.parents or path == REPO, f"{doc.relative_to(REPO)}: {target} is outside the repository"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{doc.relative_to(REPO)}: no heading #{anchor} in {file or doc.name}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_reference_outside_the_repository(doc):
    text = doc.read_text()
    for outside in ("../shared", "DESIGN.md", "BENCH.md"):
        assert outside not in text, f"{doc.relative_to(REPO)} refers to {outside}, which is not in the repository"
