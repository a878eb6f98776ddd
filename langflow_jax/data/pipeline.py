"""From documents to fixed-length batches: tokenize, pack, cache, shuffle, shard.

Packing follows the official protocol (spec 5.5). With ``wrap=True`` every
document is tokenized without specials, followed by EOS, concatenated, and cut
into chunks of L-2 tokens, each stored as ``[BOS] chunk [EOS]`` with an
all-ones mask; the remainder is dropped. With ``wrap=False`` each document
becomes ``[BOS] doc [EOS]`` truncated to L and padded, with a mask over the
real tokens.

Batches come from a grain ``MapDataset`` shuffled by seed (a new permutation
each epoch). The batch of step ``s`` is a pure function of (seed, s), so the
iterator state is the step and a resumed run sees exactly the same data. Each
process reads only its rows of the global batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Iterator

import grain
import ml_collections
import numpy as np

from langflow_jax.data import sources
from langflow_jax.data.tokenizer import Tokenizer, load_tokenizer
from langflow_jax.errors import DataError


@dataclasses.dataclass
class PackedSplit:
  """Token blocks of one split: ``ids`` int32 [N, L] and ``mask`` bool [N, L]."""

  ids: np.ndarray
  mask: np.ndarray

  def __len__(self) -> int:
    return self.ids.shape[0]

  @property
  def seq_len(self) -> int:
    return self.ids.shape[1]


def pack_wrapped(token_lists: list[list[int]], seq_len: int, bos_id: int, eos_id: int) -> PackedSplit:
  """``[BOS] chunk [EOS]`` blocks from the EOS-joined token stream."""
  if seq_len < 3:
    raise DataError(f"seq_len={seq_len} leaves no room between BOS and EOS.", "use seq_len >= 3.")
  stream = np.fromiter((t for doc in token_lists for t in (*doc, eos_id)), dtype=np.int32)
  chunk = seq_len - 2
  n = len(stream) // chunk
  body = stream[: n * chunk].reshape(n, chunk)
  ids = np.concatenate([np.full((n, 1), bos_id, np.int32), body, np.full((n, 1), eos_id, np.int32)], 1)
  return PackedSplit(ids, np.ones_like(ids, dtype=bool))


def pack_padded(token_lists: list[list[int]], seq_len: int, bos_id: int, eos_id: int,
                pad_id: int) -> PackedSplit:
  """One ``[BOS] doc [EOS] PAD...`` row per document, truncated to ``seq_len``."""
  ids = np.full((len(token_lists), seq_len), pad_id, np.int32)
  mask = np.zeros((len(token_lists), seq_len), bool)
  for row, doc in enumerate(token_lists):
    toks = [bos_id, *doc, eos_id][:seq_len]
    ids[row, : len(toks)] = toks
    mask[row, : len(toks)] = True
  return PackedSplit(ids, mask)


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("LANGFLOW_JAX_CACHE", pathlib.Path.home() / ".cache" / "langflow_jax"))


def _source_fingerprint(name: str) -> str:
  if name.startswith("file:"):
    path = pathlib.Path(name[5:]).expanduser()
    if path.is_file():
      st = path.stat()
      return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
  return name


def cache_key(data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str) -> str:
  """A file name that states tokenizer, length, wrap and split, plus a hash of the rest."""
  desc = json.dumps([_source_fingerprint(data_cfg.name), tokenizer.name, tokenizer.vocab_size,
                     split, data_cfg.seq_len, bool(data_cfg.wrap), data_cfg.holdout_every])
  digest = hashlib.sha1(desc.encode()).hexdigest()[:12]
  safe = "".join(c if c.isalnum() else "-" for c in data_cfg.name.split("/")[-1])[:40]
  wrap = "wrap" if data_cfg.wrap else "pad"
  return f"{safe}_{tokenizer.name}_L{data_cfg.seq_len}_{wrap}_{split}_{digest}.npz"


def _load_cached(path: pathlib.Path) -> PackedSplit | None:
  try:
    with np.load(path) as f:
      return PackedSplit(f["ids"], f["mask"])
  except Exception:  # a truncated or foreign file: rebuild it
    return None


def _save_cached(path: pathlib.Path, split: PackedSplit) -> None:
  # Written under a temporary name and renamed, so an interrupted write is
  # never mistaken for a complete cache entry.
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
  np.savez(tmp, ids=split.ids, mask=split.mask)
  os.replace(tmp, path)


def load_split(data_cfg: ml_collections.ConfigDict, split: str,
               tokenizer: Tokenizer | None = None, use_cache: bool = True) -> PackedSplit:
  """Tokenized, packed blocks for ``split`` of ``data_cfg`` (cached on disk)."""
  tokenizer = tokenizer or load_tokenizer(data_cfg.tokenizer)
  path = cache_dir() / cache_key(data_cfg, tokenizer, split)
  if use_cache and path.is_file():
    packed = _load_cached(path)
    if packed is not None:
      return packed
  docs = sources.load_documents(data_cfg, split)
  token_lists = tokenizer.encode_batch(docs)
  if data_cfg.wrap:
    packed = pack_wrapped(token_lists, data_cfg.seq_len, tokenizer.bos_id, tokenizer.eos_id)
  else:
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    packed = pack_padded(token_lists, data_cfg.seq_len, tokenizer.bos_id, tokenizer.eos_id, pad)
  if len(packed) == 0:
    n_tokens = sum(len(t) for t in token_lists)
    raise DataError(
        f"the {split} split of '{data_cfg.name}' has {n_tokens} tokens, fewer than one sequence "
        f"of {data_cfg.seq_len}.", "add more text or lower --config.data.seq_len.")
  if use_cache:
    try:
      _save_cached(path, packed)
    except OSError:
      pass  # a read-only cache only costs time
  return packed


class BatchIterator:
  """Global batches of a shuffled, endlessly repeated split; this process's rows.

  ``state`` is ``{"step": s}``; ``set_state`` resumes exactly.
  """

  def __init__(self, split: PackedSplit, global_batch: int, seed: int, *, step: int = 0,
               process_index: int = 0, process_count: int = 1):
    if global_batch % process_count:
      raise DataError(f"global batch {global_batch} does not split over {process_count} processes.",
                      "choose a batch size divisible by the process count.")
    self.split = split
    self.global_batch = global_batch
    self.local_batch = global_batch // process_count
    self.offset = process_index * self.local_batch
    self.step = step
    # repeat() then per-epoch shuffling: grain reshuffles each epoch from the seed.
    self._ids = grain.MapDataset.source(np.arange(len(split))).shuffle(seed=seed).repeat()

  def get_state(self) -> dict:
    return {"step": int(self.step)}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    start = step * self.global_batch + self.offset
    rows = np.array([self._ids[i] for i in range(start, start + self.local_batch)])
    return {"ids": self.split.ids[rows], "mask": self.split.mask[rows]}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch


def eval_batches(split: PackedSplit, batch_size: int, num_batches: int = 0,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Sequential, unshuffled batches (the last one padded with masked rows).

  ``num_batches=0`` covers the whole split. Rows beyond the split have an
  all-false mask and contribute nothing to sums.
  """
  total = -(-len(split) // batch_size) if num_batches <= 0 else num_batches
  local = batch_size // process_count
  for b in range(total):
    ids = np.zeros((local, split.seq_len), np.int32)
    mask = np.zeros((local, split.seq_len), bool)
    start = b * batch_size + process_index * local
    rows = np.arange(start, start + local)
    valid = rows < len(split)
    ids[valid] = split.ids[rows[valid]]
    mask[valid] = split.mask[rows[valid]]
    yield {"ids": ids, "mask": mask}
