"""Corpus and sample statistics reported next to model scores."""

from __future__ import annotations

import numpy as np


def unigram_entropy(ids: np.ndarray, mask: np.ndarray | None = None) -> float:
  """Entropy (nats) of the token frequency distribution of a whole corpus.

  This is the loss of the best context-free predictor; a language model that
  learned anything beyond word frequencies scores below it.
  """
  values = np.asarray(ids).reshape(-1)
  if mask is not None:
    values = values[np.asarray(mask).reshape(-1).astype(bool)]
  if values.size == 0:
    return 0.0
  counts = np.bincount(values)
  p = counts[counts > 0] / values.size
  return float(-np.sum(p * np.log(p)))


def sequence_unigram_entropy(ids_NxL: np.ndarray) -> float:
  """Mean over sequences of each sequence's own unigram entropy (nats).

  The diversity figure reported next to generative perplexity (spec 6.2):
  repetitive samples score low here even when their perplexity looks good.
  """
  ids_NxL = np.asarray(ids_NxL)
  return float(np.mean([unigram_entropy(row) for row in ids_NxL])) if len(ids_NxL) else 0.0
