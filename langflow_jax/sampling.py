"""Sampling: the official Euler-EDM sampler, its variants, prompts, infill, best-of-n.

The official sampler (method §6.1) starts from z ~ N(0, I), walks a decreasing
grid of gamma values and at every step predicts the clean embedding
x_hat = E^T softmax(f(z, gamma_t, s)), feeds that prediction back as the
NEXT step's self-conditioning input s, and moves z with the exact DDIM step
(the flow solved with x_hat held fixed). A last pass at the final gamma gives
the tokens by argmax. Total network evaluations: N (N-1 updates + 1 final).

Variants (``SamplerOptions.sampler``):

* ``euler``: the official sampler above.
* ``heun``: second order; the DDIM step is taken with the mean of the
  predictions at both ends of the step (an exponential trapezoid rule),
  2 evaluations per update.
* ``stochastic``: EDM-style churn; before each step z is pushed to a noisier
  level gamma_hat = gamma_t + 2 log(1 + c), c = min(churn / (N-1), sqrt 2 - 1),
  with fresh Gaussian noise, then stepped from gamma_hat. ``churn=0`` is
  exactly ``euler``.
* ``multistep``: the few-step mode, a second-order multistep update
  (DPM-Solver++(2M)) that extrapolates x_hat from the last two predictions at
  no extra evaluation; meant for 8-32 steps.

Step grids (``grid``): ``official`` (the schedule's inverse CDF at torch's
float32 linspace(1 - 1e-5, 1e-5, N), uniform in the schedule's CDF),
``cdf`` (the same without the 1e-5 margins: endpoints exactly gamma_max and
gamma_min) and ``gamma`` (uniform in gamma between the schedule's endpoints).

Conditioning: fixed tokens at any positions (a prefix prompt, infill gaps).
Before every network evaluation, z at those positions is replaced by the
noised clean embedding alpha_t E[x] + sigma_t eps at the current level, and
their prediction x_hat (update and self-conditioning) is E[x] itself. ``eps``
is drawn ONCE per run and per position: then the fixed positions follow
exactly the path that the deterministic sampler itself takes for a token it
predicts perfectly (a DDIM step with x_hat = E[x] maps alpha_t E[x] + sigma_t eps
to alpha_s E[x] + sigma_s eps), and the run stays a deterministic function
of its key. Fixed tokens are returned unchanged.

Numerics: the network, softmax and E^T p are float32. The official update
runs in float64; ``update_dtype="auto"`` does the same under
``jax.enable_x64`` except on TPU (float32 there; about 1e-7 relative drift
per step, tokens unaffected on the parity fixture).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from langflow_jax import config as config_lib
from langflow_jax import diffusion, likelihood, parallel
from langflow_jax.errors import ConfigError, UserError
from langflow_jax.model import LangFlow, chosen_log_probs, vocab_argmax
from langflow_jax.schedule import NoiseSchedule, linspace_f32, sampler_u_grid

Array = jax.Array

# Network evaluations per update step, for each sampler name of config.SAMPLERS
# (the names, grids and update dtypes are listed once, in config.py).
_EVALS_PER_STEP = {"euler": 1, "heun": 2, "stochastic": 1, "multistep": 1}
SAMPLERS = {name: _EVALS_PER_STEP[name] for name in config_lib.SAMPLERS}
GRIDS = config_lib.STEP_GRIDS
UPDATE_DTYPES = config_lib.UPDATE_DTYPES
GAP = re.compile(r"_{3,}(\d*)")  # an infill gap: ___ (default length) or ___5 (5 tokens)
# Sampling keys are salted. nnx.Rngs(params=s) draws its i-th init key as
# fold_in(PRNGKey(s), i) == split(PRNGKey(s), n)[i], so unsalted, PRNGKey(0)'s
# initial noise would be the same random bits as a seed-0 model's embedding
# init (seen: a lightly trained model then "samples" token ids 0, 1, 2, ...).
KEY_SALT = 0x73616D70


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
  """How to sample; hashable, so it keys the compiled loop."""

  sampler: str = "euler"
  steps: int = 128
  grid: str = "official"
  temperature: float = 1.0      # on the predicted probabilities inside x_hat; argmax is unaffected
  churn: float = 0.0            # stochastic sampler only
  self_condition: bool = True   # feed the previous prediction back (official); False for ablations
  update_dtype: str = "auto"    # dtype of the DDIM update: auto | float64 | float32
  trace: bool = False           # also return the argmax tokens at every step (--show-steps)

  def __post_init__(self):
    config_lib.check_sampler_settings(self)  # the same rules as --config.sample.*

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, **changes) -> "SamplerOptions":
    """Options from the ``sample`` config group, with keyword changes on top."""
    values = dict(sampler=cfg.sampler, steps=int(cfg.steps), grid=cfg.grid, temperature=float(cfg.temperature),
                  churn=float(cfg.churn), update_dtype=cfg.get("update_dtype", "auto"))
    values.update({k: v for k, v in changes.items() if v is not None})
    return cls(**values)

  @property
  def nfe(self) -> int:
    """Network evaluations per sample."""
    return SAMPLERS[self.sampler] * (self.steps - 1) + 1

  def resolved_update_dtype(self) -> str:
    if self.update_dtype != "auto":
      return self.update_dtype
    return "float32" if jax.default_backend() == "tpu" else "float64"


@flax.struct.dataclass
class Conditioning:
  """Given tokens: ``ids`` at the positions where ``fixed`` is True (others ignored)."""

  ids_BxL: Array    # int32
  fixed_BxL: Array  # bool

  def tile(self, n: int) -> "Conditioning":
    """Each row repeated n times in a row (candidates of one request are adjacent)."""
    return Conditioning(jnp.repeat(self.ids_BxL, n, axis=0), jnp.repeat(self.fixed_BxL, n, axis=0))


@flax.struct.dataclass
class SampleOutput:
  tokens_BxL: Array          # int32, argmax of the final pass (given tokens kept)
  token_logprob_BxL: Array   # log softmax of the final logits at the chosen tokens, float32
  final_z_BxLxD: Array       # the input of the final pass
  gammas_N: Array            # the step grid, noisy to clean
  logits_BxLxV: Array | None = None  # final logits (return_logits=True)
  trace_NxBxL: Array | None = None   # argmax tokens at each step, the last row is the final pass


# --------------------------------------------------------------------------- grid


def step_grid(schedule: NoiseSchedule, steps: int, grid: str = "official") -> np.ndarray:
  """The N gamma values the sampler visits, noisy to clean, float32."""
  if grid == "official":
    gammas = schedule.icdf(sampler_u_grid(steps))
  elif grid == "cdf":
    gammas = schedule.icdf(linspace_f32(1.0, 0.0, steps))
  elif grid == "gamma":
    lo, hi = (float(g) for g in schedule.endpoints())
    gammas = linspace_f32(hi, lo, steps)
  else:
    raise ValueError(f"unknown step grid '{grid}' (SamplerOptions checks it)")
  return np.asarray(gammas, np.float32)


# --------------------------------------------------------------------------- the loop


def sample_loop(model: LangFlow, z0_BxLxD: Array, gammas_N: Array, options: SamplerOptions, *,
                cond: Conditioning | None = None, cond_eps_BxLxD: Array | None = None,
                key: Array | None = None, update_dtype=jnp.float32, return_logits: bool = False,
                temperature: float | Array | None = None, churn: float | Array | None = None) -> SampleOutput:
  """The sampler as one traceable function (call it under ``jax.jit``).

  ``key`` is used by the stochastic sampler only; ``cond_eps`` is the fixed
  noise of the given tokens (required with ``cond``). ``temperature`` and
  ``churn`` override the options' values and may be traced (one compilation
  for all values).
  """
  temperature = options.temperature if temperature is None else temperature
  churn = options.churn if churn is None else churn
  b = z0_BxLxD.shape[0]
  n = gammas_N.shape[0]
  gammas_N = gammas_N.astype(jnp.float32)
  emb_VxD = model.embedding_matrix()
  if cond is not None:
    fixed = cond.fixed_BxL[..., None]
    e_fixed = jnp.take(emb_VxD, cond.ids_BxL, axis=0)

  def pin(z, g):
    """Given positions get their clean embedding noised to level g."""
    if cond is None:
      return z
    noised = diffusion.add_noise(e_fixed, jnp.full((b,), g, jnp.float32), cond_eps_BxLxD)
    return jnp.where(fixed, noised, z)

  def predict(z, g, s):
    logits = model(z, jnp.full((b,), g, jnp.float32), s if options.self_condition else None)
    x_hat = diffusion.denoised_embedding_from_logits(logits, emb_VxD, temperature)
    if cond is not None:
      x_hat = jnp.where(fixed, e_fixed, x_hat)
    return logits, x_hat

  def ddim(z, x_hat, g_t, g_s):
    out = diffusion.ddim_step(z.astype(update_dtype), x_hat.astype(update_dtype),
                              g_t.astype(update_dtype), g_s.astype(update_dtype))
    return out.astype(jnp.float32)

  def argmax_tokens(logits):
    tokens = vocab_argmax(logits)
    return tokens if cond is None else jnp.where(cond.fixed_BxL, cond.ids_BxL, tokens)

  churn_c = jnp.minimum(jnp.asarray(churn, jnp.float32) / max(n - 1, 1), math.sqrt(2.0) - 1.0)

  def step(carry, xs):
    z, s, x_prev, h_prev = carry
    g_t, g_s, i, k = xs
    if options.sampler == "stochastic":
      # Raise the noise from g_t to g_hat with fresh noise, then step from g_hat:
      # z_hat = (alpha_hat / alpha_t) z + sqrt(sigma_hat^2 - (alpha_hat sigma_t / alpha_t)^2) xi,
      # the variance written as alpha_hat^2 e^g_t expm1(g_hat - g_t): no cancellation,
      # and churn = 0 is exactly euler.
      g_hat = jnp.minimum(g_t + 2.0 * jnp.log1p(churn_c), gammas_N[0])
      ratio = jnp.exp((jax.nn.softplus(g_t) - jax.nn.softplus(g_hat)) / 2)
      a_h, _ = diffusion.alpha_sigma(g_hat)
      extra = a_h * jnp.sqrt(jnp.exp(g_t) * jnp.expm1(g_hat - g_t))
      z = ratio * z + extra * jax.random.normal(k, z.shape, jnp.float32)
      g_t = g_hat
    z = pin(z, g_t)
    logits, x_hat = predict(z, g_t, s)
    s_new = x_hat
    h = (g_t - g_s) / 2  # step length in lambda = log(alpha / sigma)
    if options.sampler == "heun":
      z_pred = pin(ddim(z, x_hat, g_t, g_s), g_s)
      _, x_end = predict(z_pred, g_s, x_hat)
      z_new = ddim(z, 0.5 * (x_hat + x_end), g_t, g_s)
      s_new = x_end
    elif options.sampler == "multistep":
      r = h_prev / jnp.maximum(h, 1e-12)
      extrapolated = (1 + 0.5 / r) * x_hat - (0.5 / r) * x_prev
      z_new = ddim(z, jnp.where(i > 0, extrapolated, x_hat), g_t, g_s)
    else:
      z_new = ddim(z, x_hat, g_t, g_s)
    out = argmax_tokens(logits) if options.trace else None
    return (z_new, s_new, x_hat, h), out

  zeros = jnp.zeros_like(z0_BxLxD, jnp.float32)
  keys = jax.random.split(key if key is not None else jax.random.PRNGKey(0), max(n - 1, 1))[: n - 1]
  carry = (z0_BxLxD.astype(jnp.float32), zeros, zeros, jnp.float32(1.0))
  xs = (gammas_N[:-1], gammas_N[1:], jnp.arange(n - 1), keys)
  (z, s, _, _), trace = jax.lax.scan(step, carry, xs)

  z = pin(z, gammas_N[-1])
  logits = model(z, jnp.full((b,), gammas_N[-1]), s if options.self_condition else None)
  tokens = argmax_tokens(logits)
  token_logprob = chosen_log_probs(logits, tokens)
  if options.trace:
    trace = jnp.concatenate([trace, tokens[None]], axis=0)
  return SampleOutput(tokens_BxL=tokens, token_logprob_BxL=token_logprob, final_z_BxLxD=z,
                      gammas_N=gammas_N, logits_BxLxV=logits if return_logits else None,
                      trace_NxBxL=trace if options.trace else None)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How a sharded call places its arguments: the mesh, the weights' shardings
  (by the rules), the batch rows and which optional parts are present."""

  mesh: jax.sharding.Mesh
  state: parallel.Frozen
  rows: int
  cond: bool = False
  logits: bool = False
  trace: bool = False

  def rows_sharding(self, ndim: int, batch_dim: int = 0):
    return parallel.rows_sharding(self.mesh, ndim, self.rows, batch_dim)

  def output(self) -> SampleOutput:
    """Shardings of a :class:`SampleOutput`: rows over data x fsdp, the grid replicated."""
    r = self.rows_sharding
    return SampleOutput(tokens_BxL=r(2), token_logprob_BxL=r(2), final_z_BxLxD=r(3),
                        gammas_N=parallel.replicated(self.mesh), logits_BxLxV=r(3) if self.logits else None,
                        trace_NxBxL=r(3, 1) if self.trace else None)


