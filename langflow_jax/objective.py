"""Training objectives. LangFlow's: cross-entropy on noisy embeddings (method §4).

Flow matching with a Bregman loss on the posterior-mean parameterisation
reduces, for one-hot targets, to token cross-entropy, so the loss is

    L_CE = E_{x, gamma ~ schedule, eps} [ -log p_theta(z_gamma, gamma)[x] ]

averaged over tokens, plus the schedule's own fitting loss (which moves only
the schedule parameters). Self-conditioning: with probability
``self_cond_prob`` a first, stop-gradient pass supplies E^T softmax(logits) to
the second pass, the only one that is trained.

Each objective returns an :class:`ObjectiveOutput` whose terms are sums with
explicit denominators, so micro-batches and devices combine exactly. The
objective also decides the model it trains (:data:`MODELS`,
:func:`create_model`): ``ar`` trains the causal baseline of
:mod:`langflow_jax.baselines.ar` with next-token CE, ``mdlm`` the masked
diffusion baseline of :mod:`langflow_jax.baselines.mdlm` with its NELBO.
"""

from __future__ import annotations

from typing import Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections

from flax import nnx

from langflow_jax import diffusion
from langflow_jax import model as model_lib
from langflow_jax.baselines import ar, mdlm
from langflow_jax.errors import ConfigError
from langflow_jax.model import LangFlow

Array = jax.Array


@flax.struct.dataclass
class LossTerms:
  """Sums over a batch; divide by the matching count to report."""

  ce_sum: Array             # nats, summed over valid tokens
  num_tokens: Array         # valid tokens
  schedule_fit_sum: Array   # squared error of the entropy-curve fit, summed over sequences
  num_seqs: Array           # sequences with at least one valid token
  self_cond_seqs: Array     # sequences trained with a self-conditioning input
  # LangFlow: importance-weighted ELBO integrand 0.5 exp(-gamma - log pi(gamma)) ||x_hat - E[x]||^2,
  # summed over valid tokens (nats; an unbiased estimate of the bound's diffusion part)
  elbo_sum: Array = 0.0


@flax.struct.dataclass
class ObjectiveOutput:
  terms: LossTerms
  gamma_B: Array            # noise level of each sequence
  ce_per_token_B: Array     # mean CE of each sequence (0 when it has no tokens)


