"""The ODE likelihood bound: official parity, closed form, estimators, validity."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from langflow_jax import convert, likelihood as lk
from langflow_jax.config import base_config
from langflow_jax.errors import ConfigError
from langflow_jax.model import create_model

# --------------------------------------------------------------------------- official parity


@pytest.fixture(scope="module")
def official(fixture_dir):
  return convert.load_official(fixture_dir)[1]


def _official_run(model, reference, solver):
  n = int(reference["nll_n_steps"])
  opts = lk.BoundOptions(solver=solver, steps=n, grid="official", mode="flow")
  fn = lk.make_bound_fn(model, opts)
  return fn(reference["nll_ids"], None, jax.random.PRNGKey(0), eps=reference["nll_eps"],
            probes=reference["nll_probes"])


@pytest.mark.parametrize("solver, tag", [("euler", "euler"), ("heun", "heun2")])
def test_matches_official_nll(official, reference, solver, tag):
  """eval_ppl.compute_flow_nll with the fixture's eps and probes (one probe per call)."""
  terms, info = _official_run(official, reference, solver)
  ref = lambda k: reference[f"nll_{tag}_{k}"]
  for name, ours in (("reconst", terms.reconst_B), ("flow", terms.flow_B)):
    np.testing.assert_allclose(np.asarray(ours), ref(name), atol=1e-3, rtol=0, err_msg=name)
  for name, ours in (("prior", terms.prior_B), ("total", terms.total_B)):
    np.testing.assert_allclose(np.asarray(ours), ref(name), atol=1e-2, rtol=0, err_msg=name)
  nats = float(jnp.sum(terms.total_B) / jnp.sum(terms.num_tokens_B))
  assert abs(nats - float(ref("nats_per_token"))) <= 1e-4
  # Every vector-field call: gamma recomputed from s (torchdiffeq's second-stage
  # abscissa included) and the Hutchinson u^T J u.
  np.testing.assert_allclose(np.asarray(info.gamma_C), ref("call_gamma"), rtol=1e-6)
  div_err = np.max(np.abs(np.asarray(info.div_CxB) - ref("call_div"))) / np.max(np.abs(ref("call_div")))
  assert div_err <= 1e-5
  assert int(info.num_evals) == len(ref("call_gamma"))
  s_grid = lk.s_grid(official, lk.BoundOptions(steps=int(reference["nll_n_steps"])))
  np.testing.assert_allclose(np.asarray(s_grid), reference["nll_s_grid"], rtol=1e-6)


@pytest.mark.parametrize("solver, tag", [("euler", "euler"), ("heun", "heun2")])
def test_matches_official_sc_chain_rule(official, reference, reference_modes, solver, tag):
  """eval.mode=sc_chain_rule: the divergence also runs through the self-conditioning pre-pass."""
  n = int(reference["nll_n_steps"])
  opts = lk.BoundOptions(solver=solver, steps=n, mode="sc_chain_rule")
  terms, info = lk.make_bound_fn(official, opts)(reference["nll_ids"], None, jax.random.PRNGKey(0),
                                                 eps=reference["nll_eps"], probes=reference["nll_probes"])
  ref = lambda k: reference_modes[f"sc_{tag}_{k}"]
  for name, ours, tol in (("reconst", terms.reconst_B, 1e-3), ("int", terms.flow_B, 1e-3),
                          ("prior", terms.prior_B, 1e-2), ("total", terms.total_B, 1e-2)):
    np.testing.assert_allclose(np.asarray(ours), ref(name), atol=tol, rtol=0, err_msg=name)
  div_err = np.max(np.abs(np.asarray(info.div_CxB) - ref("call_div"))) / np.max(np.abs(ref("call_div")))
  assert div_err <= 1e-5
  # the chain rule changes the divergence: the flow mode's differs
  assert np.max(np.abs(ref("call_div") - reference[f"nll_{tag}_call_div"])) > 1e-3 * np.max(np.abs(ref("call_div")))


