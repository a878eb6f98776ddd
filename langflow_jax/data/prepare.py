"""Tokenize once, pack into fixed-length rows, store them as seekable local shards.

``prepare(recipe, out_dir)`` reads a corpus's raw documents (the embedded
corpus, ``file:PATH`` or a corpus of :mod:`catalog`), applies its detokenizer,
tokenizes in batches, packs and writes one directory per recipe::

    OUT/<source>-<tokenizer>-L<len>-<wrap|pad>[-noeos][-g<docs>x<shards>]/
        train.ids      int32 [rows, L], row-major, no header (np.memmap)
        train.lengths  int32 [rows]: real tokens per row (padded recipes only)
        train.json     manifest: recipe, special ids, rows/documents/tokens
        heldout.ids ...

The format is a raw array per split plus a JSON manifest. Rows have a fixed
size, so row ``i`` sits at byte ``4 * L * i``: a memory map gives O(1) random
access without a per-record decoder or an extra dependency (training from
prepared data needs only numpy). Each split is written under a temporary name
and renamed, manifest last, so an interrupted run never leaves a split that
looks complete.

Packing (method §5.5). ``wrap=True``: documents, each followed by EOS (unless
``insert_eos=False``), are concatenated and cut into chunks of L-2 tokens,
stored as ``[BOS] chunk [EOS]`` with no padding; the remainder is dropped.
With ``group_docs=1000, group_shards=16`` the remainder is dropped after every
1000 documents of each of 16 contiguous document shards, which is what the
official ``datasets.map(batched=True, num_proc=16)`` grouping does, and gives
the official block set when the documents come in the official order.
``wrap=False``: one row per document, ``[BOS] doc[:L-2] [SEP] PAD...`` (the
closing token is BERT's ``[SEP]``, EOS otherwise), with its length stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import pathlib
import time
from typing import Iterator, Sequence

import ml_collections
import numpy as np

from langflow_jax.data import catalog, detokenize, sources
from langflow_jax.data.tokenizer import Tokenizer, load_tokenizer
from langflow_jax.errors import DataError
from langflow_jax.files import write_atomic

log = logging.getLogger(__name__)
FORMAT = "langflow_jax.prepared/1"
SPLITS = ("train", "heldout")
BATCH_DOCS = 1000  # documents per tokenizer call


# ----------------------------------------------------------------------------- rows in memory


class RowMask:
  """The mask of padded rows from their lengths (``None``: every row full),
  indexable like the ``[N, L]`` boolean array it stands for."""

  def __init__(self, lengths: np.ndarray | None, rows: int, seq_len: int):
    self.lengths, self.shape = lengths, (rows, seq_len)
    self.dtype = np.dtype(bool)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, rows) -> np.ndarray:
    if self.lengths is None:
      if isinstance(rows, slice):
        lead = (len(range(*rows.indices(self.shape[0]))),)
      else:
        lead = np.shape(rows)  # () for one row, (n,) for an index array
      return np.ones(lead + (self.shape[1],), bool)
    return np.arange(self.shape[1]) < np.asarray(self.lengths[rows])[..., None]

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    out = self[slice(None)]
    return out if dtype is None else out.astype(dtype)


@dataclasses.dataclass
class PackedSplit:
  """Token rows of one split: ``ids`` int32 ``[N, L]`` (an array or a read-only
  memory map) and ``mask`` ``[N, L]`` (an array or a :class:`RowMask`)."""

  ids: np.ndarray
  mask: np.ndarray | RowMask

  def __len__(self) -> int:
    return self.ids.shape[0]

  @property
  def seq_len(self) -> int:
    return self.ids.shape[1]

  def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Rows ``rows`` as in-memory ``ids`` (int32) and ``mask`` (bool)."""
    rows = np.asarray(rows, np.int64)
    return {"ids": np.asarray(self.ids[rows], np.int32), "mask": np.asarray(self.mask[rows], bool)}


