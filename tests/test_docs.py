"""The documentation stays true to the code: the option tables are the commands' own, the README stays short,
every link points at a file that exists, and the prose carries no internal issue numbers or commit hashes."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_option_tables_are_generated_from_the_commands() -> None:
    proc = subprocess.run([sys.executable, "scripts/cli_reference.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_bytes()) <= 10 * 1024


def test_every_relative_link_resolves() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+://", target):
                assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_no_issue_numbers_or_commit_hashes_in_prose() -> None:
    for page in PAGES:
        text = page.read_text()
        assert not re.search(r"\bissues? #?\d+", text, re.I), page.name
        hashes = [h for h in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"\d", h) and re.search(r"[a-f]", h)]
        assert not hashes, f"{page.name}: {hashes}"
