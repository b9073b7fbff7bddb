"""The documentation holds: every Python example of README.md and docs/*.md runs verbatim, the
site builds with ``mkdocs build --strict`` (a broken link, anchor or page fails), and the site's
front page is the README's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (page, i, block)
    for page in PAGES
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]


def test_the_docs_have_examples():
    assert len(BLOCKS) >= 8
    assert {p.name for p, _, _ in BLOCKS} >= {"README.md", "quantizer.md", "pretrained.md"}


@pytest.mark.parametrize("page, i, block", BLOCKS, ids=[f"{p.name}[{i}]" for p, i, _ in BLOCKS])
def test_example_runs(page, i, block):
    name = f"{page.relative_to(ROOT)}[python block {i}]"
    exec(compile(block, name, "exec"), {"__name__": "__docs__"})


def test_the_site_front_page_is_the_readme():
    """docs/index.md is README.md with its links made relative to docs/ (regenerate it with
    the expression below when the README changes)."""
    readme = (ROOT / "README.md").read_text()
    assert (ROOT / "docs" / "index.md").read_text() == readme.replace("](docs/", "](")


def test_the_site_builds_strictly(tmp_path):
    mkdocs = Path(sys.executable).with_name("mkdocs")
    run = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    pages = {
        p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("*.html")
    }
    assert {"index.html", "quantizer/index.html", "benchmarks/index.html"} <= pages
