"""Noise schedules over gamma (log noise-to-signal ratio), swappable by config.

A schedule is a distribution over gamma on explicit endpoints
[gamma_min, gamma_max]. It maps a uniform ``u`` in [0, 1] to gamma (its
inverse CDF), and the same map gives the training noise levels, the sampler's
step grid and the likelihood integrator's grid. ``u = 0`` is the clean end.

* ``gumbel``: LangFlow's learned schedule (method §4.3, §4.4). The conditional
  token entropy is modelled as H(gamma) = H_inf * GumbelCDF(gamma; mu, beta);
  the information-uniform principle makes the proposal density proportional to
  H'(gamma), i.e. the Gumbel density itself. ``fit_loss`` regresses the
  observed cross-entropy onto H(gamma), which moves (mu, beta, H_inf) and
  nothing else. The endpoints follow from (mu, beta) and the cutoff.
* ``linear``: gamma linear in u (uniform density in gamma).
* ``cosine``: alpha = cos(pi t / 2) restricted to the same endpoints.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from langflow_jax.errors import ConfigError

Array = jax.Array

# Smallest allowed Gumbel scale while training; the released code leaves beta
# unconstrained, and a non-positive beta would flip the schedule.
MIN_GUMBEL_SCALE = 1e-3


def _scalar_param(value: float) -> nnx.Param:
  return nnx.Param(jnp.asarray(value, jnp.float32), logical_axes=())


class NoiseSchedule(nnx.Module):
  """Interface: endpoints, u -> gamma, gamma -> u, density, fit loss."""

  learnable: bool = False

  def endpoints(self) -> tuple[Array, Array]:
    raise NotImplementedError

  def icdf(self, u: Array) -> Array:
    """Inverse CDF: monotone map from [0, 1] onto [gamma_min, gamma_max]."""
    raise NotImplementedError

  def cdf(self, gamma: Array) -> Array:
    raise NotImplementedError

  def log_density(self, gamma: Array) -> Array:
    """log of d cdf / d gamma."""
    raise NotImplementedError

  def entropy_curve(self, gamma: Array) -> Array | None:
    """The schedule's model of the per-token conditional entropy H(gamma)."""
    return None

  def fit_loss(self, gamma_B: Array, ce_B: Array) -> Array:
    """Per-sequence auxiliary loss that fits the schedule; zero when fixed."""
    del ce_B
    return jnp.zeros(jnp.shape(gamma_B), jnp.float32)

  def summary(self) -> dict[str, float]:
    lo, hi = self.endpoints()
    return {"gamma_min": float(lo), "gamma_max": float(hi)}


