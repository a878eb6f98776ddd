"""The masked discrete diffusion baseline: MDLM (Sahoo et al. 2024) on LangFlow's backbone.

Absorbing-state diffusion over token ids with the log-linear schedule
``alpha_t = 1 - t``: at time t every token is independently replaced by
[MASK] (id ``V``, one row past the tokenizer's vocabulary) with probability
t. The model predicts the clean tokens from a partly masked sequence and is
trained on the continuous-time NELBO

    NELBO(x) = E_{t ~ U(0, 1), x_t} [ (1 / t) * sum_{masked l} -log p_theta(x_l | x_t) ],

an upper bound on -log p(x) (nats per sequence; :func:`objective`, what
``objective.name=mdlm`` trains, draws t from ``U(eps, 1)`` as MDLM does).

The network is the AR baseline's family (:mod:`langflow_jax.baselines.ar`):
pre-LN blocks with RoPE and the width, heads, MLP, dropout and compute dtype of
``config.model``, plain scale-only layer norms, an untied zero-initialised
head over the V real tokens, and the same parameter names and
``logical_axes``, so the trainer, EMA, checkpoints, sharding rules and
``checkpoint.load_model`` handle it unchanged. Differences from the AR model:
attention is bidirectional, the embedding table has V + 1 rows, there is no
start vector, and the output goes through MDLM's SUBS parameterisation.

No time conditioning, as in MDLM's default configuration
(``time_conditioning: False``): with the SUBS parameterisation the fraction
of [MASK] inputs already tells the network t, and the optimal denoiser of a
masked process does not depend on t at all (Zheng et al. 2024, "Masked
diffusion models are secretly time-agnostic masked models"). A
time-independent network has two practical gains: its output for an
unchanged input is unchanged, so the sampler can skip evaluations (MDLM's
``ddpm_cache``), and it has exactly the AR baseline's weights (less its start
vector, plus one embedding row), which keeps the equal-compute comparison of
issue 10 clean.

SUBS ("substitution"): the [MASK] id has no output column (its probability
is 0, a logit of -inf), and an unmasked input is copied to the output
(carry-over: log-probability 0 on the input id, -inf elsewhere), so only
masked positions carry loss.

Padding (unwrapped data, ``mask_BxL`` false) is never masked and never
scored: like LangFlow's padding, it stays visible to attention, so the bound
is that of the valid tokens given the row's length.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from langflow_jax.baselines.ar import CausalBlock, PlainTransformer, choose_tokens, generation_prompt
from langflow_jax.config import NELBO_ESTIMATORS
from langflow_jax.errors import ConfigError
from langflow_jax.model import check_length
from langflow_jax.objective import ObjectiveOutput, objective_output, sample_uniform

Array = jax.Array
ESTIMATORS = NELBO_ESTIMATORS  # the one list, in config.py


class BidirectionalBlock(CausalBlock):
  """The AR baseline's plain pre-LN block, attending over every position."""

  causal = False


