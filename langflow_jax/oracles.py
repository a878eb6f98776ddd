"""Denoisers that know the answer: exact posteriors in the model's interface.

A LangFlow model is a denoiser z -> p(x_i | z); the likelihood bound of the
*exact* posterior of a known source is that source's NLL (up to integration
error and the prior mismatch at gamma_max). These oracles share the model's
embeddings and schedule and plug into ``likelihood.nll_bound`` unchanged:

* :class:`ContextFreeDenoiser`: tokens independent with a unigram prior.
  Its posterior at position i depends on z_i alone: the Gaussian likelihood
  (the skip term, for equal-norm embeddings) plus log p(v). Its bound is the
  unigram model's NLL of the data (``analytic_nll``): what a model learns
  beyond it is what it learned from context. The eval prints it beside
  every bound.
* :class:`MarkovDenoiser`: a first-order chain (:mod:`data.markov`), exact by
  forward-backward; on chain data its bound is the chain's entropy.

Both are NNX modules (the tables are ``nnx.Variable``s), so the bound's
compiled function takes them as it takes a model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from langflow_jax import diffusion
from langflow_jax.data import markov

Array = jax.Array


class PosteriorDenoiser(nnx.Module):
  """log N(z_i; alpha e_v, sigma^2 I) per token v, combined with a prior by ``posterior``."""

  self_conditioning = False

  def __init__(self, embeddings_VxD, schedule: nnx.Module):
    self.schedule = schedule
    self.table = nnx.Variable(jnp.asarray(embeddings_VxD, jnp.float32))

  @property
  def hidden_size(self) -> int:
    return int(self.table[...].shape[1])

  def embedding_matrix(self) -> Array:
    return self.table[...]

  def embed(self, ids_BxL: Array) -> Array:
    return jnp.take(self.table[...], ids_BxL, axis=0)

  def denoise(self, logits_BxLxV: Array, temperature: float | Array = 1.0) -> Array:
    return diffusion.denoised_embedding_from_logits(logits_BxLxV, self.table[...], temperature)

  def log_likelihood(self, z_BxLxD: Array, gamma_B: Array) -> Array:
    """log p(z_i | x_i = v) up to a constant per (b, i), float32 [B, L, V]."""
    e = self.table[...]
    alpha, sigma = diffusion.alpha_sigma(jnp.asarray(gamma_B, jnp.float32))
    a, s2 = alpha[:, None, None], jnp.square(sigma)[:, None, None]
    dots = jnp.einsum("bld,vd->blv", z_BxLxD.astype(jnp.float32), e)
    sq = jnp.sum(jnp.square(e), axis=-1)
    return (a * dots - 0.5 * jnp.square(a) * sq[None, None]) / s2

  def posterior(self, loglik_BxLxV: Array) -> Array:
    raise NotImplementedError

  def __call__(self, z_BxLxD: Array, gamma_B: Array, self_cond_BxLxD: Array | None = None, **_) -> Array:
    return self.posterior(self.log_likelihood(z_BxLxD, gamma_B))


class ContextFreeDenoiser(PosteriorDenoiser):
  """Independent tokens with prior ``log_prior_V``: the reference that ignores context."""

  def __init__(self, embeddings_VxD, schedule: nnx.Module, log_prior_V):
    super().__init__(embeddings_VxD, schedule)
    self.log_prior = nnx.Variable(jnp.asarray(log_prior_V, jnp.float32))

  def posterior(self, loglik_BxLxV: Array) -> Array:
    return jax.nn.log_softmax(loglik_BxLxV + self.log_prior[...], axis=-1)

  def analytic_nll(self, ids_NxL: np.ndarray, mask_NxL: np.ndarray) -> float:
    """The unigram model's NLL of the valid tokens, nats/token: this oracle's bound
    without integration error."""
    log_p = np.asarray(jax.nn.log_softmax(self.log_prior[...]))
    ids, mask = np.asarray(ids_NxL), np.asarray(mask_NxL, bool)
    return float(-np.sum(log_p[ids[mask]]) / max(int(mask.sum()), 1))


class MarkovDenoiser(PosteriorDenoiser):
  """The exact posterior of a Markov chain whose state k is token k + ``offset``."""

  def __init__(self, chain: markov.MarkovChain, embeddings_VxD, schedule: nnx.Module, offset: int = 0):
    super().__init__(embeddings_VxD, schedule)
    log_t, log_pi = markov.log_chain_parameters(chain, offset, int(np.shape(embeddings_VxD)[0]))
    self.log_transition = nnx.Variable(jnp.asarray(log_t))
    self.log_initial = nnx.Variable(jnp.asarray(log_pi))

  def posterior(self, loglik_BxLxV: Array) -> Array:
    return markov.posterior_logits(loglik_BxLxV, self.log_transition[...], self.log_initial[...])
