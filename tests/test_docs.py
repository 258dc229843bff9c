"""The user documents: the README stays short, every relative link and anchor resolves, and every measured
table is rendered from a committed result file (`make docs`), not typed."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("render_docs", ROOT / "tools" / "render_docs.py")
render_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_docs)
PAGES = render_docs.pages(ROOT)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", title)))
    return out


def test_the_readme_is_a_short_users_document():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_measured_tables_are_rendered_from_committed_files(page):
    text = page.read_text()
    assert render_docs.render(text, ROOT) == text, f"run `make docs`: {page.name} differs from its result files"


def test_render_fills_a_block_from_its_file_and_says_when_it_is_missing(tmp_path):
    (tmp_path / "t.md").write_text("| a |\n|---|\n| 1 |\n")
    page = ("x\n<!-- report-table: t.md -->\nold\n<!-- end report-table -->\ny\n"
            "<!-- report-table: none.md -->\n<!-- end report-table -->\n")
    assert render_docs.render(page, tmp_path) == (
        "x\n<!-- report-table: t.md -->\n| a |\n|---|\n| 1 |\n<!-- end report-table -->\ny\n"
        "<!-- report-table: none.md -->\n*Not measured yet: `none.md` is not committed.*\n<!-- end report-table -->\n")