class GumbelSchedule(NoiseSchedule):
  """The learned Gumbel proposal with the official float32 op order."""

  learnable = True

  def __init__(self, loc: float, scale: float, entropy: float, cutoff: float = 1e-5):
    if not 0.0 < cutoff < 0.5:
      raise ConfigError(f"schedule.cutoff={cutoff} must lie in (0, 0.5).",
                        "use a small value such as 1e-5.")
    if scale <= 0:
      raise ConfigError(f"schedule.scale={scale} must be positive.", "use e.g. 0.852.")
    self.loc = _scalar_param(loc)
    self.scale = _scalar_param(scale)
    self.entropy = _scalar_param(entropy)
    self.cutoff = float(cutoff)

  def _beta(self) -> Array:
    return jnp.maximum(self.scale[...], MIN_GUMBEL_SCALE)

  def endpoints(self) -> tuple[Array, Array]:
    # Python doubles times float32 scalars, in float32: as the official code.
    mu, beta = self.loc[...], self._beta()
    gamma_min = mu - jnp.float32(math.log(-math.log(self.cutoff))) * beta
    gamma_max = mu - jnp.float32(math.log(self.cutoff)) * beta
    return gamma_min, gamma_max

  def icdf(self, u: Array) -> Array:
    # torch's Gumbel(mu, beta).icdf(u) then clamp, op for op in float32 (method §4.3):
    # the naive mu - beta*log(-log u) is off by up to 1e-2 near u = 1.
    u = jnp.asarray(u, jnp.float32)
    u1 = (u - 0.5) * jnp.float32(1.0) + 0.5
    tiny = jnp.float32(2.0**-126)
    u2 = u1 * (jnp.float32(1.0 - 2.0**-23) - tiny) + tiny
    c = jnp.log(-jnp.log(u2))
    g = self.loc[...] + (-self._beta()) * c
    lo, hi = self.endpoints()
    return jnp.clip(g, lo, hi)

  def cdf(self, gamma: Array) -> Array:
    # torch's TransformedDistribution.cdf op order (inverse transforms, the
    # base Uniform(tiny, 1 - eps) cdf, then the monotonising affine), so that
    # values below ~6e-8 read 0 as they do in the official code.
    y = (jnp.asarray(gamma, jnp.float32) - self.loc[...]) / (-self._beta())
    y = jnp.exp(-jnp.exp(y))
    tiny = jnp.float32(2.0**-126)
    f = jnp.clip((y - tiny) / (jnp.float32(1.0 - 2.0**-23) - tiny), 0.0, 1.0)
    return (f - 0.5) * jnp.float32(1.0) + 0.5

  def log_density(self, gamma: Array) -> Array:
    y = (self.loc[...] - jnp.asarray(gamma, jnp.float32)) / self._beta()
    return y - jnp.exp(y) - jnp.log(self._beta())

  def entropy_curve(self, gamma: Array) -> Array:
    return self.entropy[...] * self.cdf(gamma)

  def fit_loss(self, gamma_B: Array, ce_B: Array) -> Array:
    # gamma and the observed CE are constants here: this loss moves only
    # (mu, beta, H_inf), and the CE loss alone moves the network.
    target_B = jax.lax.stop_gradient(ce_B.astype(jnp.float32))
    h_B = self.entropy_curve(jax.lax.stop_gradient(gamma_B))
    return jnp.square(target_B - h_B)

  def summary(self) -> dict[str, float]:
    out = super().summary()
    out.update(gumbel_loc=float(self.loc[...]), gumbel_scale=float(self.scale[...]),
               gumbel_entropy=float(self.entropy[...]))
    return out


class FixedSchedule(NoiseSchedule):
  """A schedule with constant endpoints and no learnable parameters."""

  def __init__(self, gamma_min: float, gamma_max: float):
    if not gamma_min < gamma_max:
      raise ConfigError(
          f"schedule endpoints gamma_min={gamma_min} >= gamma_max={gamma_max}.",
          "set --config.schedule.gamma_min below --config.schedule.gamma_max.")
    self.gamma_min = float(gamma_min)
    self.gamma_max = float(gamma_max)

  def endpoints(self) -> tuple[Array, Array]:
    return jnp.float32(self.gamma_min), jnp.float32(self.gamma_max)


class LinearSchedule(FixedSchedule):
  """gamma = gamma_min + u (gamma_max - gamma_min): uniform in log-SNR."""

  def icdf(self, u: Array) -> Array:
    u = jnp.clip(jnp.asarray(u, jnp.float32), 0.0, 1.0)
    return jnp.float32(self.gamma_min) + u * jnp.float32(self.gamma_max - self.gamma_min)

  def cdf(self, gamma: Array) -> Array:
    g = jnp.asarray(gamma, jnp.float32)
    return jnp.clip((g - self.gamma_min) / (self.gamma_max - self.gamma_min), 0.0, 1.0)

  def log_density(self, gamma: Array) -> Array:
    g = jnp.asarray(gamma, jnp.float32)
    inside = (g >= self.gamma_min) & (g <= self.gamma_max)
    return jnp.where(inside, -math.log(self.gamma_max - self.gamma_min), -jnp.inf)


