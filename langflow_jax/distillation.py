"""Few-step students: the distillation objective of a frozen LangFlow teacher (docs/sampling.md, few-step students).

The student is a LangFlow of the teacher's shape, started from its weights, and
it samples with the unchanged sampler (:mod:`langflow_jax.sampling`): N steps
visit the official grid's N levels, make N - 1 exact DDIM jumps with the
student's x_hat held fixed and argmax the last pass (one step: the pass at the
noisiest level is the answer). Training teaches each jump g_t -> g_s to land
where the teacher's ODE does:

* the state at g_t is what the student's own sampler holds there: the previous
  grid level's data-noised embedding, moved by the student's (stop-gradient)
  prediction, which is also the self-conditioning input (zero at the first
  level), exactly as at sampling;
* the teacher solves the flow from that state to g_s with ``k`` Euler-DDIM
  sub-steps, uniform in the schedule's CDF between the two levels (its own
  sampler's grid, refined), feeding its predictions back as self-conditioning;
* the x_hat that makes one DDIM jump land on the teacher's end point is the
  target (Salimans & Ho's x-target); the loss is its squared error under the
  truncated-SNR weight max(SNR_t, 1).

Two methods share this objective and differ in the jumps they train (``progressive``
is the default, the better of the two in experiments/results/distill.md):
``flowmap`` draws, per step, one of the student's step counts (``distill.steps``)
and one of its jumps, solved by the teacher with ``teacher_steps / jumps``
sub-steps: one student for every listed step count. ``progressive`` (Salimans
& Ho) trains one grid per round, each jump matched to two jumps of the previous
round's student, halving ``teacher_steps`` down to the smallest step count.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from langflow_jax import diffusion
from langflow_jax import objective as objective_lib
from langflow_jax.model import LangFlow
from langflow_jax.schedule import sampler_u_grid

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class JumpGrid:
  """A student grid of ``jumps`` DDIM jumps, each solved by the teacher in ``substeps``."""

  jumps: int
  substeps: int

  def u_grid(self) -> np.ndarray:
    """The official sampler's CDF levels of this grid (jumps + 1 of them, noisy to clean)."""
    return sampler_u_grid(self.jumps + 1)


def jumps_of(steps: int) -> int:
  """DDIM jumps of an N-step sampler: N - 1; one step shares the two-step jump
  (its only pass, at the noisiest level, must predict where that jump lands)."""
  return max(int(steps) - 1, 1)


def progressive_rounds(cfg: ml_collections.ConfigDict) -> list[int]:
  """The student jumps of each progressive round: teacher_steps / 2, / 4, ... down to the
  smallest step count's jumps (``config.validate_distill`` checks the ratio is a power of two)."""
  last = jumps_of(min(cfg.steps))
  rounds, jumps = [], int(cfg.teacher_steps)
  while jumps > last:
    jumps //= 2
    rounds.append(jumps)
  return rounds


def jump_grids(cfg: ml_collections.ConfigDict) -> tuple[JumpGrid, ...]:
  """The grids one run trains: flowmap, every listed step count's; progressive, its round's."""
  if cfg.method == "progressive":
    return (JumpGrid(progressive_rounds(cfg)[int(cfg.round)], 2),)
  jumps = sorted({jumps_of(s) for s in cfg.steps})
  return tuple(JumpGrid(j, max(int(math.ceil(cfg.teacher_steps / j)), 1)) for j in jumps)


def jump_target(z_s_BxLxD: Array, z_t_BxLxD: Array, gamma_t_B: Array, gamma_s_B: Array) -> Array:
  """The x_hat whose exact DDIM jump from (z_t, gamma_t) lands on z_s (Salimans & Ho's x-target).

  The jump is z_s = alpha_s x (1 - w) + w r z_t with r = alpha_s / alpha_t and
  w = exp((gamma_s - gamma_t) / 2) (``diffusion.ddim_step``), so
  x = (z_s - w r z_t) / (alpha_s (1 - w)); 1 - w is written -expm1 so that a
  short jump loses no digits.
  """
  g_t = gamma_t_B.astype(jnp.float32)[:, None, None]
  g_s = gamma_s_B.astype(jnp.float32)[:, None, None]
  r = jnp.exp((jax.nn.softplus(g_t) - jax.nn.softplus(g_s)) / 2)
  w = jnp.exp((g_s - g_t) / 2)
  alpha_s = jnp.sqrt(jax.nn.sigmoid(-g_s))
  return (z_s_BxLxD - w * r * z_t_BxLxD) / (alpha_s * -jnp.expm1((g_s - g_t) / 2))