class MaskedDiffusionLM(PlainTransformer):
  """``model(x_t)[b, l]`` = SUBS log-probabilities of the clean token at l (float32, [B, L, V])."""

  block_class = BidirectionalBlock

  def __init__(self, model_cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    # one id past the tokenizer's vocabulary is [MASK], for every tokenizer
    super().__init__(model_cfg, rngs=rngs, num_embeddings=int(model_cfg.vocab_size) + 1)
    self.mask_id = self.vocab_size

  def logits(self, xt_BxL: Array, *, dropout_key: Array | None = None) -> Array:
    """The network's raw float32 logits over the V real tokens, before SUBS."""
    check_length(xt_BxL.shape[1], self.max_length)
    return self._run(self._embed(xt_BxL), 0, None, dropout_key)[0]

  def __call__(self, xt_BxL: Array, *, dropout_key: Array | None = None) -> Array:
    return subs_log_probs(self.logits(xt_BxL, dropout_key=dropout_key), xt_BxL, self.mask_id)


def subs_log_probs(logits_BxLxV: Array, xt_BxL: Array, mask_id: int) -> Array:
  """SUBS: log-softmax at [MASK] inputs, a one-hot copy of the input elsewhere (float32).

  The [MASK] id has no column, i.e. a logit of -inf: it is never predicted.
  """
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  carry = jnp.where(jnp.arange(logp.shape[-1]) == xt_BxL[..., None], 0.0, -jnp.inf)
  return jnp.where((xt_BxL == mask_id)[..., None], logp, carry)


def create_model(config: ml_collections.ConfigDict, seed: int = 0) -> MaskedDiffusionLM:
  """A freshly initialised MDLM baseline for ``config.model``."""
  return MaskedDiffusionLM(config.model, rngs=nnx.Rngs(params=seed))


# --------------------------------------------------------------------------- forward process and loss


def random_mask(key: Array, t_B: Array, valid_BxL: Array) -> Array:
  """The forward process q(x_t | x): each valid token masked independently with probability t."""
  return jax.random.bernoulli(key, t_B[:, None], valid_BxL.shape) & valid_BxL.astype(bool)


def fixed_size_mask(key: Array, k_B: Array, valid_BxL: Array) -> Array:
  """Exactly ``k_B`` valid positions of each row, every such subset equally likely."""
  scores = jnp.where(valid_BxL.astype(bool), jax.random.uniform(key, valid_BxL.shape), 2.0)
  rank_BxL = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  return (rank_BxL < k_B[:, None]) & valid_BxL.astype(bool)


def masked_nll(model: MaskedDiffusionLM, ids_BxL: Array, masked_BxL: Array, *,
               dropout_key: Array | None = None) -> Array:
  """-log p_theta(x_l | x_t) at the masked positions, 0 elsewhere (float32, [B, L]).

  At a masked position the SUBS log-probability is the log-softmax of the raw
  logits, and at an unmasked one the loss is exactly 0, so this is the CE of
  the raw logits selected by the mask (no [B, L, V] log-softmax is formed).
  """
  xt_BxL = jnp.where(masked_BxL, model.mask_id, ids_BxL)
  logits = model.logits(xt_BxL, dropout_key=dropout_key)
  nll_BxL = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, ids_BxL[..., None], axis=-1)[..., 0]
  return jnp.where(masked_BxL, nll_BxL, 0.0)


def objective(model: MaskedDiffusionLM, ids_BxL: Array, mask_BxL: Array, key: Array, *,
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
  masked = random_mask(k_mask, t_B, mask_BxL)
  nll_BxL = masked_nll(model, ids_BxL, masked, dropout_key=k_drop if train else None)
  zeros_B = jnp.zeros_like(t_B)
  return objective_output(nll_BxL / t_B[:, None], jnp.sum(mask_BxL.astype(jnp.float32), axis=-1), zeros_B,
                          zeros_B, t_B)


# --------------------------------------------------------------------------- likelihood bound


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "estimator"))
def _sequence_nelbo(graphdef: Any, state: nnx.State, key: Array, ids_BxL: Array, valid_BxL: Array,
                    eps: Array, *, num_samples: int, estimator: str) -> Array:
  """Each row's NELBO (nats, summed over its tokens), averaged over ``num_samples`` draws."""
  model = nnx.merge(graphdef, state)
  k_u, k_mask = jax.random.split(key)
  u_B = jax.random.uniform(k_u, ids_BxL.shape[:1])  # one stratum offset per row
  tokens_B = jnp.sum(valid_BxL.astype(jnp.float32), axis=-1)

  def one_draw(total_B, j):
    v_B = (j + u_B) / num_samples  # stratum j of [0, 1)
    k = jax.random.fold_in(k_mask, j)
    if estimator == "time":
      t_B = eps + (1.0 - eps) * v_B
      masked, weight_B = random_mask(k, t_B, valid_BxL), 1.0 / t_B
    else:  # mask_count: k ~ U{1..L_b}; t integrated out exactly (see nelbo)
      k_B = jnp.clip(1.0 + jnp.floor(v_B * tokens_B), 1.0, jnp.maximum(tokens_B, 1.0))
      masked, weight_B = fixed_size_mask(k, k_B.astype(jnp.int32), valid_BxL), tokens_B / k_B
    nll_B = jnp.sum(masked_nll(model, ids_BxL, masked), axis=-1)
    return total_B + weight_B * nll_B, None

  total_B, _ = jax.lax.scan(one_draw, jnp.zeros_like(tokens_B), jnp.arange(num_samples))
  return total_B / num_samples


