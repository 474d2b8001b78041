"""The docs hold together: every relative link in README.md, docs/*.md and
benchmarks/RESULTS.md leads to a file (and a heading, when it names one) that exists; every
`skinlesion <command>` in their code blocks is one the CLI knows; and no commit hash sits in
their prose (a figure pinned to a commit goes stale: RESULTS.md keeps the command instead).

Markdown is parsed by markdown-it-py (rich's parser, already installed), so links and code
inside code spans or blocks are told apart from prose the way a renderer does.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from markdown_it import MarkdownIt

from components.commands.cli import COMMANDS
from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "benchmarks" / "RESULTS.md"]

_MD = MarkdownIt("commonmark").enable("table")
_COMMAND = re.compile(r"(?:^|[\s;&|(`])skinlesion\s+([A-Za-z_][\w-]*)", re.M)
# 7 to 40 hex digits with at least one digit and one letter: how git abbreviates a commit
_COMMIT = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")


def _tokens(md: Path):
    """Every token of the file, inline children included, in document order."""
    for token in _MD.parse(md.read_text(encoding="utf-8")):
        yield token
        yield from token.children or ()


def _slug(heading: str) -> str:
    # GitHub's heading anchors (markdown-it-py has no slugger; mdit-py-plugins is not installed):
    # lower case, punctuation dropped, spaces to hyphens.
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    found: set[str] = set()
    tokens = _MD.parse(md.read_text(encoding="utf-8"))
    for opening, inline in zip(tokens, tokens[1:]):
        if opening.type == "heading_open":
            text = "".join(c.content for c in inline.children if c.type in ("text", "code_inline"))
            slug, n = _slug(text), 1
            while slug in found:          # GitHub numbers a repeated heading: x, x-1, x-2
                slug, n = f"{_slug(text)}-{n}", n + 1
            found.add(slug)
    return found


def broken_links(md: Path) -> list[str]:
    """'FILE: TARGET (why)' for each relative link that leads nowhere."""
    broken = []
    for token in _tokens(md):
        if token.type not in ("link_open", "image"):
            continue
        target = token.attrs.get("href") or token.attrs.get("src") or ""
        parts = urlsplit(target)
        if parts.scheme or parts.netloc:
            continue                      # the web is not checked here
        path = (md.parent / unquote(parts.path)).resolve() if parts.path else md
        if not path.exists():
            broken.append(f"{md.name}: {target} (no such file)")
        elif parts.fragment and path.suffix == ".md" and parts.fragment not in anchors(path):
            broken.append(f"{md.name}: {target} (no such heading)")
    return broken


def unknown_commands(md: Path) -> list[str]:
    """'FILE: skinlesion NAME' for each command in a code block that the CLI does not have."""
    return [f"{md.name}: skinlesion {name}"
            for token in _tokens(md) if token.type in ("fence", "code_block")
            for name in _COMMAND.findall(token.content) if name not in COMMANDS]


def commit_hashes(md: Path) -> list[str]:
    return [f"{md.name}: {h}" for token in _tokens(md) if token.type == "text"
            for h in _COMMIT.findall(token.content)]


def test_every_relative_link_and_anchor_in_the_docs_exists():
    assert [b for md in DOCS for b in broken_links(md)] == []


def test_every_skinlesion_command_in_the_docs_code_blocks_is_known_to_the_cli():
    assert [u for md in DOCS for u in unknown_commands(md)] == []


def test_no_commit_hash_in_the_docs_prose():
    assert [h for md in DOCS for h in commit_hashes(md)] == []


def test_a_broken_link_a_missing_heading_and_an_unknown_command_are_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Serving: the `serve` command\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Top\n\n"
        "[ok](docs/guide.md) [ok](docs/guide.md#serving-the-serve-command) [ok](#top) "
        "[ok](docs/) [web](https://example.org/nowhere.md)\n"
        "[gone](docs/gone.md) [no heading](docs/guide.md#training) [no here](#bottom)\n\n"
        "`[in code](nowhere.md)` and a commit in code: `5919ffe`\n\n"
        "Measured on 7d5828b.\n\n"
        "```bash\nskinlesion serve --port 5001 && skinlesion trian --epochs 3\n"
        "docker push REGISTRY/skinlesion:TAG   # not a command\n```\n")
    assert broken_links(readme) == ["README.md: docs/gone.md (no such file)",
                                    "README.md: docs/guide.md#training (no such heading)",
                                    "README.md: #bottom (no such heading)"]
    assert unknown_commands(readme) == ["README.md: skinlesion trian"]
    assert commit_hashes(readme) == ["README.md: 7d5828b"]


def test_repeated_headings_get_numbered_anchors_as_on_github(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("# Notes\n\n## Notes\n\n## What's new: 2026-12-06\n")
    assert anchors(md) == {"notes", "notes-1", "whats-new-2026-12-06"}
