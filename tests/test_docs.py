"""The docs check: every relative link of README.md and docs/*.md points to an existing file and every
#anchor to an existing heading (GitHub's slugs: lowercase, spaces to '-', punctuation other than '-' and
'_' dropped, '-1', '-2', ... for repeats); every page of docs/ is linked from docs/index.md (the helpers'
docs/*-notes.md, waiting to be folded in, are link-checked but need not be); cli.md names every command
and option of the CLI. The examples of the pages run in test_cli.py (shell) and test_api.py (Python)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(?<!!)\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks (links and headings inside them are code, not Markdown)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: links to their text, code marks and punctuation dropped
    (except '-' and '_'), lowercase, each space a '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a Markdown file's headings give, repeats numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    found = set()
    for _, text in HEADING.findall(prose(path.read_text())):
        base = slug(text)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    """The link targets of a Markdown file, outside code blocks and code spans."""
    return LINK.findall(INLINE_CODE.sub("", prose(path.read_text())))


def broken_links(files: list[Path]) -> list[str]:
    """'FILE: TARGET (why)' for every relative link whose file or heading does not exist."""
    problems = []
    for path in files:
        for target in links(path):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not checked here
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                problems.append(f"{path.name}: {target} (no file {file_part})")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{path.name}: {target} (no heading #{anchor} in {dest.name})")
    return problems


def unlinked_pages(docs: Path) -> list[str]:
    """The docs pages docs/index.md does not link to (notes awaiting folding excepted)."""
    index = docs / "index.md"
    if not index.exists():
        return ["index.md (missing)"]
    linked = {(docs / t.partition("#")[0]).resolve() for t in links(index) if t.partition("#")[0]}
    return [
        p.name
        for p in sorted(docs.glob("*.md"))
        if p.name != "index.md" and not p.name.endswith("-notes.md") and p.resolve() not in linked
    ]


def test_every_link_and_anchor_resolves():
    assert broken_links(pages()) == []


def test_every_docs_page_is_linked_from_the_index():
    assert unlinked_pages(ROOT / "docs") == []


def test_the_readme_stays_short_and_links_the_docs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "docs/index.md" in links(ROOT / "README.md")


def test_the_check_itself_fails_on_broken_links_anchors_and_unlinked_pages(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (tmp_path / "README.md").write_text("# T\n\n[ok](docs/index.md) [gone](docs/nope.md) [bad](docs/a.md#nowhere)\n")
    (docs / "index.md").write_text("# Index\n\n[a](a.md#the-a-page-v2) [self](#index) [off](#missing)\n")
    (docs / "a.md").write_text("# The `a` page: v2!\n\n```\n[in code](nope.md)\n```\n`[span](nope.md)`\n")
    (docs / "b.md").write_text("# B\n")
    (docs / "x-notes.md").write_text("# Notes\n\n[broken](gone.md)\n")
    problems = broken_links(pages(tmp_path))
    assert problems == [
        "README.md: docs/nope.md (no file docs/nope.md)",
        "README.md: docs/a.md#nowhere (no heading #nowhere in a.md)",
        "index.md: #missing (no heading #missing in index.md)",
        "x-notes.md: gone.md (no file gone.md)",
    ]
    assert unlinked_pages(docs) == ["b.md"]


def test_slugs_follow_githubs_rules():
    assert slug("Compatibility matrix: will my RoPE (or bias) graph run on X?") == (
        "compatibility-matrix-will-my-rope-or-bias-graph-run-on-x"
    )
    assert slug("`pe-export rewrite` on ORT CPU") == "pe-export-rewrite-on-ort-cpu"
    assert slug("IREE (the `heavy_runtimes` group)") == "iree-the-heavy_runtimes-group"
    assert slug("See [the page](x.md) now") == "see-the-page-now"


def test_cli_md_names_every_command_and_option():
    import typer

    from pe_export.cli.main import app

    group = typer.main.get_command(app)  # Typer's own click (vendored), so no isinstance on click's classes
    ctx = type(group).context_class(group)
    text = (ROOT / "docs" / "cli.md").read_text()
    options = {o for span in INLINE_CODE.findall(text) for o in re.findall(r"(?<![\w-])-{1,2}[A-Za-z][\w-]*", span)}
    missing = []
    for name in group.list_commands(ctx):
        if f"`{name}`" not in text and f"`pe-export {name}`" not in text:
            missing.append(name)
        for param in group.get_command(ctx, name).params:
            if param.param_type_name == "option":
                missing += [f"{name} {o}" for o in param.opts + param.secondary_opts if o not in options]
    assert missing == []
