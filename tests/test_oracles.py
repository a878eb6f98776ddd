"""Exact-posterior denoisers: the bound of an exact posterior is the source's NLL."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from langflow_jax import likelihood as lk
from langflow_jax import oracles
from langflow_jax import schedule as schedule_lib
from langflow_jax.data import markov
from langflow_jax.model import normalized_rows

L, D = 16, 16


@pytest.fixture(scope="module")
def chain_data():
  chain = markov.random_chain(8, 3, seed=1)
  ids = chain.sample(np.random.default_rng(3), 256, L) + 1  # token 0 is a separator that never occurs
  log_p = np.log(chain.stationary[ids[:, 0] - 1]) + np.log(chain.transition[ids[:, :-1] - 1, ids[:, 1:] - 1]).sum(1)
  embeddings = normalized_rows(jax.random.normal(jax.random.PRNGKey(0), (chain.num_states + 1, D)))
  schedule = schedule_lib.GumbelSchedule(1.5, 1.2, 2.0)  # near information-uniform for this chain
  return chain, ids, -log_p / L, embeddings, schedule


def _vr_bound(model, ids, steps, estimator="exact", key=1):
  opts = lk.BoundOptions(solver="heun", steps=steps, estimator=estimator)
  terms, _ = lk.make_bound_fn(model, opts)(ids, None, jax.random.PRNGKey(key))
  return np.asarray(terms.total_vr_B) / ids.shape[1], np.asarray(terms.total_B) / ids.shape[1]


def test_markov_posterior_bound_is_the_chains_nll_at_heun16(chain_data):
  """Forward-backward gives the exact denoiser; its bound lands on the chain's NLL.

  Compared sequence by sequence with each row's exact NLL (paired, so the text's
  own randomness cancels); the variance-reduced estimate, exact divergence.
  """
  chain, ids, nll_N, e, sched = chain_data
  oracle = oracles.MarkovDenoiser(chain, e, sched, offset=1)
  vr16, official16 = _vr_bound(oracle, ids, 16)
  gap16 = float(np.mean(vr16 - nll_N))
  assert abs(gap16) < 0.05, gap16
  # the variance-reduced estimate has the official one's mean and far less scatter
  assert np.std(vr16) < 0.5 * np.std(official16)
  assert abs(np.mean(vr16) - np.mean(official16)) < 4 * np.std(official16) / np.sqrt(len(ids))
  # and the chain's closed-form entropy is what the rows average to
  assert abs(float(np.mean(nll_N)) - chain.row_entropy_per_token(L)) < 4 * np.std(nll_N) / np.sqrt(len(ids))


def test_context_free_reference_equals_its_analytic_value(chain_data):
  chain, ids, _, e, sched = chain_data
  counts = np.bincount(ids.ravel(), minlength=e.shape[0]) + 0.5
  oracle = oracles.ContextFreeDenoiser(e, sched, np.log(counts / counts.sum()))
  analytic = oracle.analytic_nll(ids, np.ones_like(ids, bool))
  np.testing.assert_allclose(analytic, -np.mean(np.log(counts / counts.sum())[ids]), rtol=1e-6)
  vr, _ = _vr_bound(oracle, ids, 64, estimator="hutchinson_gaussian")
  assert abs(float(np.mean(vr)) - analytic) < 0.05, (float(np.mean(vr)), analytic)
  # knowing the chain is worth what the entropy gap says: the oracle that ignores
  # context is far above the Markov oracle
  assert analytic > chain.row_entropy_per_token(L) + 0.5


def test_posterior_logits_match_brute_force_enumeration():
  chain = markov.random_chain(3, 2, seed=4)
  rng = np.random.default_rng(0)
  ll = rng.normal(size=(2, 4, 3)).astype(np.float32)
  log_t, log_pi = markov.log_chain_parameters(chain, 0, 3)
  got = np.asarray(markov.posterior_logits(jnp.asarray(ll), jnp.asarray(log_t), jnp.asarray(log_pi)))
  import itertools
  for b in range(2):
    joint = np.zeros((3,) * 4)
    for x in itertools.product(range(3), repeat=4):
      lp = np.log(chain.stationary[x[0]]) + sum(np.log(max(chain.transition[x[i], x[i + 1]], 1e-300))
                                                for i in range(3))
      joint[x] = np.exp(lp + sum(ll[b, i, x[i]] for i in range(4)))
    joint /= joint.sum()
    for i in range(4):
      marg = joint.sum(axis=tuple(j for j in range(4) if j != i))
      np.testing.assert_allclose(np.exp(got[b, i]), marg, atol=1e-5)


def test_chain_entropy_and_sampler_agree():
  chain = markov.random_chain(6, 3, seed=5)
  np.testing.assert_allclose(chain.transition.sum(1), 1.0)
  np.testing.assert_allclose(chain.stationary @ chain.transition, chain.stationary, atol=1e-10)
  x = chain.sample(np.random.default_rng(1), 20000, 2)
  counts = np.zeros((6, 6))
  np.add.at(counts, (x[:, 0], x[:, 1]), 1)
  emp = counts / counts.sum(1, keepdims=True)
  rate = -np.sum((counts.sum(1) / counts.sum())[:, None] * np.where(emp > 0, emp * np.log(np.maximum(emp, 1e-300)), 0))
  assert abs(rate - chain.entropy_rate) < 0.03


def test_token_corpus_trains_through_the_pipeline(tmp_path):
  from langflow_jax.config import base_config
  from langflow_jax.data import pipeline
  from langflow_jax.data.tokenizer import load_tokenizer

  chain = markov.random_chain(5, 2, seed=0)
  card = markov.token_corpus(tmp_path / "tok5", chain, 12, 40, 8)
  c = base_config()
  c.data.update(**card["data"])
  tok = load_tokenizer(c.data.tokenizer)
  assert tok.vocab_size == card["vocab_size"] == 6
  split = pipeline.load_split(c.data, "train", tok)
  assert split.ids.shape == (40, 12) and 1 <= int(np.min(split.ids)) and int(np.max(split.ids)) <= 5
  assert card["entropy_per_token"] == pytest.approx(chain.row_entropy_per_token(12))
