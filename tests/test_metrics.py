"""Generation metrics: entropy, the Gen-PPL protocol, the bigram and causal-LM scorers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from langflow_jax import metrics


def test_sequence_entropy_catches_repetition():
  varied = np.arange(16).reshape(2, 8)
  repeated = np.zeros((2, 8), np.int64)
  assert metrics.sequence_unigram_entropy(varied) == pytest.approx(math.log(8))
  assert metrics.sequence_unigram_entropy(repeated) == 0.0


def test_gen_ppl_is_token_weighted_and_entropy_uses_generator_ids():
  def scorer(seqs):  # 1 nat for every predicted token of a length-3 sequence, 2 nats otherwise
    nll = np.array([(len(s) - 1) * (1.0 if len(s) == 3 else 2.0) for s in seqs])
    return nll, np.array([len(s) - 1 for s in seqs], float)

  samples = [[1, 2, 3], [4, 4, 4, 4, 4, 4]]
  r = metrics.generative_perplexity(samples, scorer)
  # (2 * 1 + 5 * 2) / 7 nats per token, not the mean of the per-sample values
  assert r["nll_per_token"] == pytest.approx(12 / 7)
  assert r["gen_ppl"] == pytest.approx(math.exp(12 / 7))
  assert r["scored_tokens"] == 7 and r["num_samples"] == 2
  assert r["entropy"] == pytest.approx(math.log(3) / 2)
  # A retokenizer changes what the scorer sees, not the entropy.
  r2 = metrics.generative_perplexity(samples, scorer, retokenize=lambda s: list(s) + [0])
  assert r2["scored_tokens"] == 9 and r2["entropy"] == r["entropy"]


def test_bigram_is_a_normalised_kneser_ney_model():
  rng = np.random.default_rng(0)
  rows = rng.integers(0, 6, size=(20, 30))
  rows[:, 1::2] = (rows[:, ::2] + 1) % 6  # odd positions follow their predecessor
  lm = metrics.BigramLM(rows, vocab_size=8)
  for prev in range(8):  # seen contexts and unseen ones (6, 7) are distributions
    p = np.exp(lm.log_prob(np.full(8, prev), np.arange(8)))
    assert p.sum() == pytest.approx(1.0, abs=1e-9) and np.all(p > 0)
  seen = lm.log_prob(np.array([2]), np.array([3]))[0]
  assert seen > lm.log_prob(np.array([2]), np.array([7]))[0]
  nll, count = lm([[2, 3, 4], [5]])
  assert list(count) == [2, 0] and nll[1] == 0.0
  assert nll[0] == pytest.approx(-(lm.log_prob(np.array([2, 3]), np.array([3, 4]))).sum())
  # Structured text scores better than shuffled text.
  shuffled = rng.permutation(rows.ravel()).reshape(rows.shape)
  assert metrics.generative_perplexity(rows, lm)["gen_ppl"] < metrics.generative_perplexity(shuffled, lm)["gen_ppl"]


def test_causal_lm_scorer_matches_direct_computation():
  # A "causal LM" whose next-token logits depend on the current token only.
  table = jax.random.normal(jax.random.PRNGKey(0), (10, 10))
  scorer = metrics.causal_lm_scorer(lambda t, ids: t[ids], table, max_len=6, batch_size=2, bucket=4)
  seqs = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 1, 2], [3], [0, 0]]
  nll, count = scorer(seqs)
  logp = np.asarray(jax.nn.log_softmax(table, axis=-1))
  for s, n, c in zip(seqs, nll, count):
    s = s[:6]  # truncated at max_len
    assert c == max(len(s) - 1, 0)
    assert n == pytest.approx(-sum(logp[a, b] for a, b in zip(s[:-1], s[1:])), rel=1e-5, abs=1e-6)