@pytest.mark.parametrize("masked", [False, True])
def test_matches_official_sde(official, reference_modes, masked):
  """eval.mode=sde: the Monte-Carlo ELBO with the official draws fed in."""
  r = reference_modes
  prefix = "sde_masked" if masked else "sde"
  opts = lk.BoundOptions(mode="sde", mc_samples=int(r["sde_m"]))
  mask = (r["sde_mask"] > 0) if masked else None
  terms, info = lk.make_bound_fn(official, opts)(r["sde_ids"], mask, jax.random.PRNGKey(0), eps=r["sde_noise"],
                                                 probes=r["sde_u"])
  for name, ours, tol in (("reconst", terms.reconst_B, 1e-3), ("int", terms.flow_B, 1e-3),
                          ("prior", terms.prior_B, 1e-2), ("total", terms.total_B, 1e-2)):
    np.testing.assert_allclose(np.asarray(ours), r[f"{prefix}_{name}"], atol=tol, rtol=0, err_msg=name)
  np.testing.assert_allclose(np.asarray(info.gamma_C), r["sde_gamma"].mean(axis=1), rtol=1e-5)


def test_matches_official_z0_at_gamma_min_not_grid_start(official, reference):
  """The ODE starts at the icdf value while z_0 is drawn at gamma_min (method §5.2)."""
  _, info = _official_run(official, reference, "euler")
  gamma_min, _ = official.schedule.endpoints()
  assert float(info.gamma_C[0]) > float(gamma_min) + 5e-5  # the grid starts a hair later
  np.testing.assert_allclose(float(gamma_min), float(reference["gamma_min"]), rtol=1e-6)


# --------------------------------------------------------------------------- closed form

TOY_P = np.array([0.4, 0.3, 0.15, 0.1, 0.05], np.float32)


@pytest.fixture(scope="module")
def toy():
  """A model whose denoiser is the exact posterior of i.i.d. tokens with unigram TOY_P.

  With the official zero output head a fresh model's logits are the skip term
  c_skip <z, E[v]> = the Gaussian log-likelihood of each token (rows of E
  have equal norms); a bias log p(v) makes it the exact posterior. The
  probability-flow ODE is then the exact flow of the data, and the bound of
  one draw is -log p(x) + (||eps||^2 - L D)/2 (the bound uses the expected
  entropy of q(z_a | x); the second term has mean zero), up to the
  discretisation and a prior mismatch at gamma_max below 1e-4 nats.
  """
  c = base_config()
  c.model.update(vocab_size=len(TOY_P), hidden_size=8, cond_dim=8, n_blocks=1, n_heads=2, max_length=4,
                 dropout=0.0, logit_init_std=0.0)
  c.schedule.update(name="linear", gamma_min=-2.0, gamma_max=16.0)
  model = create_model(c, seed=0)
  model.backbone.output_layer.linear.bias[...] = jnp.log(jnp.asarray(TOY_P))
  rng = np.random.default_rng(0)
  ids = rng.choice(len(TOY_P), size=(6, 4), p=TOY_P)
  eps = rng.standard_normal((6, 4, 8)).astype(np.float32)
  analytic = -np.log(TOY_P)[ids].sum(-1) + (np.sum(eps**2, axis=(1, 2)) - 4 * 8) / 2
  return model, ids, eps, analytic


def _toy_errors(toy, solver, steps):
  model, ids, eps, analytic = toy
  opts = lk.BoundOptions(solver=solver, grid="gamma", estimator="exact")
  fn = lk.make_bound_fn(model, opts)
  grids = lk.padded_s_grids(model, opts, steps)  # one compilation for all step counts
  errors = []
  for s_N in grids:
    terms, _ = fn(ids, None, jax.random.PRNGKey(0), eps=eps, s_N=s_N)
    errors.append(float(np.max(np.abs(np.asarray(terms.total_B) - analytic))))
  return errors


