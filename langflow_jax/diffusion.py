"""The variance-preserving forward process in log noise-to-signal ratio gamma.

gamma = log(sigma^2 / alpha^2); large gamma is noisy. Every function here is
float32 and elementwise in gamma, so it broadcasts over any batch shape. The
equations follow method §2.2, §3.1 (skip term), §4.1 (flow) and §6.1 (the
sampler's exact step).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def alpha_sigma(gamma: Array) -> tuple[Array, Array]:
  """Signal and noise scales: alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma)."""
  gamma = jnp.asarray(gamma, jnp.float32)
  return jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))


def skip_coefficient(gamma: Array) -> Array:
  """c_skip = alpha / sigma^2 = exp((softplus(-gamma) - gamma) / 2).

  Times <z, E[v]> this is the exact Gaussian posterior logit of token v under a
  uniform prior (every embedding row has the same norm), so the network only
  learns a residual on top of it.
  """
  gamma = jnp.asarray(gamma, jnp.float32)
  return jnp.exp((jax.nn.softplus(-gamma) - gamma) / 2)


def add_noise(e_BxLxD: Array, gamma_B: Array, eps_BxLxD: Array) -> Array:
  """z = alpha * e + sigma * eps, with one gamma per sequence."""
  alpha_B, sigma_B = alpha_sigma(gamma_B)
  z = alpha_B[:, None, None] * e_BxLxD.astype(jnp.float32) + sigma_B[:, None, None] * eps_BxLxD
  return z.astype(e_BxLxD.dtype)


def denoised_embedding(p_BxLxV: Array, embeddings_VxD: Array, dtype: Any = jnp.float32) -> Array:
  """Posterior-mean embedding E^T p, its operands in ``dtype``, accumulated and returned in float32.

  One matmul row per token ([B*L, V] x [V, D]): see ``model.Linear``.
  """
  b, l, v = p_BxLxV.shape
  x_NxD = jnp.matmul(p_BxLxV.reshape(b * l, v).astype(dtype), embeddings_VxD.astype(dtype),
                     preferred_element_type=jnp.float32)
  return x_NxD.reshape(b, l, -1)


def denoised_embedding_from_logits(logits_BxLxV: Array, embeddings_VxD: Array,
                                   temperature: float | Array = 1.0, dtype: Any = jnp.float32) -> Array:
  """E^T softmax(logits / temperature), float32, normalised after the product.

  exp(logits - max) goes through the [V, D] product and the [B, L, D] result
  is divided by the partition sum: the same value as :func:`denoised_embedding`
  of the softmax (to rounding) without a divide over every one of the V
  probabilities, which costs a tenth of the sampler's step on the bench
  config. The max is a shift the value does not depend on, so no gradient
  flows through it.
  """
  scaled = logits_BxLxV.astype(jnp.float32) / temperature
  unnormalised = jnp.exp(scaled - jax.lax.stop_gradient(jnp.max(scaled, axis=-1, keepdims=True)))
  return denoised_embedding(unnormalised, embeddings_VxD, dtype) / jnp.sum(unnormalised, axis=-1, keepdims=True)


def ddim_step(z_BxLxD: Array, x_hat_BxLxD: Array, gamma_t: Array, gamma_s: Array) -> Array:
  """Exact solution of the flow from gamma_t to gamma_s with x_hat held fixed.

  z_s = alpha_s x_hat + (sigma_s / sigma_t)(z_t - alpha_t x_hat), written the way
  the official sampler writes it: target + w (r z - target) with
  r = alpha_s / alpha_t and w = exp((gamma_s - gamma_t)/2). Runs in the dtype of
  its inputs (the official code uses float64; pass float64 arrays under
  ``jax_enable_x64`` to match it bit for bit).
  """
  dtype = z_BxLxD.dtype
  expand = lambda g: jnp.reshape(g, jnp.shape(g) + (1,) * (z_BxLxD.ndim - jnp.ndim(g)))
  gamma_t = expand(jnp.asarray(gamma_t, dtype))
  gamma_s = expand(jnp.asarray(gamma_s, dtype))
  r = jnp.exp((jax.nn.softplus(gamma_t) - jax.nn.softplus(gamma_s)) / 2)
  w = jnp.exp((gamma_s - gamma_t) / 2)
  target = jnp.sqrt(jax.nn.sigmoid(-gamma_s)) * x_hat_BxLxD.astype(dtype)
  return target + w * (r * z_BxLxD - target)