def nelbo(model: MaskedDiffusionLM, ids_NxL: np.ndarray | Sequence[Sequence[int]],
          mask_NxL: np.ndarray | None = None, *, key: Array, num_samples: int = 16,
          estimator: str = "time", eps: float = 1e-3, batch_size: int = 32) -> dict[str, Any]:
  """The NELBO of token sequences (an upper bound on their NLL): nats/token and perplexity.

  Unbiased Monte Carlo over ``num_samples`` draws per sequence, stratified
  (draw j takes its variable from stratum [j/n, (j+1)/n) with one uniform
  offset per sequence); each draw is one network evaluation of the batch.

  * ``time``: MDLM's estimator, the training loss without dropout:
    t ~ U(eps, 1), independent masks, weight 1/t. ``eps`` drops the last
    sliver of the time integral (MDLM: 1e-3, as ``objective.mask_eps``; the
    bound moves by O(eps)).
  * ``mask_count``: the same integral with t done exactly. Given t, the
    number of masked tokens is Binomial(L, t), and integrating the 1/t weight
    against it gives NELBO = sum_{k=1..L} E_{|M|=k}[mean_{l in M} -log p(x_l | x_M masked)],
    so a draw takes k ~ U{1..L} (stratified), masks k uniform positions and
    weighs the masked CE by L / k. No truncation, no 1/t blow-up: a much
    lower variance. With ``num_samples`` equal to L every mask size is used
    exactly once (a deterministic quadrature over t; only the positions are random).

  Returns ``nelbo`` (nats/token, token-weighted over all sequences),
  ``ppl`` = exp(nelbo), the totals and each sequence's bound per token.
  The result is a function of ``key`` (batch i uses ``fold_in(key, i)``).
  """
  if estimator not in ESTIMATORS:
    raise ConfigError(f"unknown MDLM bound estimator '{estimator}'.", f"use one of {', '.join(ESTIMATORS)}.")
  if num_samples < 1:
    raise ConfigError(f"num_samples={num_samples} must be positive.", "use e.g. 16.")
  if not 0.0 <= eps < 1.0:
    raise ConfigError(f"eps={eps} must lie in [0, 1).", "use MDLM's 1e-3.")
  ids_NxL = np.asarray(ids_NxL, np.int32)
  mask_NxL = np.ones(ids_NxL.shape, bool) if mask_NxL is None else np.asarray(mask_NxL, bool)
  graphdef, state = nnx.split(model)
  sums = []
  for i in range(0, len(ids_NxL), batch_size):
    total_B = _sequence_nelbo(graphdef, state, jax.random.fold_in(key, i // batch_size),
                              jnp.asarray(ids_NxL[i:i + batch_size]), jnp.asarray(mask_NxL[i:i + batch_size]),
                              jnp.float32(eps), num_samples=int(num_samples), estimator=estimator)
    sums.append(np.asarray(total_B, np.float64))
  sum_N, count_N = np.concatenate(sums), mask_NxL.sum(axis=-1).astype(np.float64)
  total, tokens = float(sum_N.sum()), float(count_N.sum())
  bound = total / max(tokens, 1.0)
  return {"nelbo": bound, "ppl": math.exp(bound), "nelbo_sum": total, "num_tokens": tokens,
          "nelbo_per_token_N": sum_N / np.maximum(count_N, 1.0)}


# --------------------------------------------------------------------------- sampling


@functools.partial(jax.jit, static_argnames=("graphdef", "length", "steps", "top_p", "greedy", "cache"))
def ancestral_sample(graphdef: Any, state: nnx.State, key: Array, prompt_BxP: Array, temperature: Array, *,
                     length: int, steps: int, top_p: float = 1.0, greedy: bool = False,
                     cache: bool = True) -> tuple[Array, Array]:
  """The jitted reverse process over ``nnx.split(model)``; see :func:`generate`.

  Returns the ids [B, length] and the number of network evaluations made.
  """
  model = nnx.merge(graphdef, state)
  b, p = prompt_BxP.shape
  x_BxL = jnp.concatenate([prompt_BxP.astype(jnp.int32), jnp.full((b, length - p), model.mask_id, jnp.int32)], 1)
  k_unmask, k_token = jax.random.split(key)

  def propose(x_BxL, version):
    return choose_tokens(model(x_BxL), jax.random.fold_in(k_token, version), temperature, top_p, greedy)

  def step(carry, i):
    x_BxL, proposal_BxL, version, stale, nfe = carry
    if cache:
      proposal_BxL, nfe = jax.lax.cond(stale, lambda: (propose(x_BxL, version), nfe + 1),
                                       lambda: (proposal_BxL, nfe))
    else:
      proposal_BxL, nfe = propose(x_BxL, version), nfe + 1
    # t = 1 - i/T to s = 1 - (i+1)/T: a masked token unmasks with prob (t - s)/t = 1/(T - i)
    unmask = jax.random.bernoulli(jax.random.fold_in(k_unmask, i), 1.0 / (steps - i), x_BxL.shape)
    unmask = unmask & (x_BxL == model.mask_id)
    changed = jnp.any(unmask)
    x_BxL = jnp.where(unmask, proposal_BxL, x_BxL)
    return (x_BxL, proposal_BxL, version + changed.astype(jnp.int32), changed, nfe), None

  init = (x_BxL, jnp.zeros_like(x_BxL), jnp.int32(0), jnp.bool_(True), jnp.int32(0))
  (x_BxL, _, _, _, nfe), _ = jax.lax.scan(step, init, jnp.arange(steps))
  return x_BxL, nfe


def generate(model: MaskedDiffusionLM, key: Array, length: int, *, steps: int,
             prompt_BxP: Array | None = None, batch_size: int | None = None, temperature: float = 1.0,
             top_p: float = 1.0, greedy: bool = False, cache: bool = True, return_nfe: bool = False):
  """Sequences of ``length`` tokens by MDLM's ancestral sampler with ``steps`` steps.

  From all-[MASK] (after an optional fixed prompt prefix), the time grid
  t_i = 1 - i/steps runs to 0; at each step every still-masked token unmasks
  with probability (t - s)/t and takes a token drawn from the model's
  p(x_l | x_t) (temperature / top-p / argmax on it, as the AR sampler does);
  unmasked tokens never change (carry-over). The last step unmasks all that
  is left, so no [MASK] remains and no extra denoising pass is needed (MDLM
  stops at t = 1e-5 and then takes an argmax).

  The unmask decision is a Bernoulli draw of its own and the token a single
  categorical draw from p(x_l | x_t), the AR sampler's draw. MDLM's reference
  takes both from one (V+1)-way categorical dominated by the [MASK] mass, the
  same process, where float32 Gumbel noise lowers the effective temperature
  (Zheng et al. 2024).

  Network evaluations: ``steps`` with ``cache=False``. With ``cache`` (MDLM's
  ddpm_cache, exact for a time-independent network) a step in which no token
  of the batch changed reuses the last evaluation, so the count is the number
  of steps after which something changed, at most min(steps, B * free
  tokens); ``return_nfe`` returns it. Both settings give the same samples:
  the token proposals are keyed by how many changes came before, so the
  cache only saves work. Deterministic given ``key``.
  """
  if steps < 1:
    raise ConfigError(f"steps={steps} must be positive.", "use e.g. --config.sample.steps=128.")
  prompt_BxP = generation_prompt(prompt_BxP, batch_size, length, model.max_length, temperature=temperature,
                                 top_p=top_p, greedy=greedy)
  graphdef, state = nnx.split(model)
  ids, nfe = ancestral_sample(graphdef, state, key, prompt_BxP, jnp.float32(temperature), length=int(length),
                              steps=int(steps), top_p=float(top_p), greedy=bool(greedy), cache=bool(cache))
  return (ids, nfe) if return_nfe else ids


def sample_texts(model: MaskedDiffusionLM, tokenizer, sample_cfg: ml_collections.ConfigDict, length: int,
                 prompt: str = "") -> list[str]:
  """``sample.num`` decoded samples in ``sample.steps`` steps: unconditional, or after ``[BOS] + prompt``."""
  if not isinstance(model, MaskedDiffusionLM):
    raise ConfigError("this run did not train the masked diffusion baseline.",
                      "pass the --workdir of a run trained with --config.objective.name=mdlm.")
  prompt_ids = [tokenizer.bos_id, *tokenizer.encode(prompt)] if prompt else []
  prompt_BxP = jnp.tile(jnp.asarray(prompt_ids, jnp.int32).reshape(1, -1), (sample_cfg.num, 1))
  greedy = sample_cfg.temperature == 0.0
  ids = generate(model, jax.random.PRNGKey(sample_cfg.seed), length, steps=sample_cfg.steps,
                 prompt_BxP=prompt_BxP, temperature=1.0 if greedy else sample_cfg.temperature,
                 top_p=sample_cfg.top_p, greedy=greedy)
  return [tokenizer.decode(row) for row in np.asarray(ids)]
