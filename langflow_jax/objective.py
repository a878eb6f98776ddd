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
baselines' objectives (next-token CE, the MDLM NELBO) live with their models
in :mod:`langflow_jax.baselines`; :mod:`langflow_jax.methods` says which
objective and model each ``objective.name`` trains (``methods.create_model``).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import ml_collections

from langflow_jax import diffusion
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
  # distill: the truncated-SNR-weighted squared error of the student's x_hat against the
  # teacher's jump target, summed over valid tokens (mean over the width; distillation.py)
  distill_sum: Array = 0.0


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


def warp_quantiles(u_B: Array, power: float) -> Array:
  """u -> u^power: power > 1 moves training draws towards the schedule's clean end (low gamma).

  The Gumbel schedule spreads draws evenly in information (method §4.4), but the bound weights
  a denoiser's errors by e^-gamma, so the nats a model loses sit at the low-noise end
  (exp_known_entropy's gap profile). power = 1 is the paper's proposal; the schedule's fit is a
  regression of CE on gamma and does not depend on where the draws fall.
  """
  return u_B if power == 1.0 else jnp.power(u_B, power)


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
  u_B = warp_quantiles(sample_uniform(k_u, b, cfg.time_sampling), cfg.get("quantile_power", 1.0))
  gamma_B = jax.lax.stop_gradient(model.schedule.icdf(u_B))

  e_BxLxD = model.embed(ids_BxL)
  eps = jax.random.normal(k_eps, e_BxLxD.shape, jnp.float32)
  z_BxLxD = diffusion.add_noise(e_BxLxD, gamma_B, eps)

  def first_pass() -> Array:
    return model.self_cond_input(z_BxLxD, gamma_B, skip_scale=skip_scale, dropout_key=k_drop1)

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
  return objective_output(ce_BxL, tokens_B, fit_B, sc_B, gamma_B, elbo_B)


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


def objective_output(ce_BxL: Array, tokens_B: Array, fit_B: Array, sc_B: Array, gamma_B: Array,
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
      distill_sum=jnp.zeros((), jnp.float32),
  )
  ce_per_token_B = jnp.sum(ce_BxL, axis=-1) / jnp.maximum(tokens_B, 1.0)
  return ObjectiveOutput(terms=terms, gamma_B=gamma_B, ce_per_token_B=ce_per_token_B)


def total_loss(terms: LossTerms, cfg: ml_collections.ConfigDict, num_tokens: Array,
               num_seqs: Array) -> Array:
  """Scalar to differentiate: token-mean CE plus the weighted schedule fit (plus, for a
  student, the token-mean distillation error; zero for every other objective).

  The denominators are those of the whole (global, all micro-batch) batch, so
  summing this over micro-batches gives the full-batch loss exactly.
  """
  ce = terms.ce_sum / jnp.maximum(num_tokens, 1.0)
  fit = terms.schedule_fit_sum / jnp.maximum(num_seqs, 1.0)
  loss = cfg.ce_weight * ce + cfg.schedule_loss_weight * fit
  if cfg.elbo_weight > 0:
    loss = loss + cfg.elbo_weight * terms.elbo_sum / jnp.maximum(num_tokens, 1.0)
  return loss + terms.distill_sum / jnp.maximum(num_tokens, 1.0)  # exactly 0 + loss for the others


def skip_warmup_scale(step: Array, warmup_steps: int) -> Array:
  """Linear ramp of the preconditioning skip term over the first steps (method §4.5)."""
  if warmup_steps <= 0:
    return jnp.float32(1.0)
  return jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)


def metrics_from_terms(terms: LossTerms, schedule_loss_weight: float) -> dict[str, float]:
  """Reported figures from summed terms (host-side floats)."""
  ce = float(terms.ce_sum) / max(float(terms.num_tokens), 1.0)
  fit = float(terms.schedule_fit_sum) / max(float(terms.num_seqs), 1.0)
  distill = float(terms.distill_sum) / max(float(terms.num_tokens), 1.0)
  return {"ce": ce, "schedule_fit": fit, "loss": ce + schedule_loss_weight * fit + distill, "distill": distill,
          "elbo_integrand": float(terms.elbo_sum) / max(float(terms.num_tokens), 1.0),
          "self_cond_frac": float(terms.self_cond_seqs) / max(float(terms.num_seqs), 1.0)}


def add_terms(a: LossTerms, b: LossTerms) -> LossTerms:
  return jax.tree.map(jnp.add, a, b)


def zero_terms() -> LossTerms:
  z = jnp.zeros((), jnp.float32)
  return LossTerms(z, z, z, z, z, z, z)
