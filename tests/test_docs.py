"""README.md and docs/: every relative link resolves (file and #anchor), every code path they name exists, and the
README stays short enough to read in five minutes.

A code path is a backticked or linked name under one of the project's folders (`progadv_trl/...`, `benchmarks/...`,
`recipes/...`, `tests/...`, `docs/...`), read from the repository root; paths a reader creates by running a command
(`runs/...`, `critic/`, `eval/`) are not checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROJECT_DIRS = ("progadv_trl/", "benchmarks/", "recipes/", "tests/", "docs/", ".ci/")

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters, spaces and hyphens kept),
    spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.M)}


def _prose(page: Path) -> str:
    """The page without fenced code blocks (their comments are not links)."""
    return FENCE.sub("", page.read_text(encoding="utf-8"))


def test_pages_exist():
    names = {p.name for p in PAGES}
    for page in ("study.md", "variants.md", "formats.md", "reliability.md", "benchmarks.md", "supported.md"):
        assert page in names, f"docs/{page} is missing"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in LINK.findall(_prose(page)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: - not ours to check offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def _code_paths(text: str) -> set[str]:
    found = set()
    for span in CODE.findall(text) + [t for t in LINK.findall(text)]:
        for word in re.split(r"[\s,;()]+", span):
            word = word.split("#")[0].rstrip(".:")
            if word.startswith("../"):
                continue  # a relative link: test_relative_links_resolve checks it from its page
            if word.startswith(PROJECT_DIRS) and not any(c in word for c in "*{}<>|"):
                found.add(word)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_paths_exist(page: Path):
    missing = sorted(p for p in _code_paths(_prose(page)) if not (ROOT / p).exists())
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {missing}"


def test_code_paths_are_found():
    """The path check sees backticked paths and links, so a renamed module would fail it."""
    text = "see `progadv_trl/engine.py` and [x](benchmarks/README.md), `recipes/nope.py` + `.yaml`, `runs/demo`"
    assert _code_paths(text) == {"progadv_trl/engine.py", "benchmarks/README.md", "recipes/nope.py"}
    assert _slug("Variants (5 seeds; `progadv study` evaluates every one)") == (
        "variants-5-seeds-progadv-study-evaluates-every-one"
    )


def test_readme_is_short_and_keeps_the_ci_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci in readme, "the README's test command and .ci/run must be the same line"
    assert "progadv demo --out runs/demo" in readme