def _place(model: LangFlow, mesh: jax.sharding.Mesh, rows: int, **parts) -> tuple:
  """(graphdef, weights placed by the sharding rules, layout) for a sharded call."""
  graphdef, state = nnx.split(model)
  shardings = parallel.tree_shardings(state, mesh)
  state = jax.device_put(state, shardings)  # a no-op for weights already placed
  return graphdef, state, _Layout(mesh, parallel.Frozen.of(shardings), rows, **parts)


@functools.lru_cache(maxsize=16)
def _compiled_loop(graphdef, options: SamplerOptions, update_dtype: str, return_logits: bool,
                   layout: _Layout | None = None):
  """One jitted loop per static choice; the grid, temperature and churn are data.

  With a ``layout`` the loop is jitted on its mesh with explicit shardings:
  rows over data x fsdp, weights by the sharding rules.
  """
  def run(state, z0, gammas, cond, cond_eps, key, temperature, churn):
    model = nnx.merge(graphdef, state)
    return sample_loop(model, z0, gammas, options, cond=cond, cond_eps_BxLxD=cond_eps, key=key,
                       update_dtype=jnp.dtype(update_dtype), return_logits=return_logits,
                       temperature=temperature, churn=churn)
  if layout is None:
    return jax.jit(run)
  r, rep = layout.rows_sharding, parallel.replicated(layout.mesh)
  cond = Conditioning(r(2), r(2)) if layout.cond else None
  in_shardings = (layout.state.thaw(), r(3), rep, cond, r(3) if layout.cond else None, rep, rep, rep)
  return parallel.mesh_jit(run, layout.mesh, in_shardings=in_shardings, out_shardings=layout.output())


