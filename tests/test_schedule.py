import jax
import jax.numpy as jnp
import numpy as np
import pytest

from langflow_jax import schedule as S
from langflow_jax.config import base_config
from langflow_jax.errors import ConfigError


def all_schedules():
  cfg = base_config().schedule
  out = {}
  for name in S.SCHEDULES:
    c = cfg.copy_and_resolve_references()
    c.name = name
    out[name] = S.make_schedule(c)
  return out


@pytest.mark.parametrize("name", sorted(S.SCHEDULES))
def test_endpoints_are_honoured(name):
  sched = all_schedules()[name]
  lo, hi = sched.endpoints()
  g = np.asarray(sched.icdf(jnp.array([0.0, 1.0])))
  np.testing.assert_allclose(g, [lo, hi], rtol=1e-6)
  inner = np.asarray(sched.icdf(jnp.linspace(0.001, 0.999, 500)))
  assert np.all(inner >= float(lo)) and np.all(inner <= float(hi))


@pytest.mark.parametrize("name", sorted(S.SCHEDULES))
def test_monotone_and_cdf_round_trip(name):
  sched = all_schedules()[name]
  u = jnp.linspace(0.01, 0.99, 300)
  g = sched.icdf(u)
  assert np.all(np.diff(np.asarray(g)) > 0)
  np.testing.assert_allclose(np.asarray(sched.cdf(g)), np.asarray(u), atol=2e-5)


@pytest.mark.parametrize("name", sorted(S.SCHEDULES))
def test_density_is_derivative_of_cdf_and_integrates_to_one(name):
  sched = all_schedules()[name]
  lo, hi = (float(x) for x in sched.endpoints())
  g = jnp.linspace(lo + 0.05, hi - 0.05, 200)
  dcdf = jax.vmap(jax.grad(lambda x: sched.cdf(x)))(g)
  np.testing.assert_allclose(np.asarray(dcdf), np.exp(np.asarray(sched.log_density(g))), rtol=2e-3, atol=1e-6)
  # Fixed schedules are densities on [lo, hi]; the Gumbel one on the real line.
  a, b = (lo, hi) if name != "gumbel" else (lo - 30.0, hi + 60.0)
  x = np.linspace(a, b, 200_001)
  mass = np.trapezoid(np.exp(np.asarray(sched.log_density(jnp.asarray(x, jnp.float32)))), x)
  assert abs(mass - 1.0) < 1e-3


def test_gumbel_fit_loss_moves_only_schedule_parameters():
  sched = all_schedules()["gumbel"]
  from flax import nnx

  gamma = jnp.linspace(2.0, 10.0, 16)
  ce = 7.0 * jnp.exp(-jnp.exp(-(gamma - 5.0) / 1.2)) + 0.1

  def loss(state):
    m = nnx.merge(graphdef, state)
    return jnp.mean(m.fit_loss(gamma, ce))

  graphdef, state = nnx.split(sched)
  grads = jax.grad(loss)(state)
  for name in ("loc", "scale", "entropy"):
    assert abs(float(grads[name][...])) > 1e-4, name
  # gradient descent on the fit recovers the curve's parameters
  def descend(state, _):
    return jax.tree.map(lambda p, d: p - 0.05 * d, state, jax.grad(loss)(state)), None

  state, _ = jax.jit(lambda s: jax.lax.scan(descend, s, None, length=3000))(state)
  fitted = nnx.merge(graphdef, state)
  np.testing.assert_allclose(float(fitted.loc[...]), 5.0, atol=0.15)
  np.testing.assert_allclose(float(fitted.scale[...]), 1.2, atol=0.15)


def test_information_uniform_identity():
  # H(F^{-1}(u)) = H_inf * u: equal quantile steps reveal equal information.
  sched = all_schedules()["gumbel"]
  u = jnp.linspace(0.05, 0.95, 19)
  h = sched.entropy_curve(sched.icdf(u))
  np.testing.assert_allclose(np.asarray(h), float(sched.entropy[...]) * np.asarray(u), rtol=1e-4)


def test_unknown_schedule_is_a_config_error():
  cfg = base_config().schedule
  cfg.name = "sigmoid"
  with pytest.raises(ConfigError, match="unknown schedule 'sigmoid'"):
    S.make_schedule(cfg)


def test_torch_linspace_replica_is_exact_in_float32():
  # torch.linspace(0, 1, 7) in float32 (first half up from start, second down from end)
  got = S.linspace_f32(0.0, 1.0, 7)
  step = np.float32(1.0) / np.float32(6)
  expect = [np.float32(0) + step * np.float32(i) for i in range(3)] + \
           [np.float32(1) - step * np.float32(6 - i) for i in range(3, 7)]
  np.testing.assert_array_equal(got, np.array(expect, np.float32))
  g = S.sampler_u_grid(5)
  assert g[0] == np.float32(1 - 1e-5) and g[-1] == np.float32(1e-5)