def snr_weight(gamma_B: Array) -> Array:
  """Truncated-SNR weight max(alpha^2 / sigma^2, 1) = max(exp(-gamma), 1) on the x error
  (Salimans & Ho): noisy levels count as a noise-prediction loss would, clean ones as an x loss."""
  return jnp.maximum(jnp.exp(-gamma_B.astype(jnp.float32)), 1.0)


def teacher_solve(teacher: LangFlow, z_BxLxD: Array, s_BxLxD: Array | None, u_t_B: Array, u_s_B: Array,
                  substeps: int) -> Array:
  """The teacher's Euler-DDIM solution from CDF level u_t to u_s in ``substeps`` steps.

  The sub-levels are uniform in the schedule's CDF between the two (the
  official sampler's grid refined), and each prediction is the next
  evaluation's self-conditioning input, as in the teacher's own sampler.
  ``s`` is the state's self-conditioning input (None: a model without it).
  """
  fractions = jnp.linspace(0.0, 1.0, substeps + 1, dtype=jnp.float32)
  u_KxB = u_t_B[None] + (u_s_B - u_t_B)[None] * fractions[:, None]
  g_KxB = teacher.schedule.icdf(u_KxB)

  def step(carry, gammas):
    z, s = carry
    g_a, g_b = gammas
    x_hat = teacher.denoise(teacher(z, g_a, s))
    return (diffusion.ddim_step(z, x_hat, g_a, g_b), x_hat if s is not None else None), None

  (z, _), _ = jax.lax.scan(step, (z_BxLxD, s_BxLxD), (g_KxB[:-1], g_KxB[1:]))
  return jax.lax.stop_gradient(z)


@dataclasses.dataclass(frozen=True)
class Jump:
  """The student's training example: its state at gamma_t and the teacher's target x_hat."""

  z_t_BxLxD: Array
  s_BxLxD: Array | None          # the self-conditioning input the sampler would hold
  gamma_t_B: Array
  gamma_s_B: Array
  target_BxLxD: Array
  later_B: Array                 # bool: not the first jump (the input s is a prediction, not zero)


def sampler_state(student: LangFlow, e_BxLxD: Array, eps_BxLxD: Array, index_B: Array, u_N: Array
                  ) -> tuple[Array, Array | None]:
  """(z, s) at grid level ``index`` as the student's sampler holds them: the previous level's
  data-noised embedding moved by the student's stop-gradient prediction (which is also s);
  at level 0 the data-noised embedding itself and s = 0."""
  g_prev = student.schedule.icdf(u_N[jnp.maximum(index_B - 1, 0)])
  g_t = student.schedule.icdf(u_N[index_B])
  z_prev = diffusion.add_noise(e_BxLxD, g_prev, eps_BxLxD)
  zeros = jnp.zeros_like(z_prev)
  sc = zeros if student.self_conditioning else None
  x_prev = jax.lax.stop_gradient(student.denoise(student(z_prev, g_prev, sc)))
  first = (index_B == 0)[:, None, None]
  z_t = jnp.where(first, z_prev, diffusion.ddim_step(z_prev, x_prev, g_prev, g_t))
  return jax.lax.stop_gradient(z_t), (jnp.where(first, zeros, x_prev) if student.self_conditioning else None)