def _static_part(options: SamplerOptions) -> SamplerOptions:
  return dataclasses.replace(options, steps=1, grid="official", temperature=1.0, churn=0.0)


def sample(model: LangFlow, key: Array, options: SamplerOptions = SamplerOptions(), *,
           num: int | None = None, seq_len: int | None = None, cond: Conditioning | None = None,
           init_noise: Array | None = None, return_logits: bool = False,
           mesh: jax.sharding.Mesh | None = None) -> SampleOutput:
  """Draws a batch of samples; the same key (or init noise) gives the same result.

  The batch size and length come from ``init_noise``, else ``cond``, else
  ``num`` and ``seq_len`` (default: the model's max length).

  With ``mesh`` the loop runs sharded: samples over data x fsdp (replicated
  when their number does not divide), weights by the sharding rules (placed
  there if they are not yet). The tokens are those of one device; the
  result holds global arrays (``parallel.to_host`` gathers them on every
  process).
  """
  k_noise, k_cond, k_loop = jax.random.split(jax.random.fold_in(key, KEY_SALT), 3)
  if init_noise is not None:
    z0 = jnp.asarray(init_noise, jnp.float32)
  else:
    if cond is not None:
      num, seq_len = cond.ids_BxL.shape
    seq_len = seq_len or model.max_length
    if not num or num < 1:
      raise ConfigError(f"number of samples {num} must be positive.", "use e.g. --num 8.")
    z0 = jax.random.normal(k_noise, (num, seq_len, model.hidden_size), jnp.float32)
  if z0.shape[1] > model.max_length:
    raise ConfigError(f"sequence length {z0.shape[1]} is longer than the model's max_length "
                      f"{model.max_length}.", "sample shorter sequences (--config.sample.seq_len).")
  cond_eps = None
  if cond is not None:
    if cond.ids_BxL.shape != z0.shape[:2]:
      raise ConfigError(f"conditioning of shape {cond.ids_BxL.shape} does not match the batch {z0.shape[:2]}.",
                        "build the conditioning for the same number and length of samples.")
    cond = Conditioning(jnp.asarray(cond.ids_BxL, jnp.int32), jnp.asarray(cond.fixed_BxL, bool))
    cond_eps = jax.random.normal(k_cond, z0.shape, jnp.float32)
  gammas = jnp.asarray(step_grid(model.schedule, options.steps, options.grid))
  if mesh is None:
    (graphdef, state), layout = nnx.split(model), None
  else:
    graphdef, state, layout = _place(model, mesh, z0.shape[0], cond=cond is not None, logits=return_logits,
                                     trace=options.trace)
    z0, cond, cond_eps = parallel.shard_batch((z0, cond, cond_eps), mesh)
  dtype = options.resolved_update_dtype()
  run = _compiled_loop(graphdef, _static_part(options), dtype, return_logits, layout)
  args = (state, z0, gammas, cond, cond_eps, k_loop, jnp.float32(options.temperature), jnp.float32(options.churn))
  if dtype == "float64":
    with jax.enable_x64(True):
      return run(*args)
  return run(*args)


