import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from langflow_jax import diffusion, model as M, objective as O
from tests.conftest import small_config


def setup(vocab=40, **obj):
  cfg = small_config(vocab_size=vocab)
  cfg.objective.update(**obj)
  model = M.create_model(cfg, seed=0)
  ids = jax.random.randint(jax.random.PRNGKey(1), (4, 16), 0, vocab)
  return cfg, model, ids


@pytest.mark.parametrize("method", ["stratified", "antithetic", "iid"])
def test_uniform_samplers(method):
  u = np.asarray(O.sample_uniform(jax.random.PRNGKey(0), 8, method))
  assert u.shape == (8,) and np.all((u >= 0) & (u < 1))
  if method == "stratified":
    np.testing.assert_array_equal(np.sort(np.floor(u * 8)), np.arange(8))
  if method == "antithetic":
    np.testing.assert_allclose(u[:4] + u[4:], 1.0, atol=1e-6)


def test_quantile_power_draws_gamma_at_the_warped_quantiles():
  cfg, model, ids = setup(self_cond_prob=0.0, time_sampling="iid", quantile_power=2.0)
  key = jax.random.PRNGKey(3)
  out = O.langflow_objective(model, ids, jnp.ones_like(ids, bool), key, cfg=cfg.objective, train=False)
  u = jax.random.uniform(jax.random.split(key, 5)[0], (4,))
  np.testing.assert_allclose(np.asarray(out.gamma_B), np.asarray(model.schedule.icdf(u ** 2)), rtol=1e-6)
  assert np.all(np.asarray(out.gamma_B) <= np.asarray(model.schedule.icdf(u)) + 1e-6)  # towards low noise


def test_terms_are_sums_with_denominators_and_mask():
  cfg, model, ids = setup()
  mask = jnp.ones((4, 16), bool).at[3].set(False).at[2, 8:].set(False)
  out = O.langflow_objective(model, ids, mask, jax.random.PRNGKey(0), cfg=cfg.objective)
  t = out.terms
  assert float(t.num_tokens) == 3 * 16 - 8 and float(t.num_seqs) == 3
  assert np.isfinite(float(t.ce_sum)) and float(t.ce_sum) > 0
  assert float(out.ce_per_token_B[3]) == 0.0
  # the masked-out tokens contribute nothing: changing them changes nothing
  ids2 = ids.at[2, 8:].set((ids[2, 8:] + 1) % 40)
  out2 = O.langflow_objective(model, ids2, mask, jax.random.PRNGKey(0), cfg=cfg.objective)
  assert out2.terms.ce_sum.shape == ()


def test_ce_matches_manual_computation():
  cfg, model, ids = setup(self_cond_prob=0.0, time_sampling="iid")
  key = jax.random.PRNGKey(3)
  out = O.langflow_objective(model, ids, jnp.ones_like(ids, bool), key, cfg=cfg.objective, train=False)
  k_u, k_eps, _, _, _ = jax.random.split(key, 5)
  gamma = model.schedule.icdf(jax.random.uniform(k_u, (4,)))
  e = model.embed(ids)
  z = diffusion.add_noise(e, gamma, jax.random.normal(k_eps, e.shape))
  logp = jax.nn.log_softmax(model(z, gamma), -1)
  manual = -jnp.take_along_axis(logp, ids[..., None], -1).sum()
  np.testing.assert_allclose(float(out.terms.ce_sum), float(manual), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out.gamma_B), np.asarray(gamma), rtol=1e-6)


def test_self_conditioning_first_pass_is_stop_gradient():
  cfg, model, ids = setup(self_cond_prob=1.0, self_cond_mode="sample")
  for layer in [model.backbone.output_layer.linear, model.backbone.self_cond_proj,
                *[b.ada for b in model.backbone.blocks]]:
    layer.kernel.set_value(0.1 * jax.random.normal(jax.random.PRNGKey(5), layer.kernel.shape))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  key = jax.random.PRNGKey(0)
  mask = jnp.ones_like(ids, bool)

  def loss(p):
    out = O.langflow_objective(nnx.merge(graphdef, p, rest), ids, mask, key, cfg=cfg.objective)
    return out.terms.ce_sum

  # The same loss with the first pass computed from frozen parameters.
  frozen = nnx.merge(graphdef, params, rest)
  k_u, k_eps, _, k_d1, _ = jax.random.split(key, 5)
  gamma = frozen.schedule.icdf(O.sample_uniform(k_u, 4, "stratified"))
  z = diffusion.add_noise(frozen.embed(ids), gamma, jax.random.normal(k_eps, (4, 16, 32)))
  x_hat = frozen.denoise(frozen(z, gamma, None, dropout_key=k_d1))

  def loss_frozen_sc(p):
    m = nnx.merge(graphdef, p, rest)
    k = jax.random.split(key, 5)
    zz = diffusion.add_noise(m.embed(ids), gamma, jax.random.normal(k[1], (4, 16, 32)))
    return O.token_cross_entropy(m(zz, gamma, x_hat, dropout_key=k[4]), ids).sum()

  np.testing.assert_allclose(float(loss(params)), float(loss_frozen_sc(params)), rtol=1e-5)
  g1, g2 = jax.grad(loss)(params), jax.grad(loss_frozen_sc)(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # and self-conditioning changes the loss
  cfg.objective.self_cond_prob = 0.0
  assert abs(float(loss(params)) - float(loss_frozen_sc(params))) > 1e-3


def test_losses_move_disjoint_parameter_sets():
  cfg, model, ids = setup(self_cond_prob=0.0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  mask = jnp.ones_like(ids, bool)

  def parts(p):
    out = O.langflow_objective(nnx.merge(graphdef, p, rest), ids, mask, jax.random.PRNGKey(0), cfg=cfg.objective)
    return out.terms.ce_sum, out.terms.schedule_fit_sum

  g_ce = jax.grad(lambda p: parts(p)[0])(params)
  g_fit = jax.grad(lambda p: parts(p)[1])(params)
  sched_ce = [float(jnp.abs(x).max()) for x in jax.tree.leaves(g_ce["schedule"])]
  assert max(sched_ce) == 0.0  # no gradient through the inverse CDF
  net_fit = [float(jnp.abs(x).max()) for x in jax.tree.leaves(g_fit["backbone"])]
  assert max(net_fit) == 0.0  # the fit does not pull the network
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_fit["schedule"])) > 0


def test_skip_warmup_ramp():
  assert float(O.skip_warmup_scale(0, 100)) == 0.0
  assert float(O.skip_warmup_scale(50, 100)) == 0.5
  assert float(O.skip_warmup_scale(500, 100)) == 1.0
  assert float(O.skip_warmup_scale(0, 0)) == 1.0
