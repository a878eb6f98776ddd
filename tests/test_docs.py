"""Every citation of docs/method.md in the repository names a section that exists.

The convention (top of docs/method.md): code cites ``method §N`` or
``method §N.M``, Markdown and notebooks ``docs/method.md §N.M``; a list repeats
the sign (``method §4.3, §4.4``). Sections 9 and 10 are numbered lists, so
their items are cited as N.k. Inside docs/method.md a bare § cites its own
sections.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import pytest

THIS = pathlib.Path(__file__).resolve()  # holds dangling citations on purpose, for the checker's own test
ROOT = THIS.parent.parent
METHOD = ROOT / "docs" / "method.md"
LIST_SECTIONS = ("9", "10")  # numbered lists: item k of section N is cited as N.k
SKIP_DIRS = {"runs", "build", "dist", "__pycache__", "node_modules"}
NUM = r"\d+(?:\.\d+)*"
# "method §4.3", "docs/method.md §5.5, §7.3", "method §4.4 and §7.4", "method §2.2, §3.1 (skip term)"
# (a parenthesised remark may follow each item before the next separator).
CITATION = re.compile(rf"\bmethod(?:\.md)?\s+§{NUM}(?:(?:\s*\([^()\n]*\))?(?:,\s*|\s+(?:and|or|to)\s+|\s*[-–]\s*)§{NUM})*")
SECTION = re.compile(rf"§({NUM})")
# The old form, citing the spec this file replaced: "spec 4.3", "spec section 3", "spec §4".
STALE = re.compile(r"\bspec\s+(?:sections?\s+|§\s*)?\d", re.IGNORECASE)


def anchors(text: str) -> set[str]:
  """Section numbers of docs/method.md: headings, plus the list items of LIST_SECTIONS."""
  found, section = set(), None
  for line in text.splitlines():
    if m := re.match(rf"^#{{2,3}} ({NUM})\.?\s", line):
      found.add(m.group(1))
      section = m.group(1).split(".")[0]
    elif section in LIST_SECTIONS and (m := re.match(r"^(\d+)\. ", line)):
      found.add(f"{section}.{m.group(1)}")
  return found


def cited(text: str) -> list[str]:
  """Section numbers cited as "method §..." in ``text``."""
  return [s for m in CITATION.finditer(text) for s in SECTION.findall(m.group(0))]


def readable_text(path: pathlib.Path) -> str:
  """A file's text; for a notebook, its cells' sources (however the JSON escapes them)."""
  text = path.read_text(encoding="utf-8")
  if path.suffix == ".ipynb":
    return "\n".join("".join(c.get("source", "")) for c in json.loads(text).get("cells", []))
  return text


def repository_files() -> list[pathlib.Path]:
  out = []
  for dirpath, dirnames, filenames in os.walk(ROOT):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS
                         and not d.endswith(".egg-info"))
    out += [pathlib.Path(dirpath) / f for f in sorted(filenames) if f.endswith((".py", ".md", ".ipynb"))]
  return [p for p in out if p != THIS]


def shown(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def unresolved(files, known: set[str]) -> list[str]:
  """Citations that name no section of docs/method.md, and numbered § signs outside a citation."""
  bad = []
  for path in files:
    text = readable_text(path)
    if path == METHOD:  # the file's own cross-references are bare § signs
      bad += [f"{shown(path)}: §{n}" for n in SECTION.findall(text) if n not in known]
      continue
    bad += [f"{shown(path)}: method §{n}" for n in cited(text) if n not in known]
    inside = {i for m in CITATION.finditer(text) for i in range(m.start(), m.end())}
    bad += [f"{shown(path)}: {text[max(0, m.start() - 20):m.end()]!r} is not written as a citation "
            f"(\"method §N.M\")" for m in SECTION.finditer(text) if m.start() not in inside]
  return bad


@pytest.fixture(scope="module")
def known() -> set[str]:
  return anchors(METHOD.read_text(encoding="utf-8"))


def test_method_keeps_the_spec_numbering(known):
  text = METHOD.read_text(encoding="utf-8")
  tops = re.findall(r"^## (\d+)\. ", text, re.MULTILINE)
  assert tops == [str(i) for i in range(1, 12)]
  subsections = {"2": 3, "3": 8, "4": 7, "5": 5, "6": 2, "7": 4}
  for top, n in subsections.items():
    assert {f"{top}.{i}" for i in range(1, n + 1)} <= known, top
    assert f"{top}.{n + 1}" not in known, top
  assert {f"9.{i}" for i in range(1, 18)} <= known and "9.18" not in known
  assert {f"10.{i}" for i in range(1, 7)} <= known and "10.7" not in known


def test_every_method_citation_resolves(known):
  files = repository_files()
  assert METHOD in files and ROOT / "README.md" in files
  total = sum(len(cited(readable_text(p))) for p in files)
  assert total >= 40, f"only {total} citations found: has the convention or the pattern changed?"
  bad = unresolved(files, known)
  assert not bad, "citations of docs/method.md that name no section or item there:\n" + "\n".join(bad)


def test_no_citations_of_the_old_spec_remain():
  stale = [f"{shown(p)}:{i}: {line.strip()}" for p in repository_files() if p != METHOD
           for i, line in enumerate(readable_text(p).splitlines(), 1) if STALE.search(line)]
  assert not stale, "cite docs/method.md (\"method §N.M\") instead:\n" + "\n".join(stale)


def test_the_checker_rejects_dangling_citations(tmp_path, known):
  good = tmp_path / "good.py"
  good.write_text('"""See method §4.3, §4.4 and §9.5; docs/method.md §5.5 (packing), §7.3."""\n')
  assert cited(good.read_text()) == ["4.3", "4.4", "9.5", "5.5", "7.3"]
  assert unresolved([good], known) == []
  bad = tmp_path / "bad.md"
  bad.write_text("As docs/method.md §4.9 says, and method §12, or method §9.18 and §3.1; see §5.2.\n")
  found = unresolved([bad], known)
  assert [b.split(": ")[1] for b in found[:3]] == ["method §4.9", "method §12", "method §9.18"]
  assert len(found) == 4 and "see §5.2" in found[3] and "not written as a citation" in found[3]
