"""The masked diffusion (MDLM) baseline: SUBS model, NELBO objective and bound, ancestral sampler, training."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from langflow_jax import config as config_lib, methods, parallel
from langflow_jax.baselines import mdlm
from langflow_jax.errors import ConfigError
from langflow_jax.model import create_model as create_langflow
from tests.conftest import (baseline_config, check_baseline_run, check_sample_baseline_cli, fresh_and_random_models,
                            small_config, trained_baseline)

V, L, B = 16, 8, 4
ROWS, DRAWS = 128, 8  # one shape for every bound call: each jitted function compiles once


def mdlm_config():
  return baseline_config("mdlm", V, L)


@pytest.fixture(scope="module")
def models() -> tuple[mdlm.MaskedDiffusionLM, mdlm.MaskedDiffusionLM]:
  """A fresh model (zero-initialised head: uniform predictions) and one with random weights everywhere."""
  return fresh_and_random_models(mdlm_config())


@pytest.fixture(scope="module")
def model(models):
  return models[1]


_forward = nnx.jit(lambda model, xt: model(xt))


def forward(model, xt):
  """SUBS log-probabilities, always at [ROWS, L] (one compilation)."""
  xt = np.asarray(xt)
  padded = np.concatenate([xt, np.full((ROWS - len(xt), L), V, np.int32)]) if len(xt) < ROWS else xt
  return _forward(model, jnp.asarray(padded))[:len(xt)]


train_loss = nnx.jit(lambda model, ids, valid, key: mdlm.objective(
    model, ids, valid, key, cfg=mdlm_config().objective, train=False))


def test_objective_name_selects_the_masked_diffusion_model():
  m = nnx.eval_shape(lambda: methods.create_model(mdlm_config()))
  assert isinstance(m, mdlm.MaskedDiffusionLM) and m.mask_id == V
  assert m.vocab_embed.embedding.shape == (V + 1, 32)  # the [MASK] row


def test_subs_never_predicts_mask_and_copies_unmasked_tokens(model):
  ids = jax.random.randint(jax.random.PRNGKey(1), (B, L), 0, V)
  masked = jax.random.bernoulli(jax.random.PRNGKey(2), 0.5, (B, L))
  xt = jnp.where(masked, V, ids)
  logp = np.asarray(forward(model, xt))
  assert logp.shape == (B, L, V)  # no column for [MASK]: its logit is -inf
  m = np.asarray(masked)
  assert 0 < m.sum() < m.size
  np.testing.assert_allclose(np.exp(logp[m]).sum(-1), 1.0, rtol=1e-5)
  assert np.isfinite(logp[m]).all() and logp[m].std() > 0.1  # a real, non-uniform prediction
  onehot = np.where(np.arange(V) == np.asarray(ids)[..., None], 0.0, -np.inf)
  np.testing.assert_array_equal(logp[~m], onehot[~m])  # carry-over, whatever the network says


def test_attention_is_bidirectional(model):
  xt = jnp.full((B, L), V).at[:, 6].set(jnp.arange(B))
  logp = np.asarray(forward(model, xt))
  assert np.abs(logp[0, :6] - logp[1, :6]).max() > 1e-3  # earlier positions see a later token


# Two sequences of 4 tokens in rows of L: the second has 3, the rest is padding
# (never masked, never scored), so the bound's exact value is a sum over 15 + 7 masks.
SEQS = np.asarray([[1, 4, 0, 5, 0, 0, 0, 0], [3, 3, 2, 9, 0, 0, 0, 0]], np.int32)
VALID = np.asarray([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]], bool)
IDS_R, VALID_R = np.repeat(SEQS, ROWS // 2, 0), np.repeat(VALID, ROWS // 2, 0)


def exact_nelbo(model, eps):
  """Each sequence's NELBO per token by enumerating every mask of its valid positions.

  A mask of k of n tokens has probability t^k (1-t)^(n-k) at time t; its weight
  is the integral of that times 1/t over t ~ U(eps, 1).
  """
  out = []
  for ids, valid in zip(SEQS, VALID):
    n = int(valid.sum())
    subsets = [s for k in range(1, n + 1) for s in itertools.combinations(range(n), k)]
    masked = np.zeros((len(subsets), L), bool)
    for row, s in enumerate(subsets):
      masked[row, list(s)] = True
    logp = np.asarray(forward(model, np.where(masked, V, ids)))
    nll = np.where(masked, -np.take_along_axis(logp, np.broadcast_to(ids, masked.shape)[..., None], -1)[..., 0],
                   0.0).sum(-1)
    total = 0.0
    for row, s in enumerate(subsets):
      k = len(s)
      poly = np.polynomial.Polynomial([0, 1]) ** (k - 1) * np.polynomial.Polynomial([1, -1]) ** (n - k)
      total += (poly.integ()(1.0) - poly.integ()(eps)) / (1.0 - eps) * nll[row]
    out.append(total / n)
  return out


@pytest.mark.parametrize("estimator,eps", [("mask_count", 0.0), ("time", 1e-3)])
def test_bound_estimators_are_unbiased_for_the_enumerated_nelbo(model, estimator, eps):
  exact = exact_nelbo(model, eps)
  # ("time" is the training loss without dropout, averaged over DRAWS stratified t per row;
  # the loss itself, one t per row, is heavy-tailed at small t: see test_objective_equals_the_manual_nelbo)
  per_seq = mdlm.nelbo(model, IDS_R, VALID_R, key=jax.random.PRNGKey(7), estimator=estimator, eps=eps,
                       num_samples=DRAWS, batch_size=ROWS)["nelbo_per_token_N"]
  copies = ROWS // 2
  for i in range(2):
    est = per_seq[i * copies:(i + 1) * copies]
    stderr = est.std() / math.sqrt(copies)
    assert stderr < 0.1 * exact[i]  # a test with teeth
    assert abs(est.mean() - exact[i]) < 4 * stderr, (estimator, i, est.mean(), exact[i], stderr)


def test_objective_equals_the_manual_nelbo(model):
  key = jax.random.PRNGKey(4)
  out = train_loss(model, IDS_R, VALID_R, key)
  t = np.asarray(out.gamma_B)
  assert ((t >= 1e-3) & (t < 1)).all() and np.ptp(t) > 0.9  # stratified over [eps, 1)
  # the same draws by hand: t from the first key, masks from the second
  masked = np.asarray(jax.random.bernoulli(jax.random.split(key, 3)[1], jnp.asarray(t)[:, None], (ROWS, L)))
  masked = masked & VALID_R
  logp = np.asarray(forward(model, jnp.where(masked, V, IDS_R)))
  nll = -np.take_along_axis(logp, IDS_R[..., None], -1)[..., 0]
  per_seq = np.where(masked, nll, 0.0).sum(-1) / t
  assert float(out.terms.num_tokens) == VALID_R.sum() and float(out.terms.schedule_fit_sum) == 0
  np.testing.assert_allclose(float(out.terms.ce_sum), per_seq.sum(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out.ce_per_token_B), per_seq / VALID_R.sum(-1), rtol=1e-5)


def test_uniform_model_bound_is_log_v(models):
  fresh = models[0]  # zero-initialised head: uniform over the V tokens
  ids = jax.random.randint(jax.random.PRNGKey(5), (ROWS, L), 0, V)
  all_masked = np.asarray(forward(fresh, jnp.full((B, L), V)))
  np.testing.assert_allclose(all_masked, -np.log(V), rtol=1e-6)  # t = 1: every token costs log V
  exact = mdlm.nelbo(fresh, ids, key=jax.random.PRNGKey(0), estimator="mask_count", num_samples=DRAWS)
  np.testing.assert_allclose(exact["nelbo"], np.log(V), rtol=1e-6)
  np.testing.assert_allclose(exact["ppl"], V, rtol=1e-5)
  mc = mdlm.nelbo(fresh, ids, key=jax.random.PRNGKey(0), estimator="time", num_samples=DRAWS)
  assert np.isfinite(mc["nelbo_per_token_N"]).all() and mc["num_tokens"] == ROWS * L
  np.testing.assert_allclose(mc["nelbo"], np.log(V), rtol=0.05)


def test_mask_count_estimator_has_lower_variance(model):
  ids = jax.random.randint(jax.random.PRNGKey(8), (ROWS, L), 0, V)
  draw = lambda e, seed: mdlm.nelbo(model, ids, key=jax.random.PRNGKey(seed), estimator=e,
                                    num_samples=DRAWS)["nelbo_per_token_N"]
  # same sequences under two keys: the difference is the estimator's own noise
  noise = {e: np.std(draw(e, 1) - draw(e, 2)) for e in mdlm.ESTIMATORS}
  assert noise["mask_count"] < 0.7 * noise["time"]


PROMPT = jnp.asarray([[3, 7], [11, 2], [0, 0], [15, 5]], jnp.int32)


def test_sampler_fills_every_mask_keeps_the_prompt_and_is_a_function_of_the_key(model):
  draw = lambda seed, **kw: np.asarray(mdlm.generate(model, jax.random.PRNGKey(seed), L, steps=32,
                                                     prompt_BxP=PROMPT, **kw))
  a = draw(0)
  assert a.shape == (B, L) and (a < V).all() and (a >= 0).all()  # no [MASK] left
  np.testing.assert_array_equal(a[:, :2], np.asarray(PROMPT))
  np.testing.assert_array_equal(a, draw(0))
  assert (a != draw(1)).any()


def test_cache_only_saves_network_evaluations(model):
  key = jax.random.PRNGKey(9)
  cached, nfe = mdlm.generate(model, key, L, steps=32, prompt_BxP=PROMPT, return_nfe=True)
  plain, nfe_plain = mdlm.generate(model, key, L, steps=32, prompt_BxP=PROMPT, cache=False, return_nfe=True)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(plain))
  # one evaluation to start, then one after each step that changed something: at most 1 + 24 < 32
  assert int(nfe_plain) == 32 and 1 <= int(nfe) <= 1 + B * (L - 2)


def test_two_step_sampler_follows_the_reverse_process(model):
  """Two free tokens, T = 2: each unmasks at step 1 or 2 with probability 1/2, drawn given what is unmasked."""
  n, m = 20000, V
  prompt = SEQS[0, :L - 2]
  xs = np.tile(np.concatenate([prompt, [m, m]]), (1 + 2 * V, 1))
  xs[1:1 + V, -2] = np.arange(V)  # first free token known
  xs[1 + V:, -1] = np.arange(V)   # second free token known
  p = np.exp(np.asarray(forward(model, jnp.asarray(xs)), np.float64))[:, -2:]
  first, second = p[0, 0], p[0, 1]
  expected = (0.5 * first[:, None] * second[None, :]      # both at the same step, from [M, M]
              + 0.25 * first[:, None] * p[1:1 + V, 1]    # a first, then b given a
              + 0.25 * second[None, :] * p[1 + V:, 0].T)  # b first, then a given b
  assert np.abs(expected - first[:, None] * second[None, :]).max() > 0.003  # context matters
  ids = np.asarray(mdlm.generate(model, jax.random.PRNGKey(3), L, steps=2,
                                 prompt_BxP=jnp.tile(jnp.asarray(prompt)[None], (n, 1))))
  freq = np.bincount(ids[:, -2] * V + ids[:, -1], minlength=V * V).reshape(V, V) / n
  tol = 4 * np.sqrt(expected * (1 - expected) / n) + 1e-3
  assert (np.abs(freq - expected) <= tol).all(), np.abs(freq - expected).max()


def test_parameters_carry_logical_axes_and_match_the_ar_baseline():
  model = nnx.eval_shape(lambda: methods.create_model(mdlm_config()))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  for path, var in flat:
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == len(var.shape), path
    assert all(a in parallel.LOGICAL_RULES for a in axes), (path, axes)
  cfg = mdlm_config()
  cfg.objective.name = "ar"
  ar_model = nnx.eval_shape(lambda: methods.create_model(cfg))
  shapes = lambda m: {".".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  mine, theirs = shapes(model), shapes(ar_model)
  assert set(theirs) - set(mine) == {"start_embedding"} and set(mine) <= set(theirs)
  assert {k for k in mine if mine[k] != theirs[k]} == {"vocab_embed.embedding"}


@pytest.fixture(scope="module")
def mdlm_run(tmp_path_factory):
  return trained_baseline(tmp_path_factory, "mdlm", steps=20)


def test_train_and_evaluate_lowers_the_bound_and_the_mdlm_model_loads(mdlm_run):
  cfg = mdlm_run[0]
  ce = check_baseline_run(mdlm_run, 20, mdlm.MaskedDiffusionLM)
  first, last = np.mean(ce[:3]), np.mean(ce[-3:])
  assert abs(first - np.log(cfg.model.vocab_size)) < 0.3 * np.log(cfg.model.vocab_size)  # uniform start
  assert last < 0.5 * first


def test_sample_baseline_cli_prints_samples(mdlm_run, capsys):
  check_sample_baseline_cli(mdlm_run[2], capsys, "--config.sample.steps=6")


def test_user_mistakes_are_config_errors(model):
  ids = jnp.zeros((1, L), jnp.int32)
  with pytest.raises(ConfigError, match="estimator"):
    mdlm.nelbo(model, ids, key=jax.random.PRNGKey(0), estimator="exact")
  with pytest.raises(ConfigError, match="steps"):
    mdlm.generate(model, jax.random.PRNGKey(0), L, steps=0, batch_size=1)
  with pytest.raises(ConfigError, match="max_length"):
    mdlm.generate(model, jax.random.PRNGKey(0), L + 1, steps=4, batch_size=1)
  cfg = small_config()
  with pytest.raises(ConfigError, match="did not train the masked diffusion baseline"):
    mdlm.sample_texts(nnx.eval_shape(lambda: create_langflow(cfg)), None, cfg.sample, 8)
  with pytest.raises(ConfigError, match="unknown objective 'mdml'"):
    methods.get("mdml")
  cfg.objective.mask_eps = 1.0
  with pytest.raises(ConfigError, match="mask_eps"):
    config_lib.validate(cfg)