def draw_jump(student: LangFlow, teacher: LangFlow, grid: JumpGrid, e_BxLxD: Array, eps_BxLxD: Array,
              key: Array) -> Jump:
  """One random jump of ``grid`` per sequence, its sampler state and the teacher's target."""
  b = e_BxLxD.shape[0]
  u_N = jnp.asarray(grid.u_grid())
  index_B = jax.random.randint(key, (b,), 0, grid.jumps)
  z_t, s = sampler_state(student, e_BxLxD, eps_BxLxD, index_B, u_N)
  u_t, u_s = u_N[index_B], u_N[index_B + 1]
  z_s = teacher_solve(teacher, z_t, s, u_t, u_s, grid.substeps)
  g_t, g_s = teacher.schedule.icdf(u_t), teacher.schedule.icdf(u_s)
  return Jump(z_t, s, g_t, g_s, jax.lax.stop_gradient(jump_target(z_s, z_t, g_t, g_s)), index_B > 0)


def distill_objective(student: LangFlow, teacher: LangFlow, ids_BxL: Array, mask_BxL: Array, key: Array, *,
                      grids: Sequence[JumpGrid], skip_scale: Array | float = 1.0,
                      train: bool = True) -> objective_lib.ObjectiveOutput:
  """The distillation loss terms of one batch (see the module docstring).

  ``distill_sum`` holds the weighted squared error of x_hat against the
  teacher's target, summed over valid tokens (mean over the embedding width);
  ``ce_sum`` the student's cross-entropy of the data tokens at its jump's
  start level, a diagnostic (``objective.ce_weight`` = 0 in a student's config
  keeps it out of the loss). One grid per step, drawn uniformly.
  """
  del skip_scale  # the student inherits the teacher's full skip term
  k_grid, k_jump, k_eps, k_drop = jax.random.split(key, 4)
  if not train:
    k_drop = None
  mask = mask_BxL.astype(jnp.float32)
  e = teacher.embed(ids_BxL)
  eps = jax.random.normal(k_eps, e.shape, jnp.float32)
  branches = [lambda k, g=g: draw_jump(student, teacher, g, e, eps, k) for g in grids]
  if len(branches) == 1:
    jump = branches[0](k_jump)
  else:
    fields = lambda j: (j.z_t_BxLxD, j.s_BxLxD, j.gamma_t_B, j.gamma_s_B, j.target_BxLxD, j.later_B)
    which = jax.random.randint(k_grid, (), 0, len(branches))
    jump = Jump(*jax.lax.switch(which, [lambda k, f=f: fields(f(k)) for f in branches], k_jump))
  logits = student(jump.z_t_BxLxD, jump.gamma_t_B, jump.s_BxLxD, dropout_key=k_drop)
  x_hat = student.denoise(logits)
  sq_BxL = jnp.mean(jnp.square(x_hat - jump.target_BxLxD), axis=-1)
  distill_BxL = snr_weight(jump.gamma_t_B)[:, None] * sq_BxL * mask
  ce_BxL = objective_lib.token_cross_entropy(logits, ids_BxL) * mask
  tokens_B = jnp.sum(mask, axis=-1)
  out = objective_lib.objective_output(ce_BxL, tokens_B, jnp.zeros_like(tokens_B), jump.later_B,
                                       jump.gamma_t_B)
  return out.replace(terms=out.terms.replace(distill_sum=jnp.sum(distill_BxL)))


def student_card(cfg: ml_collections.ConfigDict) -> dict:
  """What a student run says about itself (checkpoint meta, `sample`, `serve`)."""
  card = {"student": True, "teacher": cfg.teacher, "method": cfg.method,
          "steps": [int(s) for s in cfg.steps], "teacher_steps": int(cfg.teacher_steps)}
  if cfg.method == "progressive":
    rounds = progressive_rounds(cfg)
    card.update(round=int(cfg.round), rounds=len(rounds), jumps=rounds[int(cfg.round)],
                round_teacher=cfg.round_teacher or cfg.teacher)
  return card


def describe_card(card: dict) -> str:
  """One line for logs: ``student of runs/t (flowmap, 1/2/4/8 steps, teacher ODE 64 jumps)``."""
  steps = "/".join(str(s) for s in card["steps"])
  extra = (f", round {card['round'] + 1} of {card['rounds']} ({card['jumps']} jumps)"
           if card["method"] == "progressive" else "")
  return (f"student of {card['teacher']} ({card['method']} distillation for {steps} steps{extra}, "
          f"teacher ODE of {card['teacher_steps']} jumps)")
