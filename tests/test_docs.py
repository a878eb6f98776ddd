"""Every citation of docs/method.md in the repository names a section that exists.

The convention (top of docs/method.md): code cites ``method §N`` or
``method §N.M``, Markdown and notebooks ``docs/method.md §N.M``; a list repeats
the sign (``method §4.3, §4.4``). Sections 9 and 10 are numbered lists, so
their items are cited as N.k. Inside docs/method.md a bare § cites its own
sections.

The pages themselves (README.md, docs/*.md): every relative link and heading
anchor resolves, every docs page is linked from the front page, which stays
under 250 lines; every block that experiments/render_docs.py generates is what
it makes of the current experiments/results/ and config (a re-run result is
followed by ``python experiments/render_docs.py``), every results JSON is shown
somewhere; the README's code map names each module in its layer.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys

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


# --------------------------------------------------------------------------- the pages: links, generated blocks, code map

sys.path.insert(0, str(ROOT))
from experiments import render_docs  # noqa: E402

README = ROOT / "README.md"
PAGES = render_docs.pages()
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^()\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
  return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def heading_anchors(path: pathlib.Path) -> set[str]:
  found, seen = set(), {}
  for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
    if m := re.match(r"^#{1,6} (.+?)\s*#*$", line):
      base = slug(m.group(1))
      n = seen.get(base, 0)
      seen[base] = n + 1
      found.add(base if n == 0 else f"{base}-{n}")
  return found


def broken_links(path: pathlib.Path) -> list[str]:
  """Relative links of a Markdown page whose file (or heading anchor) does not exist."""
  bad = []
  for target in LINK.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
      continue
    file, _, anchor = target.partition("#")
    dest = (path.parent / file).resolve() if file else path
    if not dest.exists():
      bad.append(f"{shown(path)}: {target} (no such file)")
    elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest):
      bad.append(f"{shown(path)}: {target} (no heading with that anchor in {shown(dest)})")
  return bad


def test_slug_follows_github():
  assert slug("Generative perplexity (`langflow-jax genppl`)") == "generative-perplexity-langflow-jax-genppl"
  assert slug("Preparing the paper's datasets (once, with internet)") == \
      "preparing-the-papers-datasets-once-with-internet"
  assert slug("Cost and quality against steps (`experiments/bench_sampling.py`)") == \
      "cost-and-quality-against-steps-experimentsbench_samplingpy"


def test_every_relative_link_resolves():
  results_pages = sorted((ROOT / "experiments" / "results").glob("*.md"))
  pages = [*PAGES, *results_pages, ROOT / "tests" / "fixtures" / "official_tiny" / "README.md"]
  bad = [b for p in pages if p.exists() for b in broken_links(p)]
  assert not bad, "links that go nowhere:\n" + "\n".join(bad)


def test_the_link_checker_finds_broken_links(tmp_path):
  (tmp_path / "other.md").write_text("# A heading, with `code`\n")
  page = tmp_path / "page.md"
  page.write_text("[ok](other.md#a-heading-with-code) [self](#top) [gone](missing.md) "
                  "[bad anchor](other.md#nope) [web](https://example.com)\n\n# Top\n\n```\n[in code](nowhere.md)\n```\n")
  found = broken_links(page)
  assert len(found) == 2 and "missing.md" in found[0] and "other.md#nope" in found[1], found


def test_every_docs_page_is_linked_from_the_front_page():
  linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(README.read_text(encoding="utf-8"))}
  missing = [shown(p) for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
  assert not missing, f"docs pages the README does not link: {missing}"


def test_the_front_page_fits_on_a_few_screens():
  lines = README.read_text(encoding="utf-8").count("\n")
  assert lines < 250, f"README.md has {lines} lines; move reference material to docs/"


def test_generated_blocks_match_the_results():
  stale = render_docs.stale_blocks(PAGES, render_docs.Results())
  assert not stale, ("blocks that differ from what experiments/results/ and the code give "
                     "(run `python experiments/render_docs.py`):\n" + "\n".join(stale))


def test_every_results_json_is_shown_on_a_page():
  used = {m.group("name") for p in PAGES for m in render_docs.MARKER.finditer(p.read_text(encoding="utf-8"))}
  shown_files = {s for name in used for s in render_docs.BLOCKS[name].sources}
  results = {p.name for p in render_docs.RESULTS.glob("*.json")}
  assert results <= shown_files, f"results files no page shows: {sorted(results - shown_files)}"
  opened = {m for p in PAGES for m in re.findall(r"<!-- (?:results|generated):([\w.-]+) -->", p.read_text())}
  assert opened == used, f"markers without their closing comment: {sorted(opened - used)}"
  assert {"headline", "known_entropy"} <= used


def test_a_changed_result_makes_its_blocks_stale(tmp_path):
  import shutil

  results = tmp_path / "results"
  shutil.copytree(render_docs.RESULTS, results)
  data = json.loads((results / "baselines.json").read_text())
  data["results"]["langflow"]["nats_per_token"] += 0.5
  (results / "baselines.json").write_text(json.dumps(data))
  stale = render_docs.stale_blocks(PAGES, render_docs.Results(results))
  assert "README.md: headline" in stale and "docs/results.md: baselines" in stale, stale
  assert not any(s.endswith((": schedule", ": serving", ": settings")) for s in stale), stale


def _code_map() -> tuple[str, str]:
  text = README.read_text(encoding="utf-8")
  section = text[text.index("## Code map"):]
  section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
  library, _, applications = section.partition("**Library**")[2].partition("**Applications**")
  return library, applications.partition("| directory |")[0]  # the directory table names other files


def test_the_code_map_names_every_module_in_its_layer():
  from tests.test_layering import APPLICATION

  library, applications = _code_map()
  named = set(re.findall(r"`(?:langflow_jax/)?((?:data/|baselines/)?\w+\.py)`", library + applications))
  files = {str(p.relative_to(ROOT / "langflow_jax")) for p in (ROOT / "langflow_jax").rglob("*.py")
           if p.name != "__init__.py" and "__pycache__" not in p.parts}
  basenames = {f.rsplit("/", 1)[-1]: f for f in files}
  resolved = {basenames.get(n, n) if "/" not in n else n for n in named}
  assert files <= resolved, f"modules the code map leaves out: {sorted(files - resolved)}"
  assert resolved <= files, f"code map entries that are no module: {sorted(resolved - files)}"
  for name in APPLICATION:
    assert re.search(rf"`(?:langflow_jax/)?{name}\.py`", applications), f"{name}.py is not under Applications"
    assert not re.search(rf"`(?:langflow_jax/)?{name}\.py`", library), f"{name}.py is listed as library"


def test_the_transcripts_are_of_the_commands_the_recorder_runs():
  from experiments import record_transcripts

  recorded = json.loads((render_docs.RESULTS / "transcripts.json").read_text())
  assert [r["command"] for r in recorded["runs"]] == list(record_transcripts.COMMANDS)
  assert "langflow-jax demo --workdir runs/demo" in (ROOT / "Makefile").read_text()  # what `make demo` runs