def sample_uniform(key: Array, batch: int, method: str) -> Array:
  """Quantiles u in [0, 1) for the noise levels of a batch.

  ``stratified`` uses one random offset and B evenly spaced points (VDM's
  low-discrepancy sampler), ``antithetic`` pairs u with 1 - u, ``iid`` draws
  independently.
  """
  if method == "stratified":
    # Strata are assigned to rows in random order: with a fixed row order a
    # model could tie each row to its noise level.
    k_offset, k_perm = jax.random.split(key)
    strata = jax.random.permutation(k_perm, batch).astype(jnp.float32)
    return (jax.random.uniform(k_offset, ()) + strata) / batch
  if method == "antithetic":
    half = jax.random.uniform(key, ((batch + 1) // 2,))
    return jnp.concatenate([half, 1.0 - half])[:batch]
  if method == "iid":
    return jax.random.uniform(key, (batch,))
  raise ConfigError(f"unknown objective.time_sampling '{method}'.", "use stratified, antithetic or iid.")


def token_cross_entropy(logits_BxLxV: Array, ids_BxL: Array) -> Array:
  """-log softmax(logits)[id] per token, float32."""
  logits = logits_BxLxV.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, ids_BxL[..., None], axis=-1)[..., 0]
  return log_z - target


def langflow_objective(model: LangFlow, ids_BxL: Array, mask_BxL: Array, key: Array, *,
                       cfg: ml_collections.ConfigDict, skip_scale: Array | float = 1.0,
                       train: bool = True) -> ObjectiveOutput:
  """The LangFlow training loss terms for one batch of token ids.

  ``train=False`` turns dropout off (evaluation of the same loss).
  """
  b = ids_BxL.shape[0]
  k_u, k_eps, k_coin, k_drop1, k_drop2 = jax.random.split(key, 5)
  if not train:
    k_drop1 = k_drop2 = None
  mask = mask_BxL.astype(jnp.float32)

  # Noise levels from the schedule; no gradient flows through the inverse CDF.
  u_B = sample_uniform(k_u, b, cfg.time_sampling)
  gamma_B = jax.lax.stop_gradient(model.schedule.gamma(u_B))

  e_BxLxD = model.embed(ids_BxL)
  eps = jax.random.normal(k_eps, e_BxLxD.shape, jnp.float32)
  z_BxLxD = diffusion.add_noise(e_BxLxD, gamma_B, eps)

  def first_pass() -> Array:
    logits = model(z_BxLxD, gamma_B, None, skip_scale=skip_scale, dropout_key=k_drop1)
    return jax.lax.stop_gradient(model.denoise(logits))

  use_sc = model.self_conditioning and cfg.self_cond_prob > 0
  if use_sc and cfg.self_cond_mode == "sample":
    sc_B = jax.random.bernoulli(k_coin, cfg.self_cond_prob, (b,))
    x_hat = jnp.where(sc_B[:, None, None], first_pass(), 0.0)
    logits = model(z_BxLxD, gamma_B, x_hat, skip_scale=skip_scale, dropout_key=k_drop2)
  elif use_sc:
    sc = jax.random.bernoulli(k_coin, cfg.self_cond_prob)
    sc_B = jnp.broadcast_to(sc, (b,))
    x_hat = jax.lax.cond(sc, first_pass, lambda: jnp.zeros_like(z_BxLxD))
    logits = model(z_BxLxD, gamma_B, x_hat, skip_scale=skip_scale, dropout_key=k_drop2)
  else:
    sc_B = jnp.zeros((b,), bool)
    logits = model(z_BxLxD, gamma_B, None, skip_scale=skip_scale, dropout_key=k_drop2)

  ce_BxL = token_cross_entropy(logits, ids_BxL) * mask
  tokens_B = jnp.sum(mask, axis=-1)
  ce_per_token_B = jnp.sum(ce_BxL, axis=-1) / jnp.maximum(tokens_B, 1.0)
  has_tokens_B = (tokens_B > 0).astype(jnp.float32)
  fit_B = model.schedule.fit_loss(gamma_B, ce_per_token_B) * has_tokens_B
  elbo_B = jnp.zeros_like(gamma_B)
  if cfg.elbo_weight > 0:
    elbo_B = elbo_integrand(model, logits, e_BxLxD, gamma_B, mask)
  return _output(ce_BxL, tokens_B, fit_B, sc_B, gamma_B, elbo_B)


def elbo_integrand(model: LangFlow, logits_BxLxV: Array, e_BxLxD: Array, gamma_B: Array,
                   mask_BxL: Array) -> Array:
  """Per sequence: 0.5 exp(-gamma - log pi(gamma)) sum_i ||x_hat_i - E[x_i]||^2 (method §11, sde).

  With gamma drawn from the schedule pi this is an unbiased estimate of the
  bound's diffusion part (the continuous-time ELBO in log-SNR); its gradient
  reaches the network through x_hat and the embeddings through both x_hat and
  E[x]. The importance weight is a constant (no gradient into the schedule).
  """
  x_hat = model.denoise(logits_BxLxV)
  sq_B = jnp.sum(jnp.sum(jnp.square(x_hat - e_BxLxD), axis=-1) * mask_BxL, axis=-1)
  log_w_B = -gamma_B - model.schedule.log_density(gamma_B)
  return 0.5 * jnp.exp(jax.lax.stop_gradient(log_w_B)) * sq_B


def _output(ce_BxL: Array, tokens_B: Array, fit_B: Array, sc_B: Array, gamma_B: Array,
            elbo_B: Array | None = None) -> ObjectiveOutput:
  """Summed terms from masked per-token CE and per-sequence extras."""
  has_tokens_B = (tokens_B > 0).astype(jnp.float32)
  terms = LossTerms(
      ce_sum=jnp.sum(ce_BxL),
      num_tokens=jnp.sum(tokens_B),
      schedule_fit_sum=jnp.sum(fit_B),
      num_seqs=jnp.sum(has_tokens_B),
      self_cond_seqs=jnp.sum(sc_B.astype(jnp.float32) * has_tokens_B),
      elbo_sum=jnp.zeros((), jnp.float32) if elbo_B is None else jnp.sum(elbo_B * has_tokens_B),
  )
  ce_per_token_B = jnp.sum(ce_BxL, axis=-1) / jnp.maximum(tokens_B, 1.0)
  return ObjectiveOutput(terms=terms, gamma_B=gamma_B, ce_per_token_B=ce_per_token_B)


def ar_objective(model: ar.ARTransformer, ids_BxL: Array, mask_BxL: Array, key: Array, *,
                 cfg: ml_collections.ConfigDict, skip_scale: Array | float = 1.0,
                 train: bool = True) -> ObjectiveOutput:
  """Next-token CE of the causal baseline, teacher-forced, over every valid token.

  Position 0 is predicted from the start vector, so the token count equals
  LangFlow's. There is no noise level (``gamma_B`` is 0), no schedule fit and
  no self-conditioning; ``cfg`` and ``skip_scale`` are unused.
  """
  del cfg, skip_scale
  mask = mask_BxL.astype(jnp.float32)
  logits = model(ids_BxL, dropout_key=key if train else None)
  ce_BxL = token_cross_entropy(logits, ids_BxL) * mask
  zeros_B = jnp.zeros(ids_BxL.shape[:1], jnp.float32)
  return _output(ce_BxL, jnp.sum(mask, axis=-1), zeros_B, zeros_B, zeros_B)


def mdlm_objective(model: mdlm.MaskedDiffusionLM, ids_BxL: Array, mask_BxL: Array, key: Array, *,
                   cfg: ml_collections.ConfigDict, skip_scale: Array | float = 1.0,
                   train: bool = True) -> ObjectiveOutput:
  """MDLM's continuous-time NELBO for the absorbing process with alpha_t = 1 - t.

  One t ~ U(eps, 1) per sequence (``objective.mask_eps``, drawn by
  ``objective.time_sampling``); each valid token is masked with probability
  t and the masked tokens' CE is weighted by -alpha'_t / (1 - alpha_t) = 1/t.
  ``ce_sum`` is that weighted sum, so the CE the trainer reports (train and
  held-out) is the NELBO in nats per token, an upper bound on the NLL, and
  ``gamma_B`` holds t. No schedule fit, no self-conditioning; ``skip_scale``
  is unused.
  """
  del skip_scale
  k_t, k_mask, k_drop = jax.random.split(key, 3)
  u_B = sample_uniform(k_t, ids_BxL.shape[0], cfg.time_sampling)
  t_B = cfg.mask_eps + (1.0 - cfg.mask_eps) * u_B
  masked = mdlm.random_mask(k_mask, t_B, mask_BxL)
  nll_BxL = mdlm.masked_nll(model, ids_BxL, masked, dropout_key=k_drop if train else None)
  zeros_B = jnp.zeros_like(t_B)
  return _output(nll_BxL / t_B[:, None], jnp.sum(mask_BxL.astype(jnp.float32), axis=-1), zeros_B, zeros_B, t_B)


def total_loss(terms: LossTerms, cfg: ml_collections.ConfigDict, num_tokens: Array,
               num_seqs: Array) -> Array:
  """Scalar to differentiate: token-mean CE plus the weighted schedule fit.

  The denominators are those of the whole (global, all micro-batch) batch, so
  summing this over micro-batches gives the full-batch loss exactly.
  """
  ce = terms.ce_sum / jnp.maximum(num_tokens, 1.0)
  fit = terms.schedule_fit_sum / jnp.maximum(num_seqs, 1.0)
  loss = cfg.ce_weight * ce + cfg.schedule_loss_weight * fit
  if cfg.elbo_weight > 0:
    loss = loss + cfg.elbo_weight * terms.elbo_sum / jnp.maximum(num_tokens, 1.0)
  return loss


OBJECTIVES: dict[str, Callable[..., ObjectiveOutput]] = {
    "langflow": langflow_objective,
    "ar": ar_objective,
    "mdlm": mdlm_objective,
}

# The model each objective trains; objectives not listed train a LangFlow.
MODELS: dict[str, Callable[[ml_collections.ConfigDict, int], nnx.Module]] = {
    "langflow": model_lib.create_model,
    "ar": ar.create_model,
    "mdlm": mdlm.create_model,
}


def create_model(config: ml_collections.ConfigDict, seed: int = 0) -> nnx.Module:
  """A fresh model of the kind ``config.objective.name`` trains."""
  return MODELS.get(config.objective.name, model_lib.create_model)(config, seed)


def get_objective(name: str) -> Callable[..., ObjectiveOutput]:
  if name not in OBJECTIVES:
    raise ConfigError(f"unknown objective '{name}'.", f"set --config.objective.name to one of {sorted(OBJECTIVES)}.")
  return OBJECTIVES[name]


def skip_warmup_scale(step: Array, warmup_steps: int) -> Array:
  """Linear ramp of the preconditioning skip term over the first steps (method §4.5)."""
  if warmup_steps <= 0:
    return jnp.float32(1.0)
  return jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)


def metrics_from_terms(terms: LossTerms, schedule_loss_weight: float) -> dict[str, float]:
  """Reported figures from summed terms (host-side floats)."""
  ce = float(terms.ce_sum) / max(float(terms.num_tokens), 1.0)
  fit = float(terms.schedule_fit_sum) / max(float(terms.num_seqs), 1.0)
  return {"ce": ce, "schedule_fit": fit, "loss": ce + schedule_loss_weight * fit,
          "elbo_integrand": float(terms.elbo_sum) / max(float(terms.num_tokens), 1.0),
          "self_cond_frac": float(terms.self_cond_seqs) / max(float(terms.num_seqs), 1.0)}


def add_terms(a: LossTerms, b: LossTerms) -> LossTerms:
  return jax.tree.map(jnp.add, a, b)


def zero_terms() -> LossTerms:
  z = jnp.zeros((), jnp.float32)
  return LossTerms(z, z, z, z, z, z)
