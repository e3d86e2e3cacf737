"""The documents: README.md stays a front door, every relative link in it and in docs/ resolves (files and #anchors),
the code docs/walkthrough.md quotes is the code as it is, and every test it names exists."""
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
REPORTS = ["results.md", "e2e.md", "findings.md", "performance.md"]
README_LIMIT = 25_000  # characters: a page a newcomer reads in minutes; the reports live in docs/

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def prose(text):
    """The text with fenced code blocks and inline code taken out: a link inside code is not a link."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading):
    """GitHub's anchor for a heading: its text as rendered, lowercased, without punctuation, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"[`*]|<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    """Every #anchor a page has: its headings' (duplicates numbered as GitHub numbers them) and explicit ids."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    found, seen = set(), {}
    for line in text.splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    found.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    return found


def broken_links(path, root=REPO):
    problems = []
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ... not ours to check
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            problems.append(f"{path.relative_to(root)}: link to {target}: no file {file}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{path.relative_to(root)}: link to {target}: {os.path.relpath(dest, root)} has no heading "
                            f"whose anchor is #{anchor}")
    return problems


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_a_broken_link_or_anchor_is_caught(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n## The paper's task: E2E\n[ok](#the-papers-task-e2e) [ok](b.md#two-2) "
                                   "`[in code](nowhere.md)`\n```\n[in a block](nowhere.md)\n```\n"
                                   "[gone](missing.md) [bad anchor](b.md#three) [web](https://example.com/x)\n")
    (tmp_path / "b.md").write_text("# One\n## Two 2\n")
    problems = broken_links(tmp_path / "a.md", root=tmp_path)
    assert len(problems) == 2 and "no file missing.md" in problems[0] and "#three" in problems[1]


def test_readme_is_a_front_door():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text) <= README_LIMIT, f"README.md has {len(text):,} characters; at most {README_LIMIT:,}: move detail to docs/"
    first = text.splitlines()[:40]
    assert any("pip install" in line and "python train.py" in line and "python sample.py" in line for line in first), \
        "the set-up command that trains and samples is not in README.md's first 40 lines"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    command = ci[[i for i, line in enumerate(ci) if line.startswith("# the README's test command")][0] + 1].strip()
    assert command in [line.strip() for line in first], \
        f".ci/run runs {command!r}, which is not a line of README.md's first 40: the two must be the same command"
    for page in REPORTS + ["walkthrough.md"]:
        assert f"(docs/{page})" in text, f"README.md does not link docs/{page}"


@pytest.mark.parametrize("page", REPORTS)
def test_a_report_opens_with_the_command_that_makes_it(page):
    text = (REPO / "docs" / page).read_text(encoding="utf-8")
    head = "\n".join(text.splitlines()[:25])
    assert "```bash" in head, f"docs/{page} does not open with the command that regenerates it"


def quotes(path):
    """-> [(source file, [quoted lines])]: the ```python blocks of a page whose first line is `# path: ...`."""
    found = []
    for block in re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S):
        lines = block.splitlines()
        m = re.match(r"#\s*([\w./-]+\.py)\b", lines[0]) if lines else None
        if m:
            found.append((m.group(1), [l.strip() for l in lines[1:] if l.strip() and l.strip() != "..."]))
    return found


def test_the_walkthrough_quotes_the_code_as_it_is():
    page = REPO / "docs" / "walkthrough.md"
    blocks = quotes(page)
    assert len(blocks) >= 10
    for source, lines in blocks:
        assert (REPO / source).is_file(), f"docs/walkthrough.md quotes {source}, which does not exist"
        code = [l.strip() for l in (REPO / source).read_text(encoding="utf-8").splitlines()]
        at = 0
        for line in lines:  # in the file's order, each quoted line a whole line of the file
            assert line in code[at:], (f"docs/walkthrough.md quotes from {source} a line that is not there (or not "
                                       f"in this order): {line!r}; update the quote to the code")
            at = code.index(line, at) + 1


def test_the_tests_the_documents_name_exist():
    named = set()
    for path in DOCS:
        named.update(re.findall(r"(tests/test_\w+\.py)::(\w+)", path.read_text(encoding="utf-8")))
    assert named
    for file, name in sorted(named):
        assert (REPO / file).is_file() and re.search(rf"^def {name}\(", (REPO / file).read_text(), re.M), \
            f"the documents name {file}::{name}, which is not a test there"