def token_stream(token_lists: Sequence[Sequence[int]], eos_id: int, insert_eos: bool = True) -> np.ndarray:
  """The documents concatenated, each followed by EOS when ``insert_eos``."""
  lengths = np.fromiter(map(len, token_lists), np.int64, len(token_lists))
  body = np.fromiter(itertools.chain.from_iterable(token_lists), np.int32, int(lengths.sum()))
  if not insert_eos:
    return body
  out = np.full(len(body) + len(token_lists), eos_id, np.int32)
  keep = np.ones(len(out), bool)
  keep[np.cumsum(lengths + 1) - 1] = False  # each document's EOS slot
  out[keep] = body
  return out


def wrap_rows(stream: np.ndarray, seq_len: int, bos_id: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """``[BOS] chunk [EOS]`` rows from a token stream, and the unused remainder."""
  if seq_len < 3:
    raise DataError(f"seq_len={seq_len} leaves no room between BOS and EOS.", "use seq_len >= 3.")
  chunk = seq_len - 2
  n = len(stream) // chunk
  ids = np.empty((n, seq_len), np.int32)
  ids[:, 0], ids[:, -1] = bos_id, eos_id
  ids[:, 1:-1] = stream[: n * chunk].reshape(n, chunk)
  return ids, stream[n * chunk:]


def pad_rows(token_lists: Sequence[Sequence[int]], seq_len: int, bos_id: int, end_id: int,
             pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """One ``[BOS] doc[:L-2] [end] PAD...`` row per document, and the row lengths."""
  ids = np.full((len(token_lists), seq_len), pad_id, np.int32)
  lengths = np.empty(len(token_lists), np.int32)
  for row, doc in enumerate(token_lists):
    body = doc[: seq_len - 2]
    ids[row, 0], ids[row, 1:len(body) + 1], ids[row, len(body) + 1] = bos_id, body, end_id
    lengths[row] = len(body) + 2
  return ids, lengths


def pack_wrapped(token_lists: Sequence[Sequence[int]], seq_len: int, bos_id: int, eos_id: int,
                 insert_eos: bool = True) -> PackedSplit:
  """Wrapped rows of a whole split held in memory (remainder dropped)."""
  ids, _ = wrap_rows(token_stream(token_lists, eos_id, insert_eos), seq_len, bos_id, eos_id)
  return PackedSplit(ids, np.ones_like(ids, dtype=bool))


def pack_padded(token_lists: Sequence[Sequence[int]], seq_len: int, bos_id: int, eos_id: int,
                pad_id: int) -> PackedSplit:
  """Padded rows of a whole split held in memory; ``eos_id`` closes each row."""
  ids, lengths = pad_rows(token_lists, seq_len, bos_id, eos_id, pad_id)
  return PackedSplit(ids, np.arange(seq_len) < lengths[:, None])


# ----------------------------------------------------------------------------- recipes


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Everything that decides the rows of a prepared dataset."""

  source: str                    # a catalog name, "sotu" or "file:PATH"
  tokenizer: str
  seq_len: int
  wrap: bool = True
  insert_eos: bool = True
  group_docs: int = 0            # drop the wrap remainder every N documents (official: 1000); 0: never
  group_shards: int = 1          # ... within each of this many contiguous document shards (official: 16)
  holdout_every: int = 10        # sotu / file: every k-th document is held out
  local: str = ""                # local raw files of a catalog corpus ("": TFDS / HF)

  @classmethod
  def from_config(cls, data: ml_collections.ConfigDict) -> "Recipe":
    return cls(source=data.name, tokenizer=data.tokenizer, seq_len=data.seq_len, wrap=bool(data.wrap),
               insert_eos=bool(data.get("insert_eos", True)), group_docs=int(data.get("group_docs", 0)),
               group_shards=int(data.get("group_shards", 1)), holdout_every=int(data.holdout_every),
               local=str(data.get("path", "") or ""))

  def dirname(self) -> str:
    """Tokenizer, length and packing in the name; a digest where the source is a user's file."""
    parts = [self.source, pathlib.Path(self.tokenizer).stem if self.tokenizer not in _named() else self.tokenizer,
             f"L{self.seq_len}", "wrap" if self.wrap else "pad"]
    if not self.insert_eos:
      parts.append("noeos")
    if self.group_docs:
      parts.append(f"g{self.group_docs}x{self.group_shards}")
    if self.source not in catalog.CORPORA:
      parts.append(f"h{self.holdout_every}")
    digest = _fingerprint(self)
    if digest:
      parts.append(digest)
    safe = ["".join(c if c.isalnum() or c in "._" else "-" for c in p.split("/")[-1])[:40] for p in parts]
    return "-".join(safe)


def _named() -> set[str]:
  from langflow_jax.data.tokenizer import TOKENIZERS

  return set(TOKENIZERS)


def _fingerprint(recipe: Recipe) -> str:
  """A digest of what a name cannot say: a user's file (path, size, time) or tokenizer file."""
  bits = []
  for text in (recipe.source[5:] if recipe.source.startswith("file:") else "", recipe.local,
               recipe.tokenizer if recipe.tokenizer not in _named() else ""):
    if text:
      path = pathlib.Path(text).expanduser()
      st = path.stat() if path.exists() else None
      bits.append(f"{path.resolve()}:{st.st_size if st else 0}:{st.st_mtime_ns if st else 0}")
  return hashlib.sha1("|".join(bits).encode()).hexdigest()[:10] if bits else ""


def group_bounds(n_docs: int, group_docs: int, group_shards: int) -> list[tuple[int, int]]:
  """Document ranges after which the wrap remainder is dropped.

  ``group_docs=0``: one range. Otherwise ``datasets``' contiguous sharding into
  ``group_shards`` pieces (the first ``n % shards`` one document longer), each
  cut into batches of ``group_docs`` from its start.
  """
  if group_docs <= 0:
    return [(0, n_docs)]
  shards = max(1, min(group_shards, n_docs))
  base, extra = divmod(n_docs, shards)
  out, start = [], 0
  for s in range(shards):
    stop = start + base + (1 if s < extra else 0)
    out += [(a, min(a + group_docs, stop)) for a in range(start, stop, group_docs)]
    start = stop
  return out


def raw_documents(recipe: Recipe, split: str, *, hf_path: str | None = None, hf_revision: str | None = None,
                  tfds_dir: str | None = None) -> tuple[catalog.Documents, str | None]:
  """The raw documents of ``split`` and the name of their detokenizer."""
  if recipe.source in catalog.CORPORA:
    corpus = catalog.CORPORA[recipe.source]
    docs = catalog.documents(corpus, split, local=recipe.local or None, hf_path=hf_path,
                             hf_revision=hf_revision, tfds_dir=tfds_dir)
    return docs, corpus.detokenizer
  if recipe.source.startswith("file:"):
    everything = sources.file_documents(recipe.source[len("file:"):])
  elif recipe.source in sources.SOURCES:
    everything = sources.SOURCES[recipe.source](None)
  else:
    raise DataError(f"unknown dataset '{recipe.source}'.",
                    f"use one of {sorted([*sources.SOURCES, *catalog.CORPORA])}, file:PATH for your own "
                    ".txt/.jsonl/.parquet, or prepared:DIR for a prepared dataset.")
  return catalog.ListDocuments(sources.split_documents(everything, split, recipe.holdout_every)), None


def packed_batches(docs: catalog.Documents, detokenizer: str | None, tokenizer: Tokenizer,
                   recipe: Recipe) -> Iterator[tuple[np.ndarray, np.ndarray | None, int, int]]:
  """``(ids [n, L], lengths [n] or None, documents read, tokens read)`` per batch of documents."""
  detok = detokenize.DETOKENIZERS[detokenizer] if detokenizer else None
  end_id = getattr(tokenizer, "sep_id", tokenizer.eos_id)
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
  for start, stop in group_bounds(len(docs), recipe.group_docs if recipe.wrap else 0, recipe.group_shards):
    remainder = np.empty(0, np.int32)
    for texts in docs.batches(start, stop, BATCH_DOCS):
      if detok is not None:
        texts = [detok(t) for t in texts]
      token_lists = tokenizer.encode_batch(texts)
      n_tokens = sum(map(len, token_lists))
      if recipe.wrap:
        stream = np.concatenate([remainder, token_stream(token_lists, tokenizer.eos_id, recipe.insert_eos)])
        ids, remainder = wrap_rows(stream, recipe.seq_len, tokenizer.bos_id, tokenizer.eos_id)
        yield ids, None, len(texts), n_tokens
      else:
        ids, lengths = pad_rows(token_lists, recipe.seq_len, tokenizer.bos_id, end_id, pad_id)
        yield ids, lengths, len(texts), n_tokens


# ----------------------------------------------------------------------------- on disk


def _manifest(recipe: Recipe, tokenizer: Tokenizer, split: str, rows: int, docs: int, tokens: int,
              detokenizer: str | None) -> dict:
  return {"format": FORMAT, "split": split, "rows": rows, "documents": docs, "tokens": tokens,
          "recipe": dataclasses.asdict(recipe), "detokenizer": detokenizer,
          "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                        "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}}


def write_split(out: pathlib.Path, split: str, batches: Iterator, recipe: Recipe, tokenizer: Tokenizer,
                detokenizer: str | None, total_docs: int) -> dict:
  """Streams ``packed_batches`` into ``out/<split>.*``; returns the manifest."""
  out.mkdir(parents=True, exist_ok=True)
  tmp = {k: out / f".{split}.{k}.tmp{os.getpid()}" for k in ("ids", "lengths")}
  rows = docs = tokens = 0
  last_log = time.monotonic()
  with open(tmp["ids"], "wb") as f_ids, open(tmp["lengths"], "wb") as f_len:
    for ids, lengths, n_docs, n_tokens in batches:
      f_ids.write(np.ascontiguousarray(ids, np.int32).tobytes())
      if lengths is not None:
        f_len.write(np.asarray(lengths, np.int32).tobytes())
      rows, docs, tokens = rows + len(ids), docs + n_docs, tokens + n_tokens
      if time.monotonic() - last_log > 30:
        log.info("%s/%s: %d of %d documents, %d rows", out.name, split, docs, total_docs, rows)
        last_log = time.monotonic()
  os.replace(tmp["ids"], out / f"{split}.ids")
  if recipe.wrap:
    tmp["lengths"].unlink()
  else:
    os.replace(tmp["lengths"], out / f"{split}.lengths")
  manifest = _manifest(recipe, tokenizer, split, rows, docs, tokens, detokenizer)
  write_atomic(out / f"{split}.json", json.dumps(manifest, indent=1))
  return manifest


def read_manifest(directory: pathlib.Path, split: str) -> dict | None:
  """The manifest of a complete split, or ``None`` (missing, damaged, or truncated data)."""
  try:
    manifest = json.loads((directory / f"{split}.json").read_text())
    expected = manifest["rows"] * manifest["recipe"]["seq_len"] * 4
    if manifest.get("format") != FORMAT or (directory / f"{split}.ids").stat().st_size != expected:
      return None
    if not manifest["recipe"]["wrap"] and (directory / f"{split}.lengths").stat().st_size != manifest["rows"] * 4:
      return None
    return manifest
  except (OSError, ValueError, KeyError, TypeError):
    return None


def open_split(directory: pathlib.Path, split: str) -> tuple[PackedSplit, dict]:
  """A prepared split as a memory-mapped :class:`PackedSplit`, and its manifest."""
  directory = pathlib.Path(directory).expanduser()
  manifest = read_manifest(directory, split)
  if manifest is None:
    have = sorted(p.stem for p in directory.glob("*.json")) if directory.is_dir() else []
    raise DataError(f"{directory} holds no complete prepared '{split}' split"
                    f"{f' (it has {have})' if have else ''}.",
                    "point at a directory written by `langflow-jax prepare` (the one holding <split>.json), "
                    "or rerun the prepare command.")
  rows, seq_len = manifest["rows"], manifest["recipe"]["seq_len"]
  if rows == 0:
    raise DataError(f"the prepared '{split}' split in {directory} has {manifest['tokens']} tokens, fewer than "
                    f"one sequence of {seq_len}.", "add more text or prepare with a shorter --seq-len.")
  ids = np.memmap(directory / f"{split}.ids", np.int32, "r", shape=(rows, seq_len))
  lengths = None if manifest["recipe"]["wrap"] else np.memmap(directory / f"{split}.lengths", np.int32, "r",
                                                               shape=(rows,))
  return PackedSplit(ids, RowMask(lengths, rows, seq_len)), manifest


def prepare(recipe: Recipe, out_dir: str | pathlib.Path, splits: Sequence[str] | None = None, *,
            tokenizer: Tokenizer | None = None, hf_path: str | None = None, hf_revision: str | None = None,
            tfds_dir: str | None = None, force: bool = False) -> pathlib.Path:
  """Prepares ``splits`` of ``recipe`` under ``out_dir/recipe.dirname()``; splits
  already complete there are kept unless ``force``. Returns the directory."""
  tokenizer = tokenizer or load_tokenizer(recipe.tokenizer)
  if recipe.source in catalog.CORPORA:
    available = [s for s in SPLITS if s in catalog.CORPORA[recipe.source].splits]
  else:
    available = [*SPLITS, "all"]  # "all": every document (the embedded corpus, a user's file)
  corpus = catalog.CORPORA.get(recipe.source)
  splits = list(splits or (["heldout"] if corpus and corpus.zero_shot else [s for s in available if s in SPLITS]))
  for split in splits:
    if split not in available:
      raise DataError(f"'{recipe.source}' has no '{split}' split.", f"use --splits {','.join(available)}.")
  out = pathlib.Path(out_dir).expanduser() / recipe.dirname()
  for split in splits:
    if not force and read_manifest(out, split) is not None:
      continue
    docs, detok = raw_documents(recipe, split, hf_path=hf_path, hf_revision=hf_revision, tfds_dir=tfds_dir)
    log.info("preparing %s/%s from %d documents", out.name, split, len(docs))
    write_split(out, split, packed_batches(docs, detok, tokenizer, recipe), recipe, tokenizer, detok, len(docs))
  return out


def prepare_named(name: str, out_dir: str | pathlib.Path, *, tokenizer: str | None = None,
                  seq_len: int | None = None, wrap: bool = True, insert_eos: bool = True,
                  official_groups: bool = False, splits: Sequence[str] | None = None, local: str | None = None,
                  holdout_every: int = 10, hf_path: str | None = None, hf_revision: str | None = None,
                  tfds_dir: str | None = None, force: bool = False) -> dict:
  """``langflow-jax prepare``: the protocol's tokenizer and length unless given;
  returns the directory, the per-split counts and the override that trains on it."""
  corpus = catalog.CORPORA.get(name)
  recipe = Recipe(source=name, tokenizer=tokenizer or (corpus.tokenizer if corpus else "sotu-bpe8k"),
                  seq_len=seq_len or (corpus.seq_len if corpus else 1024), wrap=wrap, insert_eos=insert_eos,
                  group_docs=1000 if official_groups else 0, group_shards=16 if official_groups else 1,
                  holdout_every=holdout_every, local=local or "")
  directory = prepare(recipe, out_dir, splits, hf_path=hf_path, hf_revision=hf_revision, tfds_dir=tfds_dir,
                      force=force)
  done = {s: read_manifest(directory, s) for s in (*SPLITS, "all")}
  return {"directory": str(directory),
          "splits": {s: {k: m[k] for k in ("rows", "documents", "tokens")} for s, m in done.items() if m},
          "train_with": f"--config.data.name={PREPARED_PREFIX}{directory} --config.data.tokenizer={recipe.tokenizer} "
                        f"--config.data.seq_len={recipe.seq_len}"}


PREPARED_PREFIX = "prepared:"
