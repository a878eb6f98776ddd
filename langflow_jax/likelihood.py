"""LangFlow's ODE bound on the negative log-likelihood of a sequence (method §5).

For token ids x (L positions, width D) the bound, in nats per sequence, is

    reconst = -sum_i log p_theta(z_a, a)[i, x_i]            z_a = alpha_a E[x] + sigma_a eps
    flow    = int_a^b (alpha/2) div_z x_hat(z, gamma) dgamma  along the probability-flow ODE
    prior   = ||z_b||^2 / (2 sigma_b^2) - (#valid tokens) D/2

with a = gamma_min (clean end) and b ~ gamma_max (noisy end): one function each,
:func:`reconstruction_term`, :func:`flow_term` and :func:`prior_term`, which
:func:`nll_bound` adds up. Its expectation
over eps bounds -log p(x); for the Bayes-optimal denoiser it is exact up to
the prior mismatch at b and the integration error.

As in the official evaluator, the ODE runs in the rescaled state y = z/sigma
over s = exp(-gamma/2) (square-root SNR), where it reads dy/ds = x_hat(sigma y,
gamma(s)) with gamma recomputed from s. The state also carries the
log-density change A with dA/ds = sigma div; since ds = -(s/2) dgamma and
sigma s = alpha, flow = -A(s_b). Everything here is float32.

Divergence estimators (one forward-mode ``jax.jvp`` per probe, so memory stays
that of a forward pass): Hutchinson u^T J u with Gaussian or Rademacher probes,
averaged over ``probes`` probes, or the exact trace (L*D JVPs; small models).
u^T J u is the same number whether J u comes from a JVP (here) or u^T J from a
VJP (the official code). The self-conditioning input is recomputed at the same
(z, gamma) from a zero-input pass and held constant, so the divergence ignores
its dependence on z (method §9.5).

Solvers: explicit Runge-Kutta (Euler, Heun = torchdiffeq ``heun2``, RK4 = the
3/8 rule of torchdiffeq ``rk4``) on a fixed grid under ``lax.scan``, or
diffrax's Tsit5 with PID step-size control (``adaptive``), which runs under
``jax.jit`` with the NNX model merged inside. Grids: ``official`` (the
schedule's quantiles clamp(linspace(0, 1, n+1), 1e-5, 1-1e-5), uniform in its
CDF, i.e. information-uniform; the official evaluator's grid) or ``gamma``
(uniform in gamma between the schedule's endpoints).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from langflow_jax import config as config_lib
from langflow_jax import diffusion, oracles, parallel, reporting
from langflow_jax.data import pipeline
from langflow_jax.data.prepare import PackedSplit
from langflow_jax.errors import ConfigError
from langflow_jax.model import LangFlow
from langflow_jax.objective import elbo_integrand, token_cross_entropy
from langflow_jax.schedule import likelihood_u_grid

Array = jax.Array

SOLVERS = config_lib.EVAL_SOLVERS
GRIDS = config_lib.EVAL_GRIDS
ESTIMATORS = config_lib.EVAL_ESTIMATORS
TERMS = ("reconst", "flow", "prior")  # the bound's three terms, in nats; they sum to it
# Above this many coordinates per sequence the exact trace (one JVP each, at
# every vector-field evaluation) is refused: use a Hutchinson estimator.
MAX_EXACT_DIM = 16384


@dataclasses.dataclass(frozen=True)
class Tableau:
  """An explicit Runge-Kutta method: stage abscissae c, stage weights a, weights b."""

  c: tuple[float, ...]
  a: tuple[tuple[float, ...], ...]  # a[i]: weights of k_0..k_{i-1} for stage i
  b: tuple[float, ...]

  @property
  def stages(self) -> int:
    return len(self.c)


TABLEAUS = {
    "euler": Tableau(c=(0.0,), a=((),), b=(1.0,)),
    # Explicit trapezoid, torchdiffeq's heun2: K2 at (s_k + ds, y + ds K1).
    "heun": Tableau(c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5)),
    # The 3/8 rule, torchdiffeq's rk4 ("rk4_alt").
    "rk4": Tableau(c=(0.0, 1 / 3, 2 / 3, 1.0), a=((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
                   b=(1 / 8, 3 / 8, 3 / 8, 1 / 8)),
}


@dataclasses.dataclass(frozen=True)
class BoundOptions:
  """How the bound is computed; every field changes the number (see docs/likelihood.md)."""

  solver: str = "heun"
  steps: int = 128                 # fixed-grid steps (the adaptive solver ignores it)
  grid: str = "official"
  estimator: str = "hutchinson_gaussian"
  probes: int = 1                  # Hutchinson probes per vector-field evaluation
  self_cond: bool = True           # the official evaluator's self-conditioning pre-pass
  mode: str = "sc_chain_rule"      # sc_chain_rule (default: a valid bound) | flow (official default) | sde
  mc_samples: int = 128            # sde: noise levels per sequence
  rtol: float = 1e-3               # adaptive solver tolerances
  atol: float = 1e-3
  max_steps: int = 4096            # adaptive solver step cap

  def __post_init__(self):
    config_lib.check_bound_settings(self)  # the same rules as --config.eval.*

  @classmethod
  def from_config(cls, eval_cfg: ml_collections.ConfigDict) -> "BoundOptions":
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{k: eval_cfg[k] for k in names if k in eval_cfg})

  @property
  def evals_per_step(self) -> int:
    return TABLEAUS[self.solver].stages if self.solver in TABLEAUS else 0


@flax.struct.dataclass
class BoundTerms:
  """Per-sequence terms of the bound, in nats; padding rows give zeros."""

  reconst_B: Array
  flow_B: Array
  prior_B: Array
  num_tokens_B: Array  # valid tokens (float32)
  # ||eps||^2 / 2 - (#valid tokens) D / 2 over valid positions: the sampled
  # entropy of q(z_a | x) minus the mean the official estimate uses. Zero mean.
  entropy_dev_B: Array | None = None

  @property
  def total_B(self) -> Array:
    """The official estimate: reconst + flow + prior."""
    return self.reconst_B + self.flow_B + self.prior_B

  @property
  def total_vr_B(self) -> Array:
    """The variance-reduced estimate: the sampled entropy of q(z_a | x) in place
    of its mean. Same expectation as ``total_B``; the prior's fluctuation with
    eps largely cancels (see docs/likelihood.md)."""
    return self.total_B - self.entropy_dev_B


@flax.struct.dataclass
class SolveInfo:
  """What the integrator did. The per-evaluation arrays are empty for ``adaptive``."""

  gamma_C: Array     # gamma at each vector-field evaluation, in call order
  div_CxB: Array     # the divergence estimate (u^T J u, or the trace) at each evaluation
  num_evals: Array   # vector-field evaluations
  num_steps: Array   # accepted steps
  ok: Array          # False when the adaptive solver hit max_steps


# --------------------------------------------------------------------------- divergence


def draw_probes(key: Array, estimator: str, shape: tuple[int, ...]) -> Array:
  """Hutchinson probes with E[u u^T] = I."""
  if estimator == "hutchinson_rademacher":
    return jax.random.rademacher(key, shape, jnp.float32)
  return jax.random.normal(key, shape, jnp.float32)


def hutchinson_divergence(f: Callable[[Array], Array], z_BxLxD: Array,
                          probes_PxBxLxD: Array) -> tuple[Array, Array]:
  """f(z) and the mean over probes of u^T (df/dz) u, one JVP per probe."""
  jvp = lambda u: jax.jvp(f, (z_BxLxD,), (u,))
  out, ju = jax.vmap(jvp, out_axes=(None, 0))(probes_PxBxLxD)
  div_PxB = jnp.sum(probes_PxBxLxD * ju, axis=(2, 3))
  return out, jnp.mean(div_PxB, axis=0)


def exact_divergence(f: Callable[[Array], Array], z_BxLxD: Array,
                     chunk: int = 64) -> tuple[Array, Array]:
  """f(z) and the exact trace of df/dz per sequence: one JVP per coordinate."""
  b, l, d = z_BxLxD.shape
  n = l * d
  out, lin = jax.linearize(f, z_BxLxD)

  def diagonal_entry(i):
    e = jnp.zeros((n,), jnp.float32).at[i].set(1.0).reshape(l, d)
    return lin(jnp.broadcast_to(e, z_BxLxD.shape)).reshape(b, n)[:, i]

  diag_NxB = jax.lax.map(diagonal_entry, jnp.arange(n), batch_size=min(n, chunk))
  return out, jnp.sum(diag_NxB, axis=0)


def denoiser_and_divergence(model: LangFlow, z_BxLxD: Array, gamma_B: Array, mask_BxL: Array,
                            probes_PxBxLxD: Array | None, opts: BoundOptions) -> tuple[Array, Array]:
  """x_hat(z, gamma) (zero at padding) and its divergence estimate per sequence."""
  m = mask_BxL.astype(jnp.float32)[:, :, None]
  use_sc = opts.self_cond and model.self_conditioning
  if use_sc and opts.mode == "sc_chain_rule":
    # The pre-pass is part of the field: the divergence runs through both passes.
    f = lambda z: model.denoise(model(z, gamma_B, model.denoise(model(z, gamma_B, None)))) * m
  else:
    x_sc = None
    if use_sc:
      # Recomputed at this (z, gamma) and held constant: excluded from the divergence.
      x_sc = jax.lax.stop_gradient(model.denoise(model(z_BxLxD, gamma_B, None)))
    f = lambda z: model.denoise(model(z, gamma_B, x_sc)) * m
  if opts.estimator == "exact":
    return exact_divergence(f, z_BxLxD)
  return hutchinson_divergence(f, z_BxLxD, probes_PxBxLxD * m[None])


# --------------------------------------------------------------------------- grids


def gamma_grid(model: LangFlow, opts: BoundOptions) -> Array:
  """gamma_0 < ... < gamma_n, the fixed grid (or the adaptive solver's interval ends)."""
  n = opts.steps
  if opts.grid == "official":
    return model.schedule.icdf(likelihood_u_grid(n)).astype(jnp.float32)
  lo, hi = model.schedule.endpoints()
  u = jnp.asarray(np.linspace(0.0, 1.0, n + 1, dtype=np.float32))
  return (lo + (hi - lo) * u).astype(jnp.float32)


def s_grid(model: LangFlow, opts: BoundOptions) -> Array:
  """The grid in s = exp(-gamma/2), decreasing (clean to noisy)."""
  return jnp.exp(-0.5 * gamma_grid(model, opts))


# --------------------------------------------------------------------------- the bound


def _integrate_fixed(field, state0, s_N: Array, tableau: Tableau, probes_source: dict):
  """Explicit RK on the grid ``s_N``; returns (state_n, gamma_C, div_CxB).

  One ``lax.scan`` iteration per vector-field evaluation (steps x stages), so
  the compiled body holds a single evaluation whatever the method. The carry
  is the state and the stage derivatives of the current step. Stage i sits at
  s_k + c_i ds with ds = s_{k+1} - s_k in float32 and takes y_k + ds sum_j
  a_ij k_j; the step ends with y_k + ds sum_j b_j k_j. This is torchdiffeq's
  arithmetic on its negated time axis, to the last bit for Euler and Heun.
  ``probes_source`` holds per-evaluation ``probes`` or ``keys`` (or nothing).
  """
  n, stages = s_N.shape[0] - 1, tableau.stages
  a_SxS = np.zeros((stages, stages), np.float32)
  for i, row in enumerate(tableau.a):
    a_SxS[i, : len(row)] = row
  step_of = np.repeat(np.arange(n), stages)
  xs = {
      "s0": s_N[:-1][step_of],
      "ds": (s_N[1:] - s_N[:-1])[step_of],
      "c": jnp.asarray(np.tile(np.asarray(tableau.c, np.float32), n)),
      "a": jnp.asarray(np.tile(a_SxS, (n, 1))),
      "stage": jnp.asarray(np.tile(np.arange(stages), n)),
      **probes_source,
  }

  def weighted(weights, ks):
    total = None
    for j, w in enumerate(weights):
      term = jax.tree.map(lambda k: w * k[j], ks)
      total = term if total is None else jax.tree.map(jnp.add, total, term)
    return total

  def axpy(a, x, y):
    return jax.tree.map(lambda xi, yi: yi + a * xi, x, y)

  def call(carry, x):
    state, ks = carry
    s_i = x["s0"] + x["c"] * x["ds"]
    y_i = axpy(x["ds"], weighted([x["a"][j] for j in range(stages)], ks), state)
    # A zero-length step (a grid padded to a common length) costs no evaluation.
    skip = lambda: (jax.tree.map(jnp.zeros_like, state), -2.0 * jnp.log(s_i), jnp.zeros_like(state[0]))
    k, gamma, div = jax.lax.cond(x["ds"] == 0, skip, lambda: field(s_i, y_i, x))
    ks = jax.tree.map(lambda buf, v: buf.at[x["stage"]].set(v), ks, k)
    stepped = axpy(x["ds"], weighted([w for w in tableau.b], ks), state)
    last = x["stage"] == stages - 1
    state = jax.tree.map(lambda new, old: jnp.where(last, new, old), stepped, state)
    return (state, ks), (gamma, div)

  ks0 = jax.tree.map(lambda v: jnp.zeros((stages,) + v.shape, v.dtype), state0)
  (state, _), (gamma_C, div_CxB) = jax.lax.scan(call, (state0, ks0), xs)
  return state, gamma_C, div_CxB


def _probe_source(opts: BoundOptions, shape_BxLxD: tuple[int, ...], calls: int, key: Array,
                  injected: Array | None) -> dict:
  """Per-evaluation probes, injected (consumed in call order) or keys to draw them."""
  if opts.estimator == "exact":
    return {}
  if injected is None:
    return {"keys": jax.random.split(key, calls)}
  probes = jnp.asarray(injected, jnp.float32)
  if probes.ndim == 4:
    probes = probes[:, None]  # one probe per evaluation
  if probes.shape[0] < calls or probes.shape[2:] != tuple(shape_BxLxD):
    raise ConfigError(
        f"injected probes have shape {probes.shape}; {calls} evaluations of {tuple(shape_BxLxD)} "
        f"need [{calls}, (P,) {', '.join(map(str, shape_BxLxD))}].",
        "pass one probe per vector-field evaluation.")
  return {"probes": probes[:calls]}


def _call_probes(x: dict, opts: BoundOptions, shape_BxLxD: tuple[int, ...]) -> Array | None:
  if "probes" in x:
    return x["probes"]
  if "keys" in x:
    probes = draw_probes(x["keys"], opts.estimator, (opts.probes,) + tuple(shape_BxLxD))
    return parallel.constrain(probes, (None, "batch", "length", None))  # drawn where the rows live
  return x.get("fixed")


def _max_rms_norm(tree) -> Array:
  """Error norm for step-size control: the worst RMS over the state's parts, so the
  log-density accumulator (B numbers) is not drowned by the B*L*D of y."""
  return jnp.max(jnp.stack([jnp.sqrt(jnp.mean(jnp.square(x))) for x in jax.tree.leaves(tree)]))


def _integrate_adaptive(field, state0, s_start: Array, s_end: Array, probes, opts: BoundOptions):
  import diffrax  # optional dependency (the ``ode`` extra)

  term = diffrax.ODETerm(lambda s, state, args: field(s, state, {"fixed": probes})[0])
  controller = diffrax.PIDController(rtol=opts.rtol, atol=opts.atol, norm=_max_rms_norm)
  sol = diffrax.diffeqsolve(term, diffrax.Tsit5(), s_start, s_end, None, state0,
                            stepsize_controller=controller, max_steps=opts.max_steps, throw=False,
                            saveat=diffrax.SaveAt(t1=True))
  state = jax.tree.map(lambda x: x[-1], sol.ys)
  ok = sol.result == diffrax.RESULTS.successful
  return state, sol.stats["num_steps"], sol.stats["num_accepted_steps"], ok


def nll_bound(model: LangFlow, ids_BxL: Array, mask_BxL: Array | None, key: Array,
              opts: BoundOptions, *, eps_BxLxD: Array | None = None, probes: Array | None = None,
              s_N: Array | None = None) -> tuple[BoundTerms, SolveInfo]:
  """The bound's terms for a batch of sequences (trace under ``jax.jit``).

  ``key`` draws eps (one per sequence) and the probes; ``eps_BxLxD`` and
  ``probes`` replace them for parity tests: [calls, (P,) B, L, D], one set per
  vector-field evaluation in call order, for the fixed-grid solvers; [(P,) B,
  L, D] for the adaptive one, which keeps one probe set for the whole solve
  (a smooth field its step-size control can trust). ``s_N`` replaces the
  fixed grid (the adaptive solver uses its two ends).
  """
  if opts.mode == "sde":
    return sde_bound(model, ids_BxL, mask_BxL, key, opts, noise=eps_BxLxD, u=probes)
  ids_BxL = jnp.asarray(ids_BxL)
  b, l = ids_BxL.shape
  d = model.hidden_size
  mask_BxL = jnp.ones((b, l), bool) if mask_BxL is None else jnp.asarray(mask_BxL)
  m_BxL = mask_BxL.astype(jnp.float32)
  if opts.estimator == "exact" and l * d > MAX_EXACT_DIM:
    raise ConfigError(f"eval.estimator=exact needs {l * d} JVPs per evaluation (L*D); at most "
                      f"{MAX_EXACT_DIM} are allowed.", "use eval.estimator=hutchinson_gaussian.")
  k_eps, k_probe = jax.random.split(key)

  # z_0 at gamma_min exactly (the grid may start a hair later, as upstream).
  gamma_min, _ = model.schedule.endpoints()
  gamma0_B = jnp.full((b,), gamma_min, jnp.float32)
  _, sigma0 = diffusion.alpha_sigma(gamma_min)
  e_BxLxD = model.embed(ids_BxL)
  eps = (jax.random.normal(k_eps, e_BxLxD.shape, jnp.float32) if eps_BxLxD is None
         else jnp.asarray(eps_BxLxD, jnp.float32))
  eps = parallel.constrain(eps, ("batch", "length", None))
  z0 = diffusion.add_noise(e_BxLxD, gamma0_B, eps)

  reconst_B = reconstruction_term(model, z0, gamma0_B, ids_BxL, m_BxL, opts.self_cond)
  s_N = s_grid(model, opts) if s_N is None else jnp.asarray(s_N, jnp.float32)
  flow_B, y_BxLxD, info = flow_term(model, z0 / sigma0, mask_BxL, k_probe, opts, s_N, probes=probes)
  prior_B = prior_term(y_BxLxD, m_BxL)
  tokens_B = jnp.sum(m_BxL, axis=-1)
  entropy_dev_B = prior_term(eps, m_BxL)  # the same Gaussian form, of the drawn eps
  return BoundTerms(reconst_B, flow_B, prior_B, tokens_B, entropy_dev_B), info


def reconstruction_term(model: LangFlow, z0_BxLxD: Array, gamma0_B: Array, ids_BxL: Array, m_BxL: Array,
                        self_cond: bool) -> Array:
  """-sum_i log p(x_i | z_a, gamma_min) per sequence, with the self-conditioning pre-pass."""
  x_sc = None
  if self_cond and model.self_conditioning:
    x_sc = jax.lax.stop_gradient(model.denoise(model(z0_BxLxD, gamma0_B, None)))
  return jnp.sum(token_cross_entropy(model(z0_BxLxD, gamma0_B, x_sc), ids_BxL) * m_BxL, axis=-1)


def flow_term(model: LangFlow, y0_BxLxD: Array, mask_BxL: Array, key: Array, opts: BoundOptions, s_N: Array, *,
              probes: Array | None = None) -> tuple[Array, Array, SolveInfo]:
  """int_a^b (alpha/2) div_z x_hat dgamma per sequence: the probability-flow ODE from y = z_a / sigma_a.

  The ODE runs in y = z / sigma over the grid ``s_N`` of s = exp(-gamma/2) (the
  adaptive solver uses its two ends), carrying the log-density change A with
  dA/ds = sigma div; the flow term is -A at the noisy end. ``key`` draws the
  probes unless ``probes`` gives them (see :func:`nll_bound`). Returns the flow
  term, y at the noisy end (the prior's argument) and what the solver did.
  """
  b, l, d = y0_BxLxD.shape

  def field(s, state, x):
    gamma = -2.0 * jnp.log(s)
    _, sigma = diffusion.alpha_sigma(gamma)
    gamma_B = jnp.full((b,), gamma, jnp.float32)
    probe = _call_probes(x, opts, (b, l, d))
    x_hat, div_B = denoiser_and_divergence(model, sigma * state[1], gamma_B, mask_BxL, probe, opts)
    return (sigma * div_B, x_hat), gamma, div_B

  state0 = (jnp.zeros((b,), jnp.float32), y0_BxLxD)
  if opts.solver == "adaptive":
    shape = (opts.probes, b, l, d)
    if opts.estimator == "exact":
      fixed = None
    elif probes is not None:
      fixed = jnp.asarray(probes, jnp.float32).reshape(shape)
    else:
      fixed = draw_probes(key, opts.estimator, shape)
    state, attempted, accepted, ok = _integrate_adaptive(field, state0, s_N[0], s_N[-1], fixed, opts)
    # Tsit5 is first-same-as-last: 6 new evaluations per attempted step, plus
    # one at the start and two for the automatic initial step size.
    info = SolveInfo(gamma_C=jnp.zeros((0,)), div_CxB=jnp.zeros((0, b)),
                     num_evals=6 * attempted + 3, num_steps=accepted, ok=ok)
  else:
    tableau = TABLEAUS[opts.solver]
    n = s_N.shape[0] - 1
    source = _probe_source(opts, (b, l, d), n * tableau.stages, key, probes)
    state, gamma_C, div_CxB = _integrate_fixed(field, state0, s_N, tableau, source)
    steps = jnp.sum(s_N[1:] != s_N[:-1])  # zero-length padding steps do not count
    info = SolveInfo(gamma_C=gamma_C, div_CxB=div_CxB, num_evals=steps * tableau.stages,
                     num_steps=steps, ok=jnp.asarray(True))
  a_B, y_BxLxD = state
  return -a_B, y_BxLxD, info


def prior_term(y_BxLxD: Array, m_BxL: Array) -> Array:
  """The Gaussian prior at the noisy end per sequence: ||y_b||^2 / 2 - (#valid tokens) D / 2, where
  y_b = z_b / sigma_b, over the valid positions."""
  d = y_BxLxD.shape[-1]
  tokens_B = jnp.sum(m_BxL, axis=-1)
  return 0.5 * jnp.sum(jnp.square(y_BxLxD) * m_BxL[:, :, None], axis=(1, 2)) - tokens_B * (d / 2)


def sde_bound(model: LangFlow, ids_BxL: Array, mask_BxL: Array | None, key: Array, opts: BoundOptions, *,
              noise: Array | None = None, u: Array | None = None) -> tuple[BoundTerms, SolveInfo]:
  """The Monte-Carlo ELBO of the official ``eval.mode=sde`` (method §11), per sequence.

  reconst: CE at gamma_min from z_0 = alpha_min E[x] + sigma_min n_0; flow (the
  integral term): the mean over M noise levels gamma_k = icdf(u_k) of
  sum_i 0.5 exp(-gamma_k - log pi(gamma_k)) ||x_hat_i - E[x_i]||^2; prior:
  sum_i 0.5 exp(-gamma_max) ||E[x_i]||^2. ``noise`` [M+1, B, L, D] and ``u``
  [M, B] replace the draws (parity tests). The draws are scanned, one network
  evaluation (two with self-conditioning) each, so memory stays one pass's.
  """
  ids_BxL = jnp.asarray(ids_BxL)
  b, l = ids_BxL.shape
  d, num = model.hidden_size, opts.mc_samples
  mask_BxL = jnp.ones((b, l), bool) if mask_BxL is None else jnp.asarray(mask_BxL)
  m_BxL = mask_BxL.astype(jnp.float32)
  k_noise, k_u = jax.random.split(key)
  if noise is None:
    noise = jax.random.normal(k_noise, (num + 1, b, l, d), jnp.float32)
  if u is None:
    u = jax.random.uniform(k_u, (num, b), jnp.float32)
  noise, u = jnp.asarray(noise, jnp.float32)[: num + 1], jnp.asarray(u, jnp.float32)[:num]
  gamma_min, gamma_max = model.schedule.endpoints()
  e_BxLxD = model.embed(ids_BxL)
  gamma0_B = jnp.full((b,), gamma_min, jnp.float32)
  reconst_B = reconstruction_term(model, diffusion.add_noise(e_BxLxD, gamma0_B, noise[0]), gamma0_B, ids_BxL,
                                  m_BxL, opts.self_cond)
  use_sc = opts.self_cond and model.self_conditioning

  def draw(total_B, xs):
    n_BxLxD, u_B = xs
    gamma_B = model.schedule.icdf(u_B)
    z = diffusion.add_noise(e_BxLxD, gamma_B, n_BxLxD)
    x_sc = model.denoise(model(z, gamma_B, None)) if use_sc else None
    return total_B + elbo_integrand(model, model(z, gamma_B, x_sc), e_BxLxD, gamma_B, m_BxL), gamma_B

  int_B, gamma_MxB = jax.lax.scan(draw, jnp.zeros((b,), jnp.float32), (noise[1:], u))
  flow_B = int_B / num
  prior_B = 0.5 * jnp.exp(-gamma_max) * jnp.sum(jnp.sum(jnp.square(e_BxLxD), -1) * m_BxL, axis=-1)
  tokens_B = jnp.sum(m_BxL, axis=-1)
  # No sampled entropy of q(z_a | x) enters this estimate: nothing to subtract.
  terms = BoundTerms(reconst_B, flow_B, prior_B, tokens_B, jnp.zeros_like(tokens_B))
  info = SolveInfo(gamma_C=jnp.mean(gamma_MxB, axis=1), div_CxB=jnp.zeros((num, b)), num_evals=jnp.asarray(num),
                   num_steps=jnp.asarray(num), ok=jnp.asarray(True))
  return terms, info


def _bound(graphdef, opts, state, ids, mask, key, eps, probes, s_N):
  model = nnx.merge(graphdef, state)
  return nll_bound(model, ids, mask, key, opts, eps_BxLxD=eps, probes=probes, s_N=s_N)


_bound_jit = jax.jit(_bound, static_argnums=(0, 1))


@functools.lru_cache(maxsize=16)
def _sharded_bound_jit(graphdef, opts: BoundOptions, mesh, state_shardings: parallel.Frozen, rows: int,
                       eps_ndim: int | None, probes_ndim: int | None, grid: bool):
  """The bound jitted on ``mesh``: rows over data x fsdp, weights by the rules."""
  rows_sh = lambda ndim, dim=0: parallel.rows_sharding(mesh, ndim, rows, dim)
  rep = parallel.replicated(mesh)
  in_shardings = (state_shardings.thaw(), rows_sh(2), rows_sh(2), rep,
                  None if eps_ndim is None else rows_sh(eps_ndim),
                  None if probes_ndim is None else rows_sh(probes_ndim, probes_ndim - 3),
                  rep if grid else None)
  out_shardings = (BoundTerms(rows_sh(1), rows_sh(1), rows_sh(1), rows_sh(1), rows_sh(1)),
                   SolveInfo(gamma_C=rep, div_CxB=rows_sh(2, 1), num_evals=rep, num_steps=rep, ok=rep))
  fn = lambda *args: _bound(graphdef, opts, *args)
  return parallel.mesh_jit(fn, mesh, in_shardings=in_shardings, out_shardings=out_shardings)


def make_bound_fn(model: LangFlow, opts: BoundOptions,
                  mesh: jax.sharding.Mesh | None = None) -> Callable[..., tuple[BoundTerms, SolveInfo]]:
  """A jitted ``fn(ids, mask, key, eps=None, probes=None, s_N=None)`` for ``model``.

  The weights are an argument of the compiled function, not constants baked
  into it, and the compilation is cached by (model structure, options,
  shapes): every batch of the same shape, and every model of the same
  structure, reuses it. Grids passed as ``s_N`` are traced, so grids of
  different step counts padded to one length (repeating the last point: a
  zero-length step changes nothing), or of another ``grid`` kind, share one
  compilation.

  With ``mesh`` the bound runs sharded with explicit shardings: rows over
  data x fsdp (replicated when the batch does not divide), the weights by
  the sharding rules (placed there if they are not). Inputs are global
  arrays or host arrays that are the same on every process; outputs are
  global arrays (:func:`parallel.to_host` gathers them). The random draws
  are those of one device, so the number does not depend on the mesh.
  """
  graphdef, state = nnx.split(model)
  # A given grid makes the grid choice and step count irrelevant to the
  # program: one compilation serves every fixed grid of the same length.
  gridless = opts if opts.solver == "adaptive" else dataclasses.replace(opts, grid=GRIDS[0], steps=1)
  if mesh is None:
    return lambda ids, mask, key, eps=None, probes=None, s_N=None: _bound_jit(
        graphdef, opts if s_N is None else gridless, state, ids, mask, key, eps, probes, s_N)
  state_shardings = parallel.tree_shardings(state, mesh)
  state = jax.device_put(state, state_shardings)  # a no-op for weights already placed
  frozen = parallel.Frozen.of(state_shardings)

  def fn(ids, mask, key, eps=None, probes=None, s_N=None):
    b, l = np.shape(ids)
    mask = np.ones((b, l), bool) if mask is None else mask
    as_f32 = lambda x: x if x is None or isinstance(x, jax.Array) else np.asarray(x, np.float32)
    eps, probes = as_f32(eps), as_f32(probes)
    if probes is not None:
      probes = parallel.put_global(probes, parallel.rows_sharding(mesh, np.ndim(probes), b, np.ndim(probes) - 3))
    jitted = _sharded_bound_jit(graphdef, opts if s_N is None else gridless, mesh, frozen, b,
                                None if eps is None else np.ndim(eps), None if probes is None else np.ndim(probes),
                                s_N is not None)
    ids, mask, eps = parallel.shard_batch((ids, mask, eps), mesh)
    return jitted(state, ids, mask, key, eps, probes, None if s_N is None else np.asarray(s_N, np.float32))

  return fn


def padded_s_grids(model: LangFlow, opts: BoundOptions, steps: Sequence[int]) -> np.ndarray:
  """Fixed grids for several step counts, each padded to the longest with its last point."""
  n_max = max(steps)
  rows = []
  for n in steps:
    s = np.asarray(s_grid(model, dataclasses.replace(opts, steps=int(n))))
    rows.append(np.concatenate([s, np.full((n_max - n,), s[-1], np.float32)]))
  return np.stack(rows)


# --------------------------------------------------------------------------- over a dataset split


def ratio_stderr(totals_N: Sequence[float], tokens_N: Sequence[float]) -> float:
  """Standard error of sum(totals) / sum(tokens) over N sequences (delta method); NaN for N < 2."""
  t, n = np.asarray(totals_N, np.float64), np.asarray(tokens_N, np.float64)
  if len(t) < 2:
    return math.nan
  residual = t - n * (t.sum() / n.sum())
  return float(math.sqrt(len(t) / (len(t) - 1) * np.sum(residual**2)) / n.sum())


@dataclasses.dataclass
class BoundTotals:
  """Host-side float64 sums of the bound's terms over batches, and each sequence's total."""

  sums: dict[str, float] = dataclasses.field(default_factory=lambda: {t: 0.0 for t in TERMS})
  tokens: float = 0.0
  sequences: int = 0
  evals: int = 0
  steps: int = 0
  gamma_C: np.ndarray | None = None
  div_sum_C: np.ndarray | None = None
  seq_totals: list[float] = dataclasses.field(default_factory=list)
  seq_totals_vr: list[float] = dataclasses.field(default_factory=list)
  seq_tokens: list[float] = dataclasses.field(default_factory=list)

  def add(self, terms: BoundTerms, info: SolveInfo) -> None:
    terms, info = parallel.to_host((terms, info))  # every process gets every row
    for t in TERMS:
      self.sums[t] += float(np.sum(np.asarray(getattr(terms, f"{t}_B"), np.float64)))
    self.tokens += float(np.sum(terms.num_tokens_B))
    self.sequences += int(np.sum(terms.num_tokens_B > 0))
    valid = np.asarray(terms.num_tokens_B) > 0
    self.seq_totals += np.asarray(terms.total_B, np.float64)[valid].tolist()
    self.seq_totals_vr += np.asarray(terms.total_vr_B, np.float64)[valid].tolist()
    self.seq_tokens += np.asarray(terms.num_tokens_B, np.float64)[valid].tolist()
    self.evals = max(self.evals, int(info.num_evals))
    self.steps = max(self.steps, int(info.num_steps))
    if info.gamma_C.size:
      div = np.sum(np.asarray(info.div_CxB, np.float64), axis=1)
      self.gamma_C = np.asarray(info.gamma_C)
      self.div_sum_C = div if self.div_sum_C is None else self.div_sum_C + div

  def per_token(self) -> dict[str, float]:
    return {t: v / max(self.tokens, 1.0) for t, v in self.sums.items()}

  def variance_reduced(self) -> float:
    """The bound with the sampled entropy of q(z_a | x) (nats/token)."""
    return float(np.sum(self.seq_totals_vr) / max(self.tokens, 1.0))

  def stderr(self, variance_reduced: bool = False) -> float:
    """Standard error of sum(total) / sum(tokens) over sequences (delta method).

    It covers the text, eps and probe draws together; with one eps draw per
    sequence the official estimate of a single sequence scatters by
    ~sqrt(L D / 2) nats, most of which the variance-reduced one cancels.
    """
    return ratio_stderr(self.seq_totals_vr if variance_reduced else self.seq_totals, self.seq_tokens)

  def integrand(self) -> dict[str, list[float]] | None:
    if self.gamma_C is None:
      return None
    values = flow_integrand(self.gamma_C, self.div_sum_C, self.tokens)
    return {"gamma": self.gamma_C.tolist(), "flow_nats_per_token_per_gamma": np.asarray(values).tolist()}


def num_eval_batches(split: PackedSplit, batch_size: int, num_batches: int) -> int:
  """The batches an evaluation of ``split`` runs: ``num_batches``, at most the whole split (0: all)."""
  whole = -(-len(split) // batch_size)
  return whole if num_batches <= 0 else min(num_batches, whole)


def run_bound(model: LangFlow, split: PackedSplit, opts: BoundOptions, *, batch_size: int,
              num_batches: int, seed: int, s_N: np.ndarray | None = None, progress: bool = False,
              mesh: jax.sharding.Mesh | None = None) -> BoundTotals:
  """Sums of the bound's terms over the first ``num_batches`` batches of ``split``.

  Batch i uses key fold_in(PRNGKey(seed), i): the same seed and batching give
  the same number, on any mesh. With ``mesh`` the batches are sharded over
  data x fsdp and each process loads only its rows (as the trainer does).
  """
  fn = make_bound_fn(model, opts, mesh)
  key = jax.random.PRNGKey(seed)
  totals = BoundTotals()
  n = num_eval_batches(split, batch_size, num_batches)
  index, count = (0, 1) if mesh is None else parallel.data_shard(mesh)
  bar = reporting.Progress(n, 0, progress)
  try:
    for i, local in enumerate(pipeline.eval_batches(split, batch_size, n, index, count)):
      batch = local if mesh is None else parallel.global_batch(local, mesh)
      terms, info = fn(batch["ids"], batch["mask"], jax.random.fold_in(key, i), s_N=s_N)
      if not bool(info.ok):
        raise ConfigError(
            f"the adaptive solver reached eval.max_steps={opts.max_steps} before the noisy end.",
            "raise --config.eval.max_steps or loosen --config.eval.rtol/atol.")
      totals.add(terms, info)
      bar.update(1, nats_per_token=f"{sum(totals.per_token().values()):.4f}")
  finally:
    bar.close()
  return totals


def steps_sweep(model: LangFlow, split: PackedSplit, opts: BoundOptions, steps: Sequence[int], *,
                batch_size: int, num_batches: int, seed: int,
                mesh: jax.sharding.Mesh | None = None) -> tuple[list[dict[str, float]], dict | None]:
  """The bound and its terms for several step counts (same data and seed), and
  the flow integrand of the longest run.

  All grids are padded to the longest, so one compilation serves the sweep.
  The adaptive solver is swept as Heun.
  """
  fixed = opts if opts.solver != "adaptive" else dataclasses.replace(opts, solver="heun")
  steps = sorted(steps)
  grids = padded_s_grids(model, fixed, steps)
  rows = []
  for n, s_N in zip(steps, grids):
    totals = run_bound(model, split, fixed, batch_size=batch_size, num_batches=num_batches, seed=seed, s_N=s_N,
                       mesh=mesh)
    per = totals.per_token()
    rows.append({"steps": int(n), "solver": fixed.solver, "total": sum(per.values()), **per})
  return rows, totals.integrand()


def context_free_reference(model: LangFlow, data: PackedSplit, opts: BoundOptions,
                           config: ml_collections.ConfigDict, num_batches: int,
                           mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """The bound of ``oracles.ContextFreeDenoiser`` (the model's embeddings and schedule, the
  training split's unigram prior) on the same rows with the same seed, and its exact value."""
  e = config.eval
  prior = pipeline.unigram_log_prior(pipeline.load_split(config.data, "train"), config.model.vocab_size)
  oracle = oracles.ContextFreeDenoiser(model.embedding_matrix(), model.schedule, prior)
  # No self-conditioning, so flow and sc_chain_rule coincide; sde keeps its own estimate.
  ref_opts = dataclasses.replace(opts, mode="sde" if opts.mode == "sde" else "flow", self_cond=False)
  s_N = None if opts.solver == "adaptive" else np.asarray(s_grid(model, opts))
  totals = run_bound(oracle, data, ref_opts, batch_size=e.batch_size, num_batches=num_batches, seed=e.seed,
                     s_N=s_N, mesh=mesh)
  rows = list(pipeline.eval_batches(data, e.batch_size, num_batches))
  analytic = oracle.analytic_nll(np.concatenate([b["ids"] for b in rows]), np.concatenate([b["mask"] for b in rows]))
  ode = totals.variance_reduced()
  return {"ode": ode, "analytic": analytic, "solver_bias": ode - analytic,
          "stderr": totals.stderr(variance_reduced=True)}


def bound_card(model: LangFlow, opts: BoundOptions, totals: BoundTotals) -> dict[str, str]:
  """The bound's rows of the protocol card: mode, solver, steps, grid, estimator, self-conditioning."""
  grid = np.asarray(gamma_grid(model, opts))
  lo, hi = float(grid[0]), float(grid[-1])
  if opts.solver == "adaptive":
    solver = f"adaptive (diffrax Tsit5, rtol {opts.rtol:g}, atol {opts.atol:g}, max {opts.max_steps} steps)"
    steps = f"{totals.steps} accepted (largest batch), {totals.evals} evaluations"
  else:
    solver = {"heun": "heun (explicit trapezoid, official heun2)", "euler": "euler",
              "rk4": "rk4 (3/8 rule)"}[opts.solver]
    steps = f"{opts.steps} ({totals.evals} evaluations per batch)"
  estimator = opts.estimator if opts.estimator == "exact" else \
      f"{opts.estimator} (forward-mode JVP), {opts.probes} probe(s) per evaluation"
  mode = {"flow": "flow (the official evaluator's default): ODE, divergence past the self-conditioning pre-pass "
                  "(not a bound of the integrated field when self-conditioning is on; reads low)",
          "sc_chain_rule": "sc_chain_rule (default): ODE bound, divergence through the self-conditioning pre-pass",
          "sde": f"sde: Monte-Carlo ELBO, {opts.mc_samples} noise levels per sequence from the schedule"}[opts.mode]
  if opts.mode == "sde":
    solver = steps = estimator = "none (no ODE in sde mode)"
  return {
      "mode": mode,
      "solver": solver,
      "steps": steps,
      "grid": f"{opts.grid} (gamma {lo:.4f} -> {hi:.4f}; z_0 drawn at gamma_min)",
      "estimator": estimator,
      "self_cond": ("off" if not (opts.self_cond and model.self_conditioning) else
                    "pre-pass at every evaluation" + {"flow": ", excluded from the divergence",
                                                      "sc_chain_rule": ", inside the divergence"}.get(opts.mode, "")),
  }


def flow_integrand(gamma_C: Array, div_sum_C: Array, num_tokens: float) -> Array:
  """d(flow)/dgamma per token at each evaluation: (alpha/2) * div, summed over sequences."""
  alpha_C, _ = diffusion.alpha_sigma(gamma_C)
  return 0.5 * alpha_C * div_sum_C / max(float(num_tokens), 1.0)


def nats_to_bits(nats: float) -> float:
  return nats / math.log(2.0)