class CosineSchedule(FixedSchedule):
  """alpha_t = cos(pi t / 2), i.e. gamma = 2 log tan(pi t / 2), t in [t_min, t_max]."""

  def _t_range(self) -> tuple[float, float]:
    t = lambda g: 2.0 / math.pi * math.atan(math.exp(g / 2.0))
    return t(self.gamma_min), t(self.gamma_max)

  def icdf(self, u: Array) -> Array:
    t0, t1 = self._t_range()
    u = jnp.clip(jnp.asarray(u, jnp.float32), 0.0, 1.0)
    t = t0 + u * (t1 - t0)
    g = 2.0 * jnp.log(jnp.tan(0.5 * math.pi * t))
    return jnp.clip(g, self.gamma_min, self.gamma_max)

  def cdf(self, gamma: Array) -> Array:
    t0, t1 = self._t_range()
    g = jnp.asarray(gamma, jnp.float32)
    t = 2.0 / math.pi * jnp.arctan(jnp.exp(g / 2.0))
    return jnp.clip((t - t0) / (t1 - t0), 0.0, 1.0)

  def log_density(self, gamma: Array) -> Array:
    t0, t1 = self._t_range()
    g = jnp.asarray(gamma, jnp.float32)
    # dt/dgamma = (1/pi) * exp(g/2) / (1 + exp(g)) = 1 / (2 pi cosh(g/2))
    log_dt = -math.log(2.0 * math.pi) - jnp.log(jnp.cosh(g / 2.0))
    inside = (g >= self.gamma_min) & (g <= self.gamma_max)
    return jnp.where(inside, log_dt - math.log(t1 - t0), -jnp.inf)


def gumbel_endpoints(loc: float, scale: float, cutoff: float) -> tuple[float, float]:
  """The Gumbel schedule's endpoints as Python floats (for fixed-schedule defaults)."""
  f32 = np.float32
  lo = f32(loc) - f32(math.log(-math.log(cutoff))) * f32(scale)
  hi = f32(loc) - f32(math.log(cutoff)) * f32(scale)
  return float(lo), float(hi)


def _fixed(cls) -> Callable[[ml_collections.ConfigDict], NoiseSchedule]:
  def build(cfg: ml_collections.ConfigDict) -> NoiseSchedule:
    lo, hi = gumbel_endpoints(cfg.loc, cfg.scale, cfg.cutoff)
    gamma_min = lo if cfg.get("gamma_min") is None else cfg.gamma_min
    gamma_max = hi if cfg.get("gamma_max") is None else cfg.gamma_max
    return cls(gamma_min, gamma_max)
  return build


SCHEDULES: dict[str, Callable[[ml_collections.ConfigDict], NoiseSchedule]] = {
    "gumbel": lambda cfg: GumbelSchedule(cfg.loc, cfg.scale, cfg.entropy, cfg.cutoff),
    "linear": _fixed(LinearSchedule),
    "cosine": _fixed(CosineSchedule),
}


def make_schedule(cfg: ml_collections.ConfigDict) -> NoiseSchedule:
  """Builds the schedule named by ``cfg.name`` (see SCHEDULES)."""
  if cfg.name not in SCHEDULES:
    raise ConfigError(f"unknown schedule '{cfg.name}'.",
                      f"set --config.schedule.name to one of {sorted(SCHEDULES)}.")
  return SCHEDULES[cfg.name](cfg)


def linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """torch.linspace in float32, with torch's op order (bit-identical grids).

  The first half counts up from ``start``, the second half down from ``end``.
  """
  f32 = np.float32
  start, end = f32(start), f32(end)
  if steps == 1:
    return np.array([start], f32)
  step = f32(end - start) / f32(steps - 1)
  idx = np.arange(steps)
  up = start + step * idx.astype(f32)
  down = end - step * (steps - idx - 1).astype(f32)
  return np.where(idx < steps // 2, up, down).astype(f32)


def sampler_u_grid(num_steps: int, eps: float = 1e-5) -> np.ndarray:
  """The official sampler's quantiles: linspace(1 - eps, eps, N), noisy to clean."""
  return linspace_f32(np.float32(1.0 - eps), np.float32(eps), num_steps)


def likelihood_u_grid(num_steps: int, eps: float = 1e-5) -> np.ndarray:
  """The official ODE grid: clamp(linspace(0, 1, n + 1), eps, 1 - eps), clean to noisy."""
  u = linspace_f32(0.0, 1.0, num_steps + 1)
  return np.clip(u, np.float32(eps), np.float32(1.0 - eps)).astype(np.float32)
