"""The docs tell the truth: the configuration table is the code's, every link resolves, the README stays short;
and the release's vocabulary lives in its enums, not in strings retyped across the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from releasegate.settings import markdown_table

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_configuration_table_is_the_one_the_settings_classes_give():
    text = (ROOT / "docs" / "operations.md").read_text()
    documented = text.split("<!-- settings-table:start -->")[1].split("<!-- settings-table:end -->")[0].strip()
    assert documented == markdown_table(), "regenerate it: releasegate settings --markdown"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in _LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):  # http(s), mailto: not ours to check here
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text())):
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


# Where the release's words may be spelled out: their enums, their stored forms, and the edge code
# that reads what older versions wrote.
_VOCABULARY_HOMES = {
    "contract.py",
    "verdict.py",
    "results.py",
    "release.py",
    "dashboard.py",
    "policy.py",
    "airflow_client.py",
}  # the policy's own enum; Airflow's task states at the REST edge
_RETYPED = re.compile(r"""["'](canary-\d*|promote|rollback|inconclusive|skipped|approve|shadow|canary)["']""")


def test_decisions_and_stages_are_not_retyped_as_strings_in_the_library():
    found = []
    for path in sorted((ROOT / "include" / "releasegate").rglob("*.py")):
        if path.name in _VOCABULARY_HOMES or "migrations" in path.parts or "demo" in path.parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if _RETYPED.search(code):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