# --------------------------------------------------------------------------- scores

# A scorer ranks finished samples: (model, output, generated_BxL, key) -> nats
# per generated token, float32 [B]; LOWER IS BETTER. ``generated`` marks the
# positions the sampler chose (not given by a prompt).
Scorer = Callable[[LangFlow, SampleOutput, Array, Array], Array]


def _mean_over(values_BxL: Array, mask_BxL: Array) -> Array:
  mask = mask_BxL.astype(jnp.float32)
  return jnp.sum(values_BxL * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def ce_score(model: LangFlow, out: SampleOutput, generated_BxL: Array, key: Array) -> Array:
  """The final denoiser's cross-entropy of the chosen tokens (free: no extra pass)."""
  del model, key
  return _mean_over(-out.token_logprob_BxL, generated_BxL)


def denoise_score(model: LangFlow, out: SampleOutput, generated_BxL: Array, key: Array,
                  levels: int = 8) -> Array:
  """The training loss of the sample itself: denoiser CE of its tokens, averaged
  over ``levels`` stratified noise levels of the schedule (``levels`` extra passes).

  A Monte-Carlo proxy of the likelihood bound at a fraction of its cost.
  """
  tokens = out.tokens_BxL
  b = tokens.shape[0]
  e = model.embed(tokens)
  u = (jnp.arange(levels, dtype=jnp.float32) + 0.5) / levels
  gammas = model.schedule.icdf(u)
  keys = jax.random.split(key, levels)

  def one(total, xs):
    g, k = xs
    z = diffusion.add_noise(e, jnp.full((b,), g), jax.random.normal(k, e.shape, jnp.float32))
    logits = model(z, jnp.full((b,), g))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return total + _mean_over(ce, generated_BxL), None

  total, _ = jax.lax.scan(one, jnp.zeros((b,), jnp.float32), (gammas, keys))
  return total / levels


def bound_scorer(bound_fn: Callable[[LangFlow, Array, Array, Array], Array]) -> Scorer:
  """A scorer from a likelihood bound ``bound_fn(model, ids_BxL, mask_BxL, key) -> nats [B]``.

  The bound is of the whole sequence (given tokens included), divided by the
  number of generated tokens. The given tokens are the same for every
  candidate of a request, so it ranks them as the bound of the completion
  given the prompt would (-log p(x) = -log p(prompt) - log p(rest | prompt)).
  """
  def score(model, out, generated_BxL, key):
    ids = out.tokens_BxL
    count = jnp.maximum(jnp.sum(generated_BxL.astype(jnp.float32), axis=-1), 1.0)
    return bound_fn(model, ids, jnp.ones_like(ids, bool), key) / count
  return score


# The "bound" score: LangFlow's likelihood bound (likelihood.py) at a cost a
# best-of-n can afford: Euler on the official evaluator's grid, one Hutchinson
# probe and one eps draw per candidate; each step costs the self-conditioning
# pre-pass, the denoiser and its JVP.
BOUND_SCORE = likelihood.BoundOptions(solver="euler", steps=16, mode="flow")  # a ranking: the cheaper mode


def _bound_nats(model: LangFlow, ids_BxL: Array, mask_BxL: Array, key: Array) -> Array:
  return likelihood.nll_bound(model, ids_BxL, mask_BxL, key, BOUND_SCORE)[0].total_B


SCORERS: dict[str, Scorer] = {"ce": ce_score, "denoise": denoise_score, "bound": bound_scorer(_bound_nats)}


def get_scorer(name: str) -> Scorer:
  if name in SCORERS:
    return SCORERS[name]
  raise ConfigError(f"unknown sample score '{name}'.", f"use one of {sorted(SCORERS)}.")


@functools.lru_cache(maxsize=16)
def _compiled_score(graphdef, name: str, layout: _Layout | None = None):
  scorer = get_scorer(name)

  def run(state, out, generated, key):
    return scorer(nnx.merge(graphdef, state), out, generated, key)
  if layout is None:
    return jax.jit(run)
  r, rep = layout.rows_sharding, parallel.replicated(layout.mesh)
  return parallel.mesh_jit(run, layout.mesh, in_shardings=(layout.state.thaw(), layout.output(), r(2), rep),
                           out_shardings=r(1))


def score_samples(model: LangFlow, out: SampleOutput, name: str = "denoise", *, cond: Conditioning | None = None,
                  key: Array | None = None, mesh: jax.sharding.Mesh | None = None) -> Array:
  """Nats per generated token of each sample under the scorer ``name`` (lower is better).

  With ``mesh`` the scorer runs sharded like :func:`sample`.
  """
  generated = np.ones(out.tokens_BxL.shape, bool) if cond is None else ~np.asarray(cond.fixed_BxL, bool)
  key = jax.random.fold_in(key if key is not None else jax.random.PRNGKey(0), KEY_SALT + 1)
  if mesh is None:
    graphdef, state = nnx.split(model)
    return _compiled_score(graphdef, name)(state, out, jnp.asarray(generated), key)
  graphdef, state, layout = _place(model, mesh, generated.shape[0], logits=out.logits_BxLxV is not None,
                                   trace=out.trace_NxBxL is not None)
  out = jax.tree.map(parallel.put_global, out, layout.output())
  return _compiled_score(graphdef, name, layout)(state, out, parallel.shard_batch(generated, mesh), key)


@flax.struct.dataclass
class BestOfN:
  tokens_RxL: Array       # the best candidate of each request
  score_R: Array          # its score (nats per generated token)
  scores_RxN: Array       # every candidate's score
  best_R: Array           # index of the chosen candidate
  candidates: SampleOutput  # all R*N candidates (request-major)


def best_of_n(model: LangFlow, key: Array, n: int, options: SamplerOptions = SamplerOptions(), *,
              num: int | None = None, seq_len: int | None = None, cond: Conditioning | None = None,
              score: str = "denoise", mesh: jax.sharding.Mesh | None = None) -> BestOfN:
  """n candidates per request in one batch; each request gets its lowest-score candidate.

  With ``mesh``, sampling and scoring run sharded (see :func:`sample`).
  """
  if n < 1:
    raise ConfigError(f"best-of n={n} must be at least 1.", "use e.g. --best-of 4.")
  k_sample, k_score = jax.random.split(key)
  tiled = cond.tile(n) if cond is not None else None
  requests = cond.ids_BxL.shape[0] if cond is not None else num
  out = sample(model, k_sample, options, num=None if cond is not None else requests * n, seq_len=seq_len,
               cond=tiled, mesh=mesh)
  scores = score_samples(model, out, score, cond=tiled, key=k_score, mesh=mesh).reshape(requests, n)
  best = jnp.argmin(scores, axis=1)
  tokens = out.tokens_BxL.reshape(requests, n, -1)[jnp.arange(requests), best]
  return BestOfN(tokens_RxL=tokens, score_R=scores[jnp.arange(requests), best], scores_RxN=scores,
                 best_R=best, candidates=out)


# --------------------------------------------------------------------------- prompts and infill


def positions_conditioning(seq_len: int, given: dict[int, int] | Sequence[int | None],
                           num: int = 1) -> Conditioning:
  """Fixed tokens at explicit positions: {position: id} or a list with None for free slots."""
  items = given.items() if isinstance(given, dict) else ((i, t) for i, t in enumerate(given) if t is not None)
  ids = np.zeros((seq_len,), np.int32)
  fixed = np.zeros((seq_len,), bool)
  for pos, tok in items:
    if not 0 <= pos < seq_len:
      raise UserError(f"fixed token position {pos} is outside the sequence of length {seq_len}.",
                      f"use positions 0..{seq_len - 1}.")
    ids[pos], fixed[pos] = tok, True
  if fixed.all():
    raise UserError("every position is given; there is nothing to sample.",
                    "leave some positions free or use a longer --config.sample.seq_len.")
  return Conditioning(jnp.asarray(np.tile(ids, (num, 1))), jnp.asarray(np.tile(fixed, (num, 1))))


def prompt_conditioning(tokenizer, prompt: str, seq_len: int, num: int = 1) -> Conditioning:
  """A prefix prompt after the separator token, as a document start in training data.

  Its length counts the separator (``config.check_prompt`` has the rules).
  """
  ids = [tokenizer.bos_id, *tokenizer.encode(prompt)] if prompt and prompt.strip() else []
  config_lib.check_prompt(prompt, len(ids), seq_len)
  return positions_conditioning(seq_len, list(ids), num)


def infill_conditioning(tokenizer, template: str, seq_len: int, num: int = 1, gap_tokens: int = 8) -> Conditioning:
  """Text with gaps: ``___`` is ``gap_tokens`` free tokens, ``___5`` is five.

  Positions after the template's end are free too (the model continues).
  Whitespace before a gap is dropped, since the filled words bring their own.
  """
  pieces = GAP.split(template)  # text, gap length, text, gap length, ..., text
  if len(pieces) < 3:
    raise UserError(f"the infill template {template!r} has no gap.",
                    "mark each gap with ___ (or ___N for N tokens), e.g. \"The ___ of the ___ .\"")
  slots: list[int | None] = [tokenizer.bos_id]
  for j, piece in enumerate(pieces):
    if j % 2:  # a gap
      length = int(piece) if piece else gap_tokens
      if length < 1:
        raise UserError(f"an infill gap of {length} tokens is empty.", "use ___ or ___N with N >= 1.")
      slots += [None] * length
    else:
      text = piece.rstrip() if j + 1 < len(pieces) else piece
      slots += tokenizer.encode(text) if text else []
  if len(slots) > seq_len:
    raise UserError(f"the infill template needs {len(slots)} positions; samples have {seq_len}.",
                    "shorten the template or its gaps, or raise --config.sample.seq_len.")
  return positions_conditioning(seq_len, slots, num)
