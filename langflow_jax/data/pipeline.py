"""From a dataset name to batches: prepare (cached), shuffle, shard, prefetch.

``load_split(data_cfg, split)`` returns the packed rows of a split
(:mod:`prepare` documents packing and the on-disk format):

* ``prepared:DIR``: a directory written by ``langflow-jax prepare``; its
  manifest must agree with ``data.seq_len`` (and ``data.tokenizer``);
* any other name (``sotu``, ``file:PATH``, ``lm1b``, ``owt``, ...): prepared on
  first use into ``$LANGFLOW_JAX_CACHE/prepared/`` (default
  ``~/.cache/langflow_jax``) and memory-mapped from there afterwards.

Batches come from a grain ``MapDataset`` pipeline: row indices shuffled by
seed (a new permutation each epoch, O(1) memory), grouped into global batches,
each process keeping its own slice of rows, read in ``data.prefetch_threads``
grain threads ``data.prefetch`` batches ahead. The batch of step ``s`` is a
pure function of (seed, s), so the iterator state is just ``{"step": s}``
(JSON, saved in the checkpoint's metadata) and a resumed run sees exactly the
same data. Threads, not processes: grain's multiprocess prefetch
(``mp_prefetch``) needs absl flags parsed first (``flags.FLAGS.mark_as_parsed()``)
and brings nothing here, since a batch is one memory-mapped gather.
"""

from __future__ import annotations

import pathlib
from typing import Iterator

import grain
import ml_collections
import numpy as np

from langflow_jax.data import prepare
from langflow_jax.data.prepare import PackedSplit, RowMask, pack_padded, pack_wrapped  # noqa: F401 (API)
from langflow_jax.data.tokenizer import Tokenizer, cache_dir, load_tokenizer
from langflow_jax.errors import ConfigError, DataError

PREPARED = prepare.PREPARED_PREFIX


def _check_prepared(manifest: dict, data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer | None,
                    directory: pathlib.Path) -> None:
  recipe, tok = manifest["recipe"], manifest["tokenizer"]
  if recipe["seq_len"] != data_cfg.seq_len:
    raise ConfigError(f"{directory} was prepared with seq_len={recipe['seq_len']}, but data.seq_len="
                      f"{data_cfg.seq_len}.", f"set --config.data.seq_len={recipe['seq_len']} or prepare again "
                      f"with --seq-len {data_cfg.seq_len}.")
  if tokenizer is not None and (tok["name"], tok["vocab_size"]) != (tokenizer.name, tokenizer.vocab_size):
    raise ConfigError(f"{directory} was tokenized with '{tok['name']}' ({tok['vocab_size']} tokens), but "
                      f"data.tokenizer is '{tokenizer.name}' ({tokenizer.vocab_size}).",
                      f"set --config.data.tokenizer={recipe['tokenizer']}.")


def load_split(data_cfg: ml_collections.ConfigDict, split: str,
               tokenizer: Tokenizer | None = None, use_cache: bool = True) -> PackedSplit:
  """Packed rows of ``split`` (``train``/``heldout``) of ``data_cfg.name``.

  ``use_cache=False`` packs in memory and writes nothing.
  """
  name = data_cfg.name
  if name.startswith(PREPARED):
    directory = pathlib.Path(name[len(PREPARED):]).expanduser()
    packed, manifest = prepare.open_split(directory, split)
    _check_prepared(manifest, data_cfg, tokenizer, directory)
    return packed
  recipe = prepare.Recipe.from_config(data_cfg)
  tokenizer = tokenizer or load_tokenizer(data_cfg.tokenizer)
  if not use_cache:
    docs, detok = prepare.raw_documents(recipe, split)
    parts = list(prepare.packed_batches(docs, detok, tokenizer, recipe))
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, recipe.seq_len), np.int32)
    lengths = None if recipe.wrap else np.concatenate([p[1] for p in parts]).astype(np.int32)
    if len(ids) == 0:
      raise DataError(f"the {split} split of '{name}' has {sum(p[3] for p in parts)} tokens, fewer than one "
                      f"sequence of {recipe.seq_len}.", "add more text or lower --config.data.seq_len.")
    return PackedSplit(ids, RowMask(lengths, len(ids), recipe.seq_len))
  directory = prepare.prepare(recipe, cache_dir() / "prepared", [split], tokenizer=tokenizer)
  try:
    packed, _ = prepare.open_split(directory, split)
  except DataError as e:
    if "fewer than one sequence" in e.problem:
      raise DataError(e.problem.replace(f"prepared '{split}' split in {directory}", f"{split} split of '{name}'"),
                      "add more text or lower --config.data.seq_len.") from None
    raise
  return packed


class BatchIterator:
  """Global batches of a shuffled, endlessly repeated split; this process's rows.

  ``get_state()`` is ``{"step": s}`` (batches consumed, not batches prefetched);
  ``set_state`` resumes exactly. ``prefetch`` batches are read ahead by
  ``threads`` grain threads (``prefetch=0``: read on demand).
  """

  def __init__(self, split: PackedSplit, global_batch: int, seed: int, *, step: int = 0,
               process_index: int = 0, process_count: int = 1, prefetch: int = 2, threads: int = 1):
    if global_batch % process_count:
      raise DataError(f"global batch {global_batch} does not split over {process_count} processes.",
                      "choose a batch size divisible by the process count.")
    self.split = split
    self.global_batch = global_batch
    self.local_batch = global_batch // process_count
    self.offset = process_index * self.local_batch
    self.step = step
    self.prefetch, self.threads = prefetch, max(1, threads)
    # Element s of `order` is the s-th row of the endless stream: grain draws a
    # fresh permutation of the rows each epoch from the seed; batch s takes
    # elements s*G .. s*G+G-1 (batches may straddle epochs).
    order = grain.MapDataset.range(len(split)).shuffle(seed=seed).repeat()
    self._batches = order.batch(global_batch).map(self._read)
    self._stream = None

  def _read(self, rows_G: np.ndarray) -> dict[str, np.ndarray]:
    return self.split.take(rows_G[self.offset:self.offset + self.local_batch])

  def get_state(self) -> dict:
    return {"step": int(self.step)}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])
    self._stream = None

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    return self._batches[step]

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.prefetch <= 0:
      batch = self.batch_at(self.step)
    else:
      if self._stream is None:
        options = grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=self.prefetch)
        self._stream = iter(self._batches.slice(slice(self.step, None)).to_iter_dataset(options))
      batch = next(self._stream)
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
    if valid.any():
      got = split.take(rows[valid])
      ids[valid], mask[valid] = got["ids"], got["mask"]
    yield {"ids": ids, "mask": mask}


def unigram_log_prior(split: PackedSplit, vocab_size: int, max_rows: int = 65536,
                      smoothing: float = 0.5) -> np.ndarray:
  """log p(v) of each token over (the first ``max_rows`` rows of) a split, add-``smoothing``
  counts, float32 [vocab_size]: the context-free prior of the data."""
  rows = min(len(split), max_rows)
  taken = split.take(np.arange(rows))
  ids = np.asarray(taken["ids"])[np.asarray(taken["mask"], bool)]
  counts = np.bincount(ids[(ids >= 0) & (ids < vocab_size)], minlength=vocab_size).astype(np.float64)
  return np.log((counts + smoothing) / (counts.sum() + smoothing * vocab_size)).astype(np.float32)