@pytest.mark.parametrize("solver, shrink", [("euler", 0.2), ("heun", 0.05)])
def test_closed_form_error_shrinks_with_steps(toy, solver, shrink):
  errors = _toy_errors(toy, solver, (8, 16, 32, 64))
  print(f"{solver}: max |bound - analytic| at 8/16/32/64 steps: {errors}")
  assert all(b < a for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < shrink * errors[0]  # first order: ~1/8; second order: ~1/50


def test_closed_form_rk4_and_adaptive_match_analytic(toy):
  model, ids, eps, analytic = toy
  rk4 = _toy_errors(toy, "rk4", (64,))[0]
  assert rk4 < 0.01, rk4  # nats per sequence of 4 tokens
  opts = lk.BoundOptions(solver="adaptive", grid="gamma", estimator="exact", rtol=1e-5, atol=1e-5)
  terms, info = lk.make_bound_fn(model, opts)(ids, None, jax.random.PRNGKey(0), eps=eps)
  err = float(np.max(np.abs(np.asarray(terms.total_B) - analytic)))
  print(f"rk4 64 steps: {rk4:.4f}; adaptive: {err:.4f} with {int(info.num_steps)} steps")
  assert bool(info.ok) and err < 0.01 and 0 < int(info.num_steps) < 200


# --------------------------------------------------------------------------- divergence estimators


def test_hutchinson_unbiased_with_variance_over_probes():
  """On a nonlinear map with a non-symmetric Jacobian (the model's own u^T J u is
  checked call by call against the official code above)."""
  b, l, d = 2, 6, 8
  w = jax.random.normal(jax.random.PRNGKey(0), (l, d, l, d)) / np.sqrt(l * d)
  f = lambda z: jnp.tanh(jnp.einsum("bld,ldme->bme", z, w) + 0.5 * z)
  z = jax.random.normal(jax.random.PRNGKey(1), (b, l, d))

  @jax.jit
  def exact_and_jacobian(z):
    jac = jax.jacfwd(f)(z).reshape(b, l * d, b, l * d)
    return lk.exact_divergence(f, z, chunk=16)[1], jnp.stack([jac[i, :, i, :] for i in range(b)])

  exact, jac = exact_and_jacobian(z)
  np.testing.assert_allclose(np.asarray(exact), np.asarray(jnp.trace(jac, axis1=1, axis2=2)), rtol=1e-5)
  # Exact variances of one probe: 2 ||sym J||_F^2 (Gaussian), minus 2 sum J_ii^2 (Rademacher).
  sym_sq = jnp.sum(jnp.square(0.5 * (jac + jnp.swapaxes(jac, 1, 2))), axis=(1, 2))
  diag_sq = jnp.sum(jnp.square(jnp.diagonal(jac, axis1=1, axis2=2)), -1)
  variances = {"hutchinson_gaussian": 2 * sym_sq, "hutchinson_rademacher": 2 * (sym_sq - diag_sq)}
  estimates = jax.jit(jax.vmap(lambda u: lk.hutchinson_divergence(f, z, u)[1]))  # u: [draws, P, B, L, D]
  rng = np.random.default_rng(0)
  for estimator, var1 in variances.items():
    for probes, draws in ((1, 8000), (8, 1000)):
      shape = (draws, probes, b, l, d)
      u = rng.standard_normal(shape) if estimator == "hutchinson_gaussian" else rng.choice([-1.0, 1.0], shape)
      est = estimates(u.astype(np.float32))
      mean, var = jnp.mean(est, 0), jnp.var(est, 0)
      assert bool(jnp.all(jnp.abs(mean - exact) < 4.5 * jnp.sqrt(var1 / probes / draws))), (estimator, mean, exact)
      np.testing.assert_allclose(np.asarray(var), np.asarray(var1 / probes), rtol=0.15,
                                 err_msg=f"{estimator} with {probes} probes")


def test_probes_have_unit_second_moment():
  for estimator in ("hutchinson_gaussian", "hutchinson_rademacher"):
    u = np.asarray(lk.draw_probes(jax.random.PRNGKey(0), estimator, (4000, 3)))
    np.testing.assert_allclose(np.mean(u[:, :, None] * u[:, None, :], axis=0), np.eye(3), atol=0.06)
  assert set(np.unique(np.asarray(lk.draw_probes(jax.random.PRNGKey(0), "hutchinson_rademacher", (50,))))) == {-1, 1}


# --------------------------------------------------------------------------- a valid bound


MARKOV = np.array([[0.80, 0.10, 0.05, 0.05],
                   [0.10, 0.70, 0.10, 0.10],
                   [0.05, 0.05, 0.80, 0.10],
                   [0.30, 0.10, 0.10, 0.50]])


def markov_chains(rng, n, length):
  evals, evecs = np.linalg.eig(MARKOV.T)
  pi = np.real(evecs[:, np.argmax(np.real(evals))])
  pi = pi / pi.sum()
  x = np.zeros((n, length), np.int32)
  x[:, 0] = rng.choice(4, size=n, p=pi)
  for t in range(1, length):
    u = rng.random(n)[:, None]
    x[:, t] = np.argmax(np.cumsum(MARKOV[x[:, t - 1]], axis=1) > u, axis=1)
  rate = -np.sum(pi[:, None] * MARKOV * np.log(MARKOV))
  per_token = (-np.sum(pi * np.log(pi)) + (length - 1) * rate) / length
  return x, per_token


@pytest.fixture(scope="module")
def markov_model():
  """A tiny model trained briefly on a 4-state Markov chain, and held-out chains."""
  from langflow_jax import train

  c = base_config()
  c.model.update(vocab_size=4, hidden_size=16, cond_dim=16, n_blocks=1, n_heads=2, max_length=16, dropout=0.0,
                 self_conditioning=False)  # halves what the trainer and the bound compile
  c.schedule.update(loc=2.0, scale=1.0, entropy=1.2)
  c.objective.skip_warmup_steps = 0
  c.train.update(steps=300, batch_size=64)
  # lr 1e-2 left the bound above log 4 for some training keys; 3e-3 gives
  # 1.13-1.23 nats over training seeds 0-2 (true entropy 0.85).
  c.optimizer.update(lr=3e-3, warmup_steps=10, ema_decay=0.9)
  data, entropy = markov_chains(np.random.default_rng(0), 300 * 64, 16)
  tx = train.make_optimizer(c.optimizer, c.train.steps)
  state = jax.jit(lambda: train.fresh_train_state(c, tx))()
  parts = train.ModelParts.from_state(nnx.graphdef(create_model(c)), state)
  step = jax.jit(train.make_train_step(c, parts, tx))
  for rows in data.reshape(c.train.steps, 64, 16):
    state, _ = step(state, {"ids": rows, "mask": np.ones_like(rows, bool)})
  # 512 held-out chains: the bound's own noise (eps and probes) is ~0.7 nats/token
  # per sequence for this model; averaged over 512 it is small next to the margins
  heldout, _ = markov_chains(np.random.default_rng(1), 512, 16)
  return parts.merge(state.params), heldout, entropy


MARKOV_OPTS = lk.BoundOptions(solver="heun", steps=16, grid="official")


def test_bound_is_above_true_entropy(markov_model):
  model, heldout, entropy = markov_model
  mask = np.ones_like(heldout, bool)
  terms, _ = lk.make_bound_fn(model, MARKOV_OPTS)(heldout, mask, jax.random.PRNGKey(0))
  bound = float(jnp.sum(terms.total_B) / jnp.sum(terms.num_tokens_B))
  print(f"Markov chain: true entropy {entropy:.4f} nats/token, bound {bound:.4f} nats/token "
        f"(uniform {np.log(4):.4f})")
  assert entropy <= bound < np.log(4)  # valid, and the model learned more than the uniform code


def test_deterministic_shapes_and_padding(markov_model):
  model, heldout, _ = markov_model
  fn = lk.make_bound_fn(model, MARKOV_OPTS)
  ids = heldout[:64].copy()
  mask = np.ones_like(ids, bool)
  mask[-2:] = False          # padding rows (the last eval batch is filled with them)
  mask[0, 8:] = False        # a padded sequence
  a, info = fn(ids, mask, jax.random.PRNGKey(5))
  b, _ = fn(ids, mask, jax.random.PRNGKey(5))
  c, _ = fn(ids, mask, jax.random.PRNGKey(6))
  for name in ("reconst_B", "flow_B", "prior_B", "num_tokens_B"):
    x = np.asarray(getattr(a, name))
    assert x.shape == (64,) and np.all(np.isfinite(x))
    np.testing.assert_array_equal(x, np.asarray(getattr(b, name)))  # same key: same bits
    assert np.all(x[-2:] == 0.0), name                                # padding rows add nothing
  assert not np.allclose(np.asarray(a.total_B), np.asarray(c.total_B))  # another key: another draw
  assert float(a.num_tokens_B[0]) == 8 and float(a.num_tokens_B[1]) == 16
  assert info.gamma_C.shape == (32,) and info.div_CxB.shape == (32, 64) and int(info.num_evals) == 32


def test_bad_options_are_config_errors():
  for bad in (dict(solver="rk45"), dict(grid="cdf"), dict(estimator="skilling"), dict(probes=0), dict(steps=0)):
    with pytest.raises(ConfigError):
      lk.BoundOptions(**bad)
  c = base_config()
  c.eval.solver = "euler"
  assert lk.BoundOptions.from_config(c.eval) == dataclasses.replace(lk.BoundOptions(), solver="euler")
