"""Every relative link and image in the Markdown docs resolves.

Checks README.md, docs/**/*.md and patches/**/*.md: the target of each `[text](target)` and
`![alt](target)` outside fenced code blocks and inline code spans must exist relative to the file's
folder (web and mailto links are skipped), and a `#fragment` into a Markdown file, the same file
included, must name one of its headings by GitHub's anchor rule.
"""

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\n\s*\n).)+?\1", re.S)  # may wrap lines, never a paragraph
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def markdown_files():
    files = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
    return [f for f in files + sorted((ROOT / "patches").rglob("*.md")) if f.is_file()]


def unfenced(text):
    """The text with fenced code blocks blanked (line numbers kept)."""
    lines, fence = text.split("\n"), None
    for i, line in enumerate(lines):
        m = FENCE.match(line)
        if fence is None and m:
            fence, lines[i] = m.group(1), ""
        elif fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = None
            lines[i] = ""
    return "\n".join(lines)


def prose(text):
    """The text with fenced code blocks and inline code spans blanked (line numbers kept)."""
    return CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), unfenced(text))


def anchors(path):
    """GitHub's heading anchors: lowercase, drop punctuation, spaces to hyphens, -1, -2 for repeats."""
    seen, out = {}, set()
    for line in unfenced(path.read_text(encoding="utf-8")).split("\n"):
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links():
    problems = []
    for md in markdown_files():
        text = prose(md.read_text(encoding="utf-8"))
        for m in LINK.finditer(text):
            target = m.group(1)
            if re.match(r"(https?:|mailto:)", target, re.I):
                continue
            where = f"{md.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {target}"
            path, _, fragment = target.partition("#")
            path = unquote(path.split("?")[0])
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                problems.append(f"{where} (no such file)")
            elif fragment and dest.suffix == ".md" and unquote(fragment) not in anchors(dest):
                problems.append(f"{where} (no such heading)")
    return problems


def test_relative_links_and_anchors_resolve():
    problems = broken_links()
    assert not problems, "broken links:\n" + "\n".join(problems)
