import jax
import jax.numpy as jnp
import numpy as np

from langflow_jax import diffusion as D


def test_variance_preserving_and_skip_identity():
  g = jnp.linspace(-5.0, 15.0, 41)
  a, s = D.alpha_sigma(g)
  np.testing.assert_allclose(np.asarray(a**2 + s**2), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(jnp.log(s**2 / a**2)), np.asarray(g), atol=1e-4)
  np.testing.assert_allclose(np.asarray(D.skip_coefficient(g)), np.asarray(a / s**2), rtol=1e-5)


def test_denoised_embedding_is_expectation_under_probabilities():
  key1, key2 = jax.random.split(jax.random.PRNGKey(0))
  p = jax.nn.softmax(jax.random.normal(key1, (2, 3, 7)), -1)
  e = jax.random.normal(key2, (7, 5))
  got = D.denoised_embedding(p, e)
  expect = np.einsum("blv,vd->bld", np.asarray(p, np.float64), np.asarray(e, np.float64))
  np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-5, atol=1e-6)
  assert got.dtype == jnp.float32


def test_noising_and_exact_step_transport_clean_signal():
  key1, key2 = jax.random.split(jax.random.PRNGKey(1))
  x = jax.random.normal(key1, (2, 4, 8))
  eps = jax.random.normal(key2, (2, 4, 8))
  gt, gs = jnp.array([9.0, 6.0]), jnp.array([4.0, 2.0])
  z_t = D.add_noise(x, gt, eps)
  # With the true clean signal as x_hat, the DDIM step lands on the same noise path.
  z_s = D.ddim_step(z_t, x, gt, gs)
  np.testing.assert_allclose(np.asarray(z_s), np.asarray(D.add_noise(x, gs, eps)), rtol=1e-5, atol=1e-5)


def test_denoised_embedding_from_logits_matches_softmax_then_product():
  key1, key2 = jax.random.split(jax.random.PRNGKey(3))
  logits = 30.0 * jax.random.normal(key1, (2, 3, 11))  # peaked rows: exp without the shift overflows
  e = jax.random.normal(key2, (11, 5))
  for temperature in (1.0, 0.7):
    p = jax.nn.softmax(np.asarray(logits, np.float64) / temperature, -1)
    expect = np.einsum("blv,vd->bld", np.asarray(p, np.float64), np.asarray(e, np.float64))
    got = D.denoised_embedding_from_logits(logits, e, temperature)
    np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-5, atol=1e-5)
  # the gradient matches the softmax form's (the shift carries none)
  f = lambda l: jnp.sum(D.denoised_embedding_from_logits(l, e) ** 2)
  g = lambda l: jnp.sum(D.denoised_embedding(jax.nn.softmax(l, -1), e) ** 2)
  small = logits / 30.0
  np.testing.assert_allclose(np.asarray(jax.grad(f)(small)), np.asarray(jax.grad(g)(small)), rtol=1e-4, atol=1e-5)
