#!/usr/bin/env python3
"""The docs check (.ci/run): what the repository's documentation promises.

- Every alert in packaging/monitoring/halo.rules.yml has a runbook,
  docs/runbooks/<alert>.md, its `runbook_url` annotation names that page,
  and docs/runbooks/README.md lists it.
- Every relative link in the Markdown files of the repository (README.md,
  docs/, packaging/, benches/, scripts/) resolves to a file or directory
  that exists; links to a heading of a Markdown file name a heading it has.

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
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path, _, anchor = target.partition("#")
        resolved = (md.parent / path).resolve()
        where = md.relative_to(ROOT)
        if not resolved.exists():
            problems.append(f"{where}: link to {target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: link to {target}: no such heading")

for p in problems:
    print(f"docs-check: {p}")
print(f"docs-check: {len(alerts)} alerts, {len(files)} Markdown files, {len(problems)} problems")
sys.exit(1 if problems else 0)
