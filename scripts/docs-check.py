#!/usr/bin/env python3
"""The docs check (.ci/run): what the repository's documentation promises.

- Every alert in packaging/monitoring/halo.rules.yml has a runbook,
  docs/runbooks/<alert>.md, its `runbook_url` annotation names that page,
  and docs/runbooks/README.md lists it.
- Every relative link in the Markdown files of the repository (README.md,
  every file under docs/, packaging/, benches/, scripts/) resolves to a
  file or directory that exists; links to a heading (`page.md#heading`, or
  `#heading` within a page) name a heading the page has.
- docs/README.md, the book's index, links every page under docs/ (the
  runbooks excepted: docs/runbooks/README.md lists them, and the index
  links that).

Prints one line per problem and exits 1 if there is any.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
problems = []

# ---- runbooks
rules = (ROOT / "packaging/monitoring/halo.rules.yml").read_text()
alerts = re.findall(r"^\s*- alert: (\w+)", rules, re.M)
urls = dict(re.findall(r"^\s*- alert: (\w+)\n(?:(?!\s*- alert:).*\n)*?\s*runbook_url: \"([^\"]+)\"", rules, re.M))
index = (ROOT / "docs/runbooks/README.md")
index_text = index.read_text() if index.exists() else ""
if not alerts:
    problems.append("halo.rules.yml: no alerts found")
for alert in alerts:
    page = ROOT / "docs/runbooks" / f"{alert}.md"
    if not page.exists():
        problems.append(f"{alert}: no runbook docs/runbooks/{alert}.md")
    if urls.get(alert) != f"docs/runbooks/{alert}.md":
        problems.append(f"{alert}: runbook_url is {urls.get(alert)!r}, not 'docs/runbooks/{alert}.md'")
    if f"({alert}.md)" not in index_text:
        problems.append(f"{alert}: not linked from docs/runbooks/README.md")
for page in (ROOT / "docs/runbooks").glob("*.md"):
    if page.name != "README.md" and page.stem not in alerts:
        problems.append(f"docs/runbooks/{page.name}: no alert of that name")

# ---- links
def anchors(md: pathlib.Path) -> set:
    """GitHub's anchors for the headings of a Markdown file."""
    out = set()
    for line in md.read_text().splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            out.add(text.replace(" ", "-"))
    return out

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
files = [ROOT / "README.md"]
for folder in ("docs", "packaging", "benches", "scripts"):
    files += sorted((ROOT / folder).rglob("*.md"))
for md in files:
    text = md.read_text()
    # Links inside code spans and fenced blocks are not links.
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (md.parent / path).resolve() if path else md
        where = md.relative_to(ROOT)
        if not resolved.exists():
            problems.append(f"{where}: link to {target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: link to {target}: no such heading")

# ---- the book's index
book = ROOT / "docs/README.md"
if not book.exists():
    problems.append("docs/README.md: missing (the book's index)")
else:
    text = re.sub(r"```.*?```", "", book.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    linked = {(book.parent / t.partition("#")[0]).resolve()
              for t in LINK.findall(text) if not re.match(r"^[a-z]+:", t)}
    for page in sorted((ROOT / "docs").rglob("*.md")):
        rel = page.relative_to(ROOT / "docs")
        if page == book or rel.parts[0] == "runbooks" and rel.name != "README.md":
            continue
        if page.resolve() not in linked:
            problems.append(f"docs/README.md: does not link docs/{rel.as_posix()}")

for p in problems:
    print(f"docs-check: {p}")
print(f"docs-check: {len(alerts)} alerts, {len(files)} Markdown files, {len(problems)} problems")
sys.exit(1 if problems else 0)
