"""Corpus and sample statistics reported next to model scores, and generative perplexity (method §6.2).

Pure functions of token ids and scorers; ``langflow-jax genppl`` (``genppl.py``) applies them to a sample file.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence

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

  The diversity figure reported next to generative perplexity (method §6.2):
  repetitive samples score low here even when their perplexity looks good.
  """
  ids_NxL = np.asarray(ids_NxL)
  return float(np.mean([unigram_entropy(row) for row in ids_NxL])) if len(ids_NxL) else 0.0


# --------------------------------------------------------------------------- generative perplexity


class SequenceScorer(Protocol):
  """An autoregressive scorer of token sequences, in its own vocabulary.

  Returns, per sequence, the summed next-token NLL (nats) of tokens 1..n-1
  given their prefix, and that count n-1 (0 for sequences shorter than 2).
  The in-package AR baseline, GPT-2 and :class:`BigramLM` all fit.
  """

  def __call__(self, sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]: ...


def generative_perplexity(sample_ids: Sequence[Sequence[int]], scorer: SequenceScorer, *,
                          retokenize: Callable[[Sequence[int]], list[int]] | None = None) -> dict[str, float]:
  """Gen. PPL of samples under ``scorer`` with their unigram entropy (method §6.2).

  ``gen_ppl = exp(sum NLL / sum (n - 1))``: token-weighted, nats. The entropy
  is the mean per-sample unigram entropy of the GENERATOR's ids, reported
  next to it so that repetitive text cannot pass for quality.
  ``retokenize`` maps generator ids to scorer ids (decode, then the scorer's
  tokenizer) when their vocabularies differ.
  """
  sequences = [list(map(int, s)) for s in sample_ids]
  if not sequences:
    raise ValueError("no samples to score")
  scored = [retokenize(s) for s in sequences] if retokenize is not None else sequences
  nll, count = scorer(scored)
  nll, count = np.asarray(nll, np.float64), np.asarray(count, np.float64)
  total = float(count.sum())
  per_token = float(nll.sum() / max(total, 1.0))
  return {
      "gen_ppl": math.exp(per_token),
      "nll_per_token": per_token,
      "scored_tokens": int(total),
      "entropy": float(np.mean([unigram_entropy(np.asarray(s, np.int64)) for s in sequences])),
      "num_samples": len(sequences),
  }


class BigramLM:
  """Interpolated Kneser-Ney bigram model over token ids: a cheap AR scorer.

  P(w | v) = max(c(v, w) - d, 0) / c(v) + d N1+(v .) / c(v) P_cont(w), with the
  continuation probability P_cont(w) = (N1+(. w) + 1) / (N1+(. .) + V) (add-one,
  so unseen tokens keep a finite cost). Fitted on adjacent pairs within rows.
  """

  def __init__(self, rows: Sequence[Sequence[int]] | np.ndarray, vocab_size: int, discount: float = 0.75,
               mask: np.ndarray | None = None):
    self.vocab_size = int(vocab_size)
    self.discount = float(discount)
    prev, nxt = [], []
    for i, row in enumerate(rows):
      row = np.asarray(row, np.int64)
      if mask is not None:
        row = row[np.asarray(mask[i], bool)]
      prev.append(row[:-1])
      nxt.append(row[1:])
    prev, nxt = np.concatenate(prev), np.concatenate(nxt)
    v = self.vocab_size
    self._codes, self._pair_counts = np.unique(prev * v + nxt, return_counts=True)
    uprev, unext = self._codes // v, self._codes % v
    self._context = np.bincount(prev, minlength=v).astype(np.float64)
    self._types_after = np.bincount(uprev, minlength=v).astype(np.float64)
    cont = np.bincount(unext, minlength=v).astype(np.float64)
    self._p_cont = (cont + 1.0) / (len(self._codes) + v)

  def log_prob(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """log P(next | prev), elementwise."""
    prev, nxt = np.asarray(prev, np.int64), np.asarray(nxt, np.int64)
    codes = prev * self.vocab_size + nxt
    idx = np.clip(np.searchsorted(self._codes, codes), 0, len(self._codes) - 1)
    pair = np.where(self._codes[idx] == codes, self._pair_counts[idx], 0).astype(np.float64)
    ctx = self._context[prev]
    safe = np.maximum(ctx, 1.0)
    backoff = np.where(ctx > 0, self.discount * self._types_after[prev] / safe, 1.0)
    p = np.maximum(pair - self.discount, 0.0) / safe + backoff * self._p_cont[nxt]
    return np.log(p)

  def __call__(self, sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    nll = np.zeros(len(sequences))
    count = np.zeros(len(sequences))
    for i, s in enumerate(sequences):
      s = np.asarray(s, np.int64)
      if len(s) > 1:
        nll[i] = -np.sum(self.log_prob(s[:-1], s[1:]))
        count[i] = len(s) - 1
    return nll, count


def causal_lm_scorer(logits_fn: Callable, params=None, *, max_len: int, batch_size: int = 32,
                     bucket: int = 64) -> SequenceScorer:
  """A :class:`SequenceScorer` from a causal LM ``logits_fn(params, ids_BxL) -> logits_BxLxV``.

  ``params`` (any pytree, e.g. an NNX state) is passed to the jitted function
  as an argument, so weights are never baked into the compiled program.

  Sequences are truncated to ``max_len`` (as the official protocol truncates
  at 1024), right-padded to a multiple of ``bucket`` and batched to a fixed
  ``batch_size`` (few compilations); the NLL is reduced on device, so the
  logits never leave it. Padding is masked, never attended to by real tokens
  of a causal model.
  """
  import jax
  import jax.numpy as jnp

  @jax.jit
  def batch_nll(params, ids_BxL, mask_BxL):
    logits = logits_fn(params, ids_BxL).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    tok = jnp.take_along_axis(logp, ids_BxL[:, 1:, None], axis=-1)[..., 0]
    m = mask_BxL[:, 1:].astype(jnp.float32)
    return -jnp.sum(tok * m, axis=-1), jnp.sum(m, axis=-1)

  def score(sequences):
    return score_in_batches(
        [list(s)[:max_len] for s in sequences], lambda ids, mask: jax.device_get(batch_nll(params, ids, mask)),
        batch_size=batch_size,
        width=lambda chunk: min(max_len, max(bucket, -(-max(len(s) for s in chunk) // bucket) * bucket)))

  return score


def score_in_batches(sequences: Sequence[Sequence[int]], score_batch: Callable, *, batch_size: int,
                     width: Callable[[Sequence[Sequence[int]]], int]) -> tuple[np.ndarray, np.ndarray]:
  """Each sequence's (summed NLL, scored tokens) from ``score_batch(ids_BxW, mask_BxW)``: the
  sequences right-padded (masked) into batches of ``batch_size`` rows (the last one filled with
  empty rows) of ``width(chunk)`` columns, so that a scorer compiles for few shapes."""
  nll, count = np.zeros(len(sequences)), np.zeros(len(sequences))
  for start in range(0, len(sequences), batch_size):
    chunk = sequences[start:start + batch_size]
    ids = np.zeros((batch_size, width(chunk)), np.int32)
    mask = np.zeros(ids.shape, bool)
    for r, s in enumerate(chunk):
      ids[r, :len(s)], mask[r, :len(s)] = s, True
    n, c = score_batch(ids, mask)
    nll[start:start + len(chunk)] = np.asarray(n)[:len(chunk)]
    count[start:start + len(chunk)] = np.asarray(c)[:len(chunk)]
  return nll, count
