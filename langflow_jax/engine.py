"""The stationary batch: a fixed set of slots, one jitted step per tick.

The library side of ``langflow-jax serve`` (the HTTP layer is
:mod:`langflow_jax.serve`). A :class:`Engine` owns ``S`` slots and a bounded
queue of :class:`Job` s; a job is one request's candidates (``rows`` slots
side by side). A background thread runs one compiled step over the slots per
tick. Each slot carries its own state: for LangFlow its z, self-conditioning
input, step counter, its own step grid (padded to ``max_steps``, so one
compiled shape serves every mix of step counts), sampler, temperature, noise
keys and its prompt or infill template (the sampler's position
conditioning); for the AR baseline its KV cache rows, position and key; for
MDLM its tokens, step and proposal keys.

Scheduling (``scheduler``):

* ``stationary`` (continuous batching): at every tick the queue's head joins
  free slots as soon as enough are free (FIFO); a LangFlow job starts at the
  top of its grid (gamma_max) and leaves at its last pass, so the batch never
  drains and no job waits for a slower one.
* ``static``: the comparison point. A batch is admitted only when every slot
  is free, after waiting up to ``static_wait_s`` for the queue to fill it;
  then it runs until its slowest member is done.

A tick runs only the smallest power-of-two prefix of the slots that holds
every busy one (slots are taken lowest first), so a lone request costs a
batch of one; that is at most log2(S) + 1 compiled shapes per tick variant.
A LangFlow tick runs up to ``fuse_passes`` passes in one call (a traced loop
count, so no further shapes), never past a job's next stream event or its
end, and one pass while a waiting job could take free slots: the call's
dispatch and host sync are paid once a block.

Exactness (:class:`LangFlowSlots`): a job's tokens are those of
``sampling.sample`` / ``best_of_n`` from the same seed and options, as
``langflow-jax sample --seed SEED`` draws them (``request_keys``): the
initial noise and the prompt noise of candidate j are row j of the same draws
(threefry's counters make ``normal(key, (S, L, D))[:n] == normal(key, (n, L,
D))``), every update is the sampler's, per slot. The one difference: the
``stochastic`` sampler's churn noise of candidates j >= 1 is drawn per
candidate (``fold_in(k_step, j)``) instead of as row j of one batch-shaped
draw, so its best-of candidates other than the first are other draws from the
same distribution (single candidates match exactly). The AR and MDLM backends
match ``ar.generate`` / ``mdlm.generate`` the same way (candidate 0 exactly;
j >= 1 per-candidate keys; MDLM's proposal keys count each slot's own
changes, where the batch sampler counts the batch's).

Events go to each job's ``on_event`` callback, called on the engine thread:
a :class:`PassEvent` every ``stream_every``-th pass before the last (the
argmax decode of that pass), then one :class:`DoneEvent` with the last pass's
tokens (or an :class:`ErrorEvent`). Scoring for
best-of runs on a separate thread so that the slots keep stepping. An
exception in a job's admission, a tick or a callback fails the jobs it
touches and the loop goes on.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import math
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from langflow_jax import diffusion, parallel, sampling
from langflow_jax import model as model_lib

Array = jax.Array
log = logging.getLogger(__name__)

SCHEDULERS = ("stationary", "static")
FUSE_PASSES = 4  # the server's default Engine(fuse_passes=...): docs/serving.md says what it saves
SAMPLER_IDS = {name: i for i, name in enumerate(("euler", "heun", "stochastic", "multistep"))}


# --------------------------------------------------------------------------- jobs and events


@dataclasses.dataclass(eq=False)  # compared and hashed by identity
class Job:
  """One request's candidates. Set the request fields; the engine fills the rest."""

  rows: int = 1                           # candidates, one slot each
  passes: int = 32                        # LangFlow: sampler steps (network passes); AR: tokens to generate
  seed: int = 0
  sampler: str = "euler"                  # LangFlow only
  temperature: float = 1.0                # LangFlow: inside x_hat; AR: of the draw (0: greedy)
  top_p: float = 1.0                      # AR only
  cond_ids: np.ndarray | None = None      # [L] int32: given tokens (LangFlow: anywhere; AR: the prefix)
  cond_fixed: np.ndarray | None = None    # [L] bool: where they are
  stream_every: int = 0                   # a PassEvent every k-th pass (0: none)
  score: str | None = None                # scorer of the candidates (None: no scoring)
  on_event: Callable[[Any], None] | None = None
  # filled by the engine
  id: int = -1
  slots: list = dataclasses.field(default_factory=list)
  done_passes: int = 0
  submitted_at: float = 0.0
  admitted_at: float | None = None
  finished_at: float | None = None
  cancelled: bool = False
  keys: Any = None                        # the backend's per-job keys

  @property
  def prompt_len(self) -> int:
    """Length of the given prefix (AR: where generation starts)."""
    if self.cond_fixed is None:
      return 0
    free = np.flatnonzero(~np.asarray(self.cond_fixed, bool))
    return int(free[0]) if free.size else len(self.cond_fixed)


@dataclasses.dataclass
class PassEvent:
  job: Job
  pass_index: int            # 1-based
  passes: int
  gamma: float | None        # LangFlow: the noise level this pass evaluated
  tokens_RxL: np.ndarray     # argmax decode of this pass, per candidate


@dataclasses.dataclass
class DoneEvent:
  job: Job
  tokens_RxL: np.ndarray
  logprob_RxL: np.ndarray    # log p of each chosen token (final pass / the AR draw)
  scores_R: np.ndarray | None
  gamma: float | None


@dataclasses.dataclass
class ErrorEvent:
  job: Job
  message: str


class QueueFull(Exception):
  def __init__(self, retry_after: int):
    super().__init__(f"the queue is full; retry after {retry_after} s")
    self.retry_after = retry_after


class EngineStopped(Exception):
  pass


def request_keys(seed: int):
  """The keys ``langflow-jax sample --seed SEED`` uses for its first chunk of requests:
  (k_noise, k_cond, k_loop) inside ``sampling.sample`` and the score's key. One compiled call for an int32
  seed (five eager key operations cost an admission about 1 ms); the same keys."""
  if 0 <= seed < 2**31:
    return _request_keys_jit(np.int32(seed))
  return _request_keys(seed)


def _request_keys(seed):
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
  k_sample, k_score = jax.random.split(key)
  k_noise, k_cond, k_loop = jax.random.split(jax.random.fold_in(k_sample, sampling.KEY_SALT), 3)
  return k_noise, k_cond, k_loop, k_score


_request_keys_jit = jax.jit(_request_keys)


def _bucket(n: int, cap: int) -> int:
  return min(1 << max(n - 1, 0).bit_length(), cap)


# --------------------------------------------------------------------------- what every backend shares


class Slots:
  """S samplers of one method side by side: the backend an :class:`Engine` steps.

  A subclass holds the per-slot state (``reset``), writes a job into its slots
  (``admit``), runs one pass of a prefix of the slots (``tick``), compiles
  every shape before serving (``warmup``) and ranks a job's candidates
  (``score``). This base keeps what they share: the model split for jit, the
  compiled functions by shape and the padding of a job to a compiled row count.
  """

  min_bucket = 1  # the fewest slots a tick runs
  fuses_passes = False  # whether ``tick(..., passes=m)`` runs m passes in one call (else always one)

  def __init__(self, model, *, slots: int, length: int):
    self.model = model
    self.num_slots, self.length = int(slots), int(length)
    self._graphdef, self._params = nnx.split(model)
    self._ticks: dict[Any, Callable] = {}   # by prefix size (and tick variant)
    self._admits: dict[Any, Callable] = {}  # by row count (and admission variant)
    self.reset()

  def reset(self) -> None:
    raise NotImplementedError

  def row_buckets(self, floor: int = 1) -> list[int]:
    """The row counts that admissions and tick prefixes compile for (powers of two up to S, at least ``floor``)."""
    return sorted({max(_bucket(r, self.num_slots), floor) for r in range(1, self.num_slots + 1)})

  def slot_index(self, job: Job, slots: list[int]) -> np.ndarray:
    """[R] the job's slots, padded to its compiled row count with S: out of range, so those rows' writes drop."""
    idx_R = np.full((_bucket(job.rows, self.num_slots),), self.num_slots, np.int32)
    idx_R[:len(slots)] = slots
    return idx_R

  def _warm_admission(self, rows: int) -> None:
    """Compiles the admission of ``rows`` candidates, writing nowhere (every index out of range)."""
    raise NotImplementedError

  def warmup(self, samplers=()) -> None:
    """Compiles the admission and tick shapes (state unchanged: nothing is active)."""
    del samplers  # the baselines have one tick variant
    for rows in self.row_buckets():
      self._warm_admission(rows)
    zeros_S = np.zeros((self.num_slots,), np.int32)
    for k in self.row_buckets():
      out = self.tick(k, zeros_S, zeros_S + 2, np.zeros((self.num_slots,), bool), [])
    jax.block_until_ready(out[0])


# --------------------------------------------------------------------------- LangFlow slots


def _lf_admit(st, slot_idx_R, k_noise, k_cond, key_loop, ids_L, fixed_L, grid_N, temperature, churn, sampler_id,
              *, rows: int, hidden: int, with_cond: bool):
  length = ids_L.shape[0]
  z0 = jax.random.normal(k_noise, (rows, length, hidden), jnp.float32)
  eps = (jax.random.normal(k_cond, (rows, length, hidden), jnp.float32) if with_cond
         else jnp.zeros((rows, length, hidden), jnp.float32))
  bc = lambda x: jnp.broadcast_to(x, (rows,) + jnp.shape(x))
  new = dict(z=z0, s=jnp.zeros_like(z0), x_prev=jnp.zeros_like(z0), h_prev=bc(jnp.float32(1.0)), grid=bc(grid_N),
             ids=bc(ids_L), fixed=bc(fixed_L), eps=eps, temperature=bc(temperature), churn=bc(churn),
             sampler=bc(sampler_id), key=bc(key_loop), cand=jnp.arange(rows, dtype=jnp.int32))
  return {name: st[name].at[slot_idx_R].set(value.astype(st[name].dtype), mode="drop") for name, value in new.items()}


def _lf_tick(graphdef, params, st, i_S, n_S, active_S, passes, *, k: int, heun: bool, stochastic: bool,
             update_dtype: str, emit: bool = True, with_logprob: bool = True):
  """``passes`` (traced, >= 1) passes of every slot in the prefix [0, k): the sampler's step, per slot, pass
  after pass in one call (the engine never lets a job stream or end inside the block). Without ``emit``
  (no job streams or ends after the block) the argmax tokens and their log-probabilities are not computed;
  without ``with_logprob`` (no job ends: stream events only) the log-probabilities are not."""
  model = nnx.merge(graphdef, params)
  emb = model.embedding_matrix()
  dt = jnp.dtype(update_dtype)
  sub = {name: value[:k] for name, value in st.items()}
  n, act = n_S[:k], active_S[:k]
  grid = sub["grid"]
  nmax = grid.shape[1]
  fixed = sub["fixed"][..., None]
  e_fixed = jnp.take(emb, sub["ids"], axis=0)
  eps = sub["eps"]
  sampler = sub["sampler"]
  temp = sub["temperature"][:, None, None]
  col = lambda x: x[:, None, None]

  def pin(z, g):
    return jnp.where(fixed, diffusion.add_noise(e_fixed, g, eps), z)

  def predict(z, g, s):
    logits = model(z, g, s)
    x_hat = diffusion.denoised_embedding_from_logits(logits, emb, temp)
    return logits, jnp.where(fixed, e_fixed, x_hat)

  def ddim(z, x_hat, a, b):
    return diffusion.ddim_step(z.astype(dt), x_hat.astype(dt), a.astype(dt), b.astype(dt)).astype(jnp.float32)

  def one_pass(j, sub):
    i = i_S[:k] + j
    g_t = jnp.take_along_axis(grid, i[:, None], axis=1)[:, 0]
    g_s = jnp.take_along_axis(grid, jnp.minimum(i + 1, nmax - 1)[:, None], axis=1)[:, 0]
    last = i >= n - 1
    upd = act & ~last
    z, s = sub["z"], sub["s"]
    if stochastic:
      churn_c = jnp.minimum(sub["churn"] / jnp.maximum(n - 1, 1).astype(jnp.float32), math.sqrt(2.0) - 1.0)
      g_hat = jnp.minimum(g_t + 2.0 * jnp.log1p(churn_c), grid[:, 0])
      ratio = jnp.exp((jax.nn.softplus(g_t) - jax.nn.softplus(g_hat)) / 2)
      a_h, _ = diffusion.alpha_sigma(g_hat)
      extra = a_h * jnp.sqrt(jnp.exp(g_t) * jnp.expm1(g_hat - g_t))

      def noise(key, step, cand):
        k_step = jax.random.fold_in(key, step)  # == split(k_loop, n - 1)[step], the sampler's key
        k_step = jnp.where(cand == 0, k_step, jax.random.fold_in(k_step, cand))
        return jax.random.normal(k_step, z.shape[1:], jnp.float32)

      xi = jax.vmap(noise)(sub["key"], i, sub["cand"])
      use = (sampler == SAMPLER_IDS["stochastic"]) & ~last
      z = jnp.where(col(use), col(ratio) * z + col(extra) * xi, z)
      g_t = jnp.where(use, g_hat, g_t)
    z = pin(z, g_t)
    logits, x_hat = predict(z, g_t, s)
    h = (g_t - g_s) / 2
    r = col(sub["h_prev"] / jnp.maximum(h, 1e-12))
    extrapolated = (1 + 0.5 / r) * x_hat - (0.5 / r) * sub["x_prev"]
    multistep = (sampler == SAMPLER_IDS["multistep"]) & (i > 0)
    z_new = ddim(z, jnp.where(col(multistep), extrapolated, x_hat), g_t, g_s)
    s_new = x_hat
    if heun:
      z_pred = pin(ddim(z, x_hat, g_t, g_s), g_s)
      _, x_end = predict(z_pred, g_s, x_hat)
      is_heun = col(sampler == SAMPLER_IDS["heun"])
      z_new = jnp.where(is_heun, ddim(z, 0.5 * (x_hat + x_end), g_t, g_s), z_new)
      s_new = jnp.where(is_heun, x_end, s_new)
    u = col(upd)
    new = dict(sub, z=jnp.where(u, z_new, sub["z"]), s=jnp.where(u, s_new, s),
               x_prev=jnp.where(u, x_hat, sub["x_prev"]), h_prev=jnp.where(upd, h, sub["h_prev"]))
    return new, logits, g_t

  sub = jax.lax.fori_loop(0, passes - 1, lambda j, sub: one_pass(j, sub)[0], sub)
  new, logits, g_t = one_pass(passes - 1, sub)
  st = {name: st[name].at[:k].set(new[name]) for name in st}
  if not emit:
    return st, None, None, g_t
  tokens = jnp.where(sub["fixed"], sub["ids"], model_lib.vocab_argmax(logits))
  token_logprob = model_lib.chosen_log_probs(logits, tokens) if with_logprob else None
  return st, tokens, token_logprob, g_t


class LangFlowSlots(Slots):
  """S LangFlow sampler states side by side (see the module docstring)."""

  fuses_passes = True

  def __init__(self, model, *, slots: int, length: int, max_steps: int, grid: str = "official", churn: float = 0.0,
               update_dtype: str = "auto", mesh: jax.sharding.Mesh | None = None):
    self.max_steps = int(max_steps)
    self.grid_name, self.churn = grid, float(churn)
    self.update_dtype = sampling.SamplerOptions(update_dtype=update_dtype).resolved_update_dtype()
    self._grids: dict[int, np.ndarray] = {}
    # With a mesh the slots shard over its data x fsdp axes (the weights by the sharding rules), and a
    # tick runs at least one slot per shard.
    self.mesh = mesh
    if mesh is not None:
      shards = parallel.data_parallel_size(mesh)
      if slots % shards:
        raise ValueError(f"{slots} slots do not divide over the mesh's {shards} data shards")
      self.min_bucket = shards
    # Every tick would normalise E's rows again (the sampler's scan hoists that out of its loop)
    super().__init__(model_lib.with_embedding_normalised_once(model), slots=slots, length=length)
    if mesh is not None:
      self._params = jax.device_put(self._params, parallel.tree_shardings(self._params, mesh))

  def reset(self) -> None:
    s, l, d = self.num_slots, self.length, self.model.hidden_size
    z = lambda: jnp.zeros((s, l, d), jnp.float32)
    self._state = dict(z=z(), s=z(), x_prev=z(), h_prev=jnp.ones((s,), jnp.float32),
                       grid=jnp.zeros((s, self.max_steps), jnp.float32), ids=jnp.zeros((s, l), jnp.int32),
                       fixed=jnp.zeros((s, l), bool), eps=z(), temperature=jnp.ones((s,), jnp.float32),
                       churn=jnp.zeros((s,), jnp.float32), sampler=jnp.zeros((s,), jnp.int32),
                       key=jnp.zeros((s, 2), jnp.uint32), cand=jnp.zeros((s,), jnp.int32))
    if self.mesh is not None:
      self._state = jax.device_put(self._state, self._state_shardings())

  def _state_shardings(self):
    return {name: parallel.rows_sharding(self.mesh, value.ndim, self.num_slots) for name, value in self._state.items()}

  def _jit(self, fn, donate: int, k: int | None = None, emit: bool = True, with_logprob: bool = True):
    """jit; on a mesh with the slots' shardings pinned (the state keeps its layout from tick to tick)."""
    if self.mesh is None:
      return jax.jit(fn, donate_argnums=donate)
    state = self._state_shardings()
    if k is None:
      return jax.jit(fn, donate_argnums=donate, out_shardings=state)
    rows = lambda ndim: parallel.rows_sharding(self.mesh, ndim, k)
    tokens = (rows(2), rows(2) if with_logprob else None) if emit else (None, None)
    return jax.jit(fn, donate_argnums=donate, out_shardings=(state, *tokens, rows(1)))

  def grid(self, steps: int) -> np.ndarray:
    """The job's step grid, padded with its last level to ``max_steps``."""
    if steps not in self._grids:
      g = sampling.step_grid(self.model.schedule, steps, self.grid_name)
      self._grids[steps] = np.concatenate([g, np.full(self.max_steps - steps, g[-1], np.float32)])
    return self._grids[steps]

  def admit(self, job: Job, slots: list[int]) -> None:
    k_noise, k_cond, k_loop, k_score = request_keys(job.seed)
    job.keys = k_score
    idx_R = self.slot_index(job, slots)
    with_cond = job.cond_ids is not None
    ids = np.zeros((self.length,), np.int32) if not with_cond else np.asarray(job.cond_ids, np.int32)
    fixed = np.zeros((self.length,), bool) if not with_cond else np.asarray(job.cond_fixed, bool)
    fn = self._admit_fn(len(idx_R), with_cond)
    self._state = fn(self._state, jnp.asarray(idx_R), k_noise, k_cond, k_loop, jnp.asarray(ids), jnp.asarray(fixed),
                     jnp.asarray(self.grid(job.passes)), jnp.float32(job.temperature), jnp.float32(self.churn),
                     jnp.int32(SAMPLER_IDS[job.sampler]))

  def _admit_fn(self, rows: int, with_cond: bool):
    key = (rows, with_cond)
    if key not in self._admits:
      self._admits[key] = self._jit(functools.partial(_lf_admit, rows=rows, hidden=self.model.hidden_size,
                                                      with_cond=with_cond), 0)
    return self._admits[key]

  def tick(self, k: int, i_S: np.ndarray, n_S: np.ndarray, active_S: np.ndarray, jobs: list[Job],
           emit: bool = True, passes: int = 1, logprob: bool = True):
    heun = any(j.sampler == "heun" for j in jobs)
    stochastic = any(j.sampler == "stochastic" for j in jobs)
    logprob = emit and logprob
    key = (k, heun, stochastic, emit, logprob)
    if key not in self._ticks:
      self._ticks[key] = self._jit(functools.partial(_lf_tick, self._graphdef, k=k, heun=heun, stochastic=stochastic,
                                                     update_dtype=self.update_dtype, emit=emit, with_logprob=logprob),
                                   1, k, emit, logprob)
    args = (self._params, self._state, jnp.asarray(i_S), jnp.asarray(n_S), jnp.asarray(active_S),
            jnp.int32(passes))
    if self.update_dtype == "float64":
      with jax.enable_x64(True):
        self._state, tokens, logprob, gamma = self._ticks[key](*args)
    else:
      self._state, tokens, logprob, gamma = self._ticks[key](*args)
    return tokens, logprob, gamma

  def warmup(self, samplers=("euler",)) -> None:
    """Compiles the admission and tick shapes (state unchanged: nothing is active)."""
    ids = jnp.zeros((self.length,), jnp.int32)
    for rows in self.row_buckets():
      for with_cond in (False, True):
        k = jax.random.PRNGKey(0)
        self._state = self._admit_fn(rows, with_cond)(
            self._state, jnp.full((rows,), self.num_slots, jnp.int32), k, k, k, ids, jnp.zeros_like(ids, bool),
            jnp.asarray(self.grid(2)), jnp.float32(1), jnp.float32(0), jnp.int32(0))
    zeros = np.zeros((self.num_slots,), np.int32)
    for k in self.row_buckets(self.min_bucket):
      for name in samplers:
        for emit, logprob in ((False, False), (True, False), (True, True)):
          out = self.tick(k, zeros, zeros + 2, np.zeros((self.num_slots,), bool), [Job(sampler=name)], emit,
                          logprob=logprob)
    jax.block_until_ready(out[2])

  def score(self, job: Job, tokens_RxL: np.ndarray, logprob_RxL: np.ndarray) -> np.ndarray:
    """The scorer ``job.score`` of the candidates (nats per generated token, lower is better), with the
    key ``sampling.best_of_n`` gives it."""
    r = tokens_RxL.shape[0]
    out = sampling.SampleOutput(tokens_BxL=jnp.asarray(tokens_RxL), token_logprob_BxL=jnp.asarray(logprob_RxL),
                                final_z_BxLxD=jnp.zeros((r, 1, 1), jnp.float32), gammas_N=jnp.zeros((1,), jnp.float32))
    cond = None
    if job.cond_ids is not None:
      cond = sampling.Conditioning(jnp.tile(jnp.asarray(job.cond_ids, jnp.int32)[None], (r, 1)),
                                   jnp.tile(jnp.asarray(job.cond_fixed, bool)[None], (r, 1)))
    return np.asarray(sampling.score_samples(self.model, out, job.score, cond=cond, key=job.keys))


# --------------------------------------------------------------------------- AR slots


def _ar_admit(model_parts, st, slot_idx_R, prompt_L, start_token, key, temperature, top_p, *, graphdef, rows: int):
  """Prefill the prompt's positions 0..P-1 (the start vector and x_0..x_{P-2}; padded, causal)."""
  model = nnx.merge(graphdef, model_parts)
  length = prompt_L.shape[0]
  cache = model.init_cache(1, length)
  _, cache = model.prefill(prompt_L[None, : length - 1], cache)
  bc = lambda x: jnp.broadcast_to(x, (rows,) + jnp.shape(x))
  put = lambda a, v: a.at[slot_idx_R].set(v.astype(a.dtype), mode="drop")
  new_cache = tuple((put(k_, bc(kc[0])), put(v_, bc(vc[0]))) for (k_, v_), (kc, vc) in zip(st["cache"], cache))
  return dict(cache=new_cache, tok=put(st["tok"], bc(start_token)), ids=put(st["ids"], bc(prompt_L)),
              lp=put(st["lp"], jnp.zeros((rows, length), jnp.float32)), key=put(st["key"], bc(key)),
              temperature=put(st["temperature"], bc(temperature)), top_p=put(st["top_p"], bc(top_p)),
              cand=put(st["cand"], jnp.arange(rows, dtype=jnp.int32)))


def _ar_tick(graphdef, params, st, pos_S, active_S, *, k: int):
  from langflow_jax.baselines import ar

  model = nnx.merge(graphdef, params)
  sub = jax.tree.map(lambda a: a[:k], st)
  pos, act = pos_S[:k], active_S[:k]

  def one(tok, p, cache_row, key, temperature, top_p, cand):
    cache1 = tuple((kc[None], vc[None]) for kc, vc in cache_row)
    logits, cache1 = model.decode_step(tok[None], p, cache1)
    logits = logits.astype(jnp.float32)  # [1, V]
    k_t = jax.random.fold_in(key, p)  # ar.decode's draw for position p
    k_t = jnp.where(cand == 0, k_t, jax.random.fold_in(k_t, cand))
    greedy = temperature == 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)
    scaled = jnp.where(top_p < 1.0, ar.nucleus_filter(scaled, top_p), scaled)
    drawn = jax.random.categorical(k_t, scaled, axis=-1).astype(jnp.int32)
    token = jnp.where(greedy, jnp.argmax(logits, axis=-1).astype(jnp.int32), drawn)[0]
    lp = jax.nn.log_softmax(logits, axis=-1)[0, token]
    return token, lp, tuple((kc[0], vc[0]) for kc, vc in cache1)

  token, lp, cache = jax.vmap(one)(sub["tok"], pos, sub["cache"], sub["key"], sub["temperature"], sub["top_p"],
                                   sub["cand"])
  rows = jnp.arange(k)
  keep = lambda new, old: jnp.where(act.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
  cache = jax.tree.map(keep, cache, sub["cache"])
  posc = jnp.clip(pos, 0, sub["ids"].shape[1] - 1)
  ids = sub["ids"].at[rows, posc].set(jnp.where(act, token, sub["ids"][rows, posc]))
  lps = sub["lp"].at[rows, posc].set(jnp.where(act, lp, sub["lp"][rows, posc]))
  new = dict(sub, cache=cache, tok=jnp.where(act, token, sub["tok"]), ids=ids, lp=lps)
  st = jax.tree.map(lambda full, part: full.at[:k].set(part), st, new)
  return st, ids, lps, None


class ARSlots(Slots):
  """S autoregressive decoders side by side: per-slot KV-cache rows and positions."""

  def reset(self) -> None:
    s, l = self.num_slots, self.length
    self._state = dict(cache=self.model.init_cache(s, l), tok=jnp.zeros((s,), jnp.int32),
                       ids=jnp.zeros((s, l), jnp.int32), lp=jnp.zeros((s, l), jnp.float32),
                       key=jnp.zeros((s, 2), jnp.uint32), temperature=jnp.ones((s,), jnp.float32),
                       top_p=jnp.ones((s,), jnp.float32), cand=jnp.zeros((s,), jnp.int32))

  def _admit_fn(self, rows: int):
    if rows not in self._admits:
      self._admits[rows] = jax.jit(functools.partial(_ar_admit, graphdef=self._graphdef, rows=rows),
                                   donate_argnums=1)
    return self._admits[rows]

  def admit(self, job: Job, slots: list[int]) -> None:
    p = job.prompt_len
    if p < 1 or job.cond_ids is None:
      raise ValueError("an AR job needs a given prefix of at least one token ([BOS])")
    prompt = np.zeros((self.length,), np.int32)
    prompt[:p] = np.asarray(job.cond_ids, np.int32)[:p]
    idx_R = self.slot_index(job, slots)
    job.keys = jax.random.PRNGKey(job.seed)  # as sample-baseline / ar.generate
    self._state = self._admit_fn(len(idx_R))(self._params, self._state, jnp.asarray(idx_R), jnp.asarray(prompt),
                                             jnp.int32(prompt[p - 1]), job.keys, jnp.float32(job.temperature),
                                             jnp.float32(job.top_p))

  def tick(self, k: int, i_S: np.ndarray, n_S: np.ndarray, active_S: np.ndarray, jobs: list[Job],
           emit: bool = True, passes: int = 1, logprob: bool = True):
    """One token per busy slot: slot s feeds its last token at position prompt_len + passes done."""
    del n_S, passes, logprob  # one pass a call (fuses_passes is False); the token's log p comes with it
    pos = np.zeros((self.num_slots,), np.int32)
    for j in jobs:
      pos[j.slots] = j.prompt_len + i_S[j.slots]
    if k not in self._ticks:
      self._ticks[k] = jax.jit(functools.partial(_ar_tick, self._graphdef, k=k), donate_argnums=1)
    self._state, ids, lp, _ = self._ticks[k](self._params, self._state, jnp.asarray(pos), jnp.asarray(active_S))
    return ids, lp, None

  def _warm_admission(self, rows: int) -> None:
    self._state = self._admit_fn(rows)(self._params, self._state, jnp.full((rows,), self.num_slots, jnp.int32),
                                       jnp.zeros((self.length,), jnp.int32), jnp.int32(0), jax.random.PRNGKey(0),
                                       jnp.float32(1), jnp.float32(1))

  def score(self, job: Job, tokens_RxL: np.ndarray, logprob_RxL: np.ndarray) -> np.ndarray:
    """Mean negative log-probability of the generated tokens (the model's own score; lower is better)."""
    p = job.prompt_len
    return -np.asarray(logprob_RxL, np.float64)[:, p:p + job.passes].mean(axis=1)


# --------------------------------------------------------------------------- MDLM slots


def _mdlm_admit(st, slot_idx_R, x_L, key, temperature, top_p, *, rows: int):
  k_unmask, k_token = jax.random.split(key)  # as mdlm.ancestral_sample
  bc = lambda x: jnp.broadcast_to(x, (rows,) + jnp.shape(x))
  new = dict(x=bc(x_L), lp=jnp.zeros((rows,) + x_L.shape, jnp.float32), k_unmask=bc(k_unmask), k_token=bc(k_token),
             version=jnp.zeros((rows,), jnp.int32), temperature=bc(temperature), top_p=bc(top_p),
             cand=jnp.arange(rows, dtype=jnp.int32))
  return {name: st[name].at[slot_idx_R].set(value.astype(st[name].dtype), mode="drop") for name, value in new.items()}


def _mdlm_tick(graphdef, params, st, i_S, n_S, active_S, *, k: int):
  """One step of MDLM's ancestral sampler per slot (step i of n: unmask with probability 1/(n - i))."""
  from langflow_jax.baselines import ar

  model = nnx.merge(graphdef, params)
  sub = {name: value[:k] for name, value in st.items()}
  i, n, act = i_S[:k], n_S[:k], active_S[:k]
  x = sub["x"]
  logp = model(x)  # SUBS log-probabilities [k, L, V]

  def per_candidate(key, step, cand):
    key = jax.random.fold_in(key, step)
    return jnp.where(cand == 0, key, jax.random.fold_in(key, cand))

  # Each slot's draw is jax.random.categorical(key, scaled) (the argmax of scaled plus Gumbel noise of the
  # slot's key), with the argmaxes over the whole prefix at once (model.vocab_argmax, which a vmap would
  # turn into both of its branches) and the nucleus filter's sort only when a slot asks for it.
  temperature, top_p = sub["temperature"], sub["top_p"]
  greedy = (temperature == 0)[:, None]
  scaled = logp / jnp.where(temperature == 0, 1.0, temperature)[:, None, None]
  scaled = jax.lax.cond(jnp.all(top_p >= 1.0), lambda s: s, lambda s: jax.vmap(
      lambda row, p: jnp.where(p < 1.0, ar.nucleus_filter(row, p), row))(s, top_p), scaled)
  k_token = jax.vmap(per_candidate)(sub["k_token"], sub["version"], sub["cand"])
  gumbel = jax.vmap(lambda key: jax.random.gumbel(key, scaled.shape[1:], scaled.dtype))(k_token)
  proposal = jnp.where(greedy, model_lib.vocab_argmax(logp), model_lib.vocab_argmax(gumbel + scaled))
  k_unmask = jax.vmap(per_candidate)(sub["k_unmask"], i, sub["cand"])
  p_unmask = 1.0 / jnp.maximum(n - i, 1)
  draw = jax.vmap(lambda key, p: jax.random.bernoulli(key, p, x.shape[1:]))(k_unmask, p_unmask)
  unmask = draw & (x == model.mask_id) & act[:, None]
  chosen_lp = jnp.take_along_axis(logp, proposal[..., None], axis=-1)[..., 0]
  x_new = jnp.where(unmask, proposal, x)
  new = dict(sub, x=x_new, lp=jnp.where(unmask, chosen_lp, sub["lp"]),
             version=sub["version"] + jnp.any(unmask, axis=-1).astype(jnp.int32))
  st = {name: st[name].at[:k].set(new[name]) for name in st}
  return st, jnp.where(x_new == model.mask_id, proposal, x_new), new["lp"], None


class MDLMSlots(Slots):
  """S masked-diffusion (MDLM) samplers side by side: per-slot tokens, step and proposal keys."""

  def reset(self) -> None:
    s, l = self.num_slots, self.length
    self._state = dict(x=jnp.full((s, l), self.model.mask_id, jnp.int32), lp=jnp.zeros((s, l), jnp.float32),
                       k_unmask=jnp.zeros((s, 2), jnp.uint32), k_token=jnp.zeros((s, 2), jnp.uint32),
                       version=jnp.zeros((s,), jnp.int32), temperature=jnp.ones((s,), jnp.float32),
                       top_p=jnp.ones((s,), jnp.float32), cand=jnp.zeros((s,), jnp.int32))

  def _admit_fn(self, rows: int):
    if rows not in self._admits:
      self._admits[rows] = jax.jit(functools.partial(_mdlm_admit, rows=rows), donate_argnums=0)
    return self._admits[rows]

  def admit(self, job: Job, slots: list[int]) -> None:
    x = np.full((self.length,), self.model.mask_id, np.int32)
    if job.cond_ids is not None:
      fixed = np.asarray(job.cond_fixed, bool)
      x[fixed] = np.asarray(job.cond_ids, np.int32)[fixed]
    idx_R = self.slot_index(job, slots)
    job.keys = jax.random.PRNGKey(job.seed)  # as sample-baseline / mdlm.generate
    self._state = self._admit_fn(len(idx_R))(self._state, jnp.asarray(idx_R), jnp.asarray(x), job.keys,
                                             jnp.float32(job.temperature), jnp.float32(job.top_p))

  def tick(self, k: int, i_S: np.ndarray, n_S: np.ndarray, active_S: np.ndarray, jobs: list[Job],
           emit: bool = True, passes: int = 1, logprob: bool = True):
    del passes, logprob  # one pass a call (fuses_passes is False); the log p are kept per slot anyway
    if k not in self._ticks:
      self._ticks[k] = jax.jit(functools.partial(_mdlm_tick, self._graphdef, k=k), donate_argnums=1)
    self._state, tokens, lp, _ = self._ticks[k](self._params, self._state, jnp.asarray(i_S), jnp.asarray(n_S),
                                                 jnp.asarray(active_S))
    return tokens, lp, None

  def _warm_admission(self, rows: int) -> None:
    self._state = self._admit_fn(rows)(self._state, jnp.full((rows,), self.num_slots, jnp.int32),
                                       jnp.zeros((self.length,), jnp.int32), jax.random.PRNGKey(0), jnp.float32(1),
                                       jnp.float32(1))

  def score(self, job: Job, tokens_RxL: np.ndarray, logprob_RxL: np.ndarray) -> np.ndarray:
    """Mean negative log-probability of the generated tokens when they were unmasked (lower is better)."""
    free = ~np.asarray(job.cond_fixed, bool) if job.cond_fixed is not None else np.ones(tokens_RxL.shape[1], bool)
    return -np.asarray(logprob_RxL, np.float64)[:, free].mean(axis=1)


# --------------------------------------------------------------------------- the engine


class Engine:
  """Slots, a bounded queue and the loop thread over a backend (a :class:`Slots`: :class:`LangFlowSlots`,
  :class:`ARSlots` or :class:`MDLMSlots`)."""

  def __init__(self, backend, *, queue_limit: int | None = None, scheduler: str = "stationary",
               static_wait_s: float = 0.05, fuse_passes: int = 1):
    if scheduler not in SCHEDULERS:
      raise ValueError(f"unknown scheduler {scheduler!r}; use one of {SCHEDULERS}")
    if fuse_passes < 1:
      raise ValueError(f"fuse_passes={fuse_passes} must be at least 1")
    self.backend = backend
    # Up to this many passes in one call where the backend can (fuses_passes), never past a job's next
    # event: a call's dispatch and host sync then cost once per block instead of once per pass.
    self.fuse_passes = int(fuse_passes) if backend.fuses_passes else 1
    self.num_slots = backend.num_slots
    self.queue_limit = 4 * self.num_slots if queue_limit is None else int(queue_limit)
    self.scheduler = scheduler
    self.static_wait_s = float(static_wait_s)
    s = self.num_slots
    self._slot_job: list[Job | None] = [None] * s
    self._queue: collections.deque[Job] = collections.deque()
    self._cv = threading.Condition()
    self._ids = itertools.count()
    self._stopping = False
    self._thread: threading.Thread | None = None
    self._scorer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine-score")
    # statistics (read by /metrics)
    self.ticks = 0
    self.tick_seconds = 0.0
    self.tick_ema_s = 0.0
    self.slot_passes = 0
    self.completed = 0
    self.failed = 0
    self.cancelled = 0
    self.rejected = 0
    self.tick_errors = 0

  # ---- client side (any thread)

  def start(self) -> "Engine":
    self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
    self._thread.start()
    return self

  def submit(self, job: Job) -> Job:
    if not 1 <= job.rows <= self.num_slots:
      raise ValueError(f"a job of {job.rows} rows does not fit {self.num_slots} slots")
    with self._cv:
      if self._stopping:
        raise EngineStopped("the engine is shutting down")
      if len(self._queue) >= self.queue_limit:
        self.rejected += 1
        raise QueueFull(self.retry_after())
      job.id = next(self._ids)
      job.submitted_at = time.monotonic()
      self._queue.append(job)
      self._cv.notify_all()
    return job

  def cancel(self, job: Job) -> None:
    with self._cv:
      job.cancelled = True
      self._cv.notify_all()

  def retry_after(self) -> int:
    """Seconds until a queued job would likely be admitted (rough: the queue ahead at the current tick rate)."""
    passes = np.mean([j.passes for j in self._queue]) if self._queue else 32
    waves = 1 + len(self._queue) * max(1, np.mean([j.rows for j in self._queue] or [1])) / self.num_slots
    return max(1, int(math.ceil(self.tick_ema_s * passes * waves)))

  def stop(self, drain: bool = True, timeout: float | None = None) -> None:
    """Stops taking jobs; with ``drain`` finishes the queued and running ones first."""
    with self._cv:
      self._stopping = True
      if not drain:
        for job in list(self._queue) + [j for j in self._slot_job if j is not None]:
          job.cancelled = True
      self._cv.notify_all()
    if self._thread is not None:
      self._thread.join(timeout)
    self._scorer.shutdown(wait=True)

  @property
  def stopping(self) -> bool:
    return self._stopping

  def stats(self) -> dict[str, float]:
    with self._cv:
      busy = sum(j is not None for j in self._slot_job)
      return dict(slots=self.num_slots, busy_slots=busy, queue_depth=len(self._queue),
                  queue_limit=self.queue_limit, ticks=self.ticks, tick_seconds=self.tick_seconds,
                  slot_passes=self.slot_passes, completed=self.completed, failed=self.failed,
                  cancelled=self.cancelled, rejected=self.rejected, tick_errors=self.tick_errors)

  def warmup(self, samplers=("euler",)) -> None:
    """Compiles every shape before serving (call before :meth:`start`)."""
    self.backend.warmup(samplers)

  # ---- the loop (engine thread)

  def _emit(self, job: Job, event) -> None:
    if job.on_event is None:
      return
    try:
      job.on_event(event)
    except Exception:  # a consumer's bug must not stop the loop
      log.exception("event callback of job %d failed", job.id)

  def _free(self, job: Job) -> None:
    for s in job.slots:
      if self._slot_job[s] is job:
        self._slot_job[s] = None

  def _admissions(self) -> list[tuple[Job, list[int]]]:
    """Under the lock: the queued jobs that start now, with their slots."""
    while self._queue and self._queue[0].cancelled:
      self.cancelled += 1
      self._queue.popleft()
    free = [s for s, j in enumerate(self._slot_job) if j is None]
    if self.scheduler == "static":
      if len(free) < self.num_slots or not self._queue:
        return []
      want = sum(j.rows for j in self._queue)
      waited = time.monotonic() - self._queue[0].submitted_at
      if want < self.num_slots and waited < self.static_wait_s and not self._stopping:
        return []
    out = []
    while self._queue and self._queue[0].rows <= len(free):
      job = self._queue.popleft()
      if job.cancelled:
        self.cancelled += 1
        continue
      job.slots, free = free[:job.rows], free[job.rows:]
      for s in job.slots:
        self._slot_job[s] = job
      out.append((job, job.slots))
    return out

  def _run(self) -> None:
    while True:
      try:
        if not self._iteration():
          return
      except Exception:  # a bug here must not end the loop: fail what is running and go on
        log.exception("the engine loop hit an error; failing the running jobs")
        with self._cv:
          jobs = {j for j in self._slot_job if j is not None}
          for j in jobs:
            self._free(j)
        self.failed += len(jobs)
        for j in jobs:
          self._emit(j, ErrorEvent(j, "the engine hit an internal error"))
        time.sleep(0.01)

  def _iteration(self) -> bool:
    """One round: admissions, then a tick. False when stopped and drained."""
    with self._cv:
      for job in {j for j in self._slot_job if j is not None and j.cancelled}:
        self._free(job)
        self.cancelled += 1
      admitted = self._admissions()
      busy = any(j is not None for j in self._slot_job)
      if not admitted and not busy:
        if self._stopping and not self._queue:
          return False
        timeout = self.static_wait_s if (self.scheduler == "static" and self._queue) else None
        self._cv.wait(timeout)
        return True
    for job, slots in admitted:
      try:
        self.backend.admit(job, slots)
        job.admitted_at = time.monotonic()
        job.done_passes = 0
      except Exception as e:
        log.exception("admitting job %d failed", job.id)
        with self._cv:
          self._free(job)
        self.failed += 1
        self._emit(job, ErrorEvent(job, f"admission failed: {e}"))
    self._tick()
    return True

  def _tick(self) -> None:
    s = self.num_slots
    with self._cv:
      slot_job = list(self._slot_job)
    active = np.array([j is not None for j in slot_job])
    if not active.any():
      return
    jobs = list({id(j): j for j in slot_job if j is not None}.values())
    i_S = np.zeros((s,), np.int32)
    n_S = np.ones((s,), np.int32)
    for j in jobs:
      i_S[j.slots] = j.done_passes
      n_S[j.slots] = j.passes
    k = max(_bucket(int(np.flatnonzero(active)[-1]) + 1, s), self.backend.min_bucket)
    m = self._block(jobs, int(active.sum()))
    ends = any(j.done_passes + m >= j.passes for j in jobs)
    emit = ends or any(j.stream_every and (j.done_passes + m) % j.stream_every == 0 for j in jobs)
    t0 = time.monotonic()
    try:
      tokens, logprob, gamma = self.backend.tick(k, i_S, n_S, active, jobs, emit, passes=m, logprob=ends)
      gamma_host = None if gamma is None else np.asarray(gamma)  # waits for the tick
      if gamma is None:
        jax.block_until_ready(tokens)
    except Exception as e:
      log.exception("a tick failed; failing its %d jobs and resetting the slots", len(jobs))
      self.tick_errors += 1
      with self._cv:
        for j in jobs:
          self._free(j)
      self.failed += len(jobs)
      for j in jobs:
        self._emit(j, ErrorEvent(j, f"the engine step failed: {e}"))
      try:
        self.backend.reset()
      except Exception:
        log.exception("resetting the slots failed")
      return
    dt = time.monotonic() - t0
    self.ticks += 1
    self.tick_seconds += dt
    self.tick_ema_s = dt / m if self.ticks == 1 else 0.9 * self.tick_ema_s + 0.1 * dt / m  # per pass
    self.slot_passes += m * int(active.sum())
    host_tokens = host_lp = None
    for j in jobs:
      j.done_passes += m
      final = j.done_passes >= j.passes
      due = final or (j.stream_every and j.done_passes % j.stream_every == 0)
      if not due or j.cancelled:
        continue
      if host_tokens is None:
        host_tokens = np.asarray(tokens)
      g = None if gamma_host is None else float(gamma_host[j.slots[0]])
      rows = host_tokens[j.slots]
      if not final:
        self._emit(j, PassEvent(j, j.done_passes, j.passes, g, rows))
        continue
      if host_lp is None:
        host_lp = np.asarray(logprob)
      lp = host_lp[j.slots]
      with self._cv:
        self._free(j)
      j.finished_at = time.monotonic()
      if j.score:
        self._scorer.submit(self._finish_scored, j, rows, lp, g)
      else:
        self.completed += 1
        self._emit(j, DoneEvent(j, rows, lp, None, g))

  def _block(self, jobs: list[Job], busy: int) -> int:
    """Passes the next call runs: up to ``fuse_passes``, none past a job's next stream event or its end
    (so every event and exit falls on a block's last pass), and one while a waiting request could take
    free slots (it joins at the next pass, as without fusing)."""
    m = self.fuse_passes
    if m == 1:
      return 1
    for j in jobs:
      m = min(m, j.passes - j.done_passes)
      if j.stream_every:
        m = min(m, j.stream_every - j.done_passes % j.stream_every)
    with self._cv:
      if self._queue and self._queue[0].rows <= self.num_slots - busy:
        return 1
    return max(m, 1)

  def _finish_scored(self, job: Job, rows: np.ndarray, lp: np.ndarray, gamma: float | None) -> None:
    try:
      scores = self.backend.score(job, rows, lp)
    except Exception as e:
      log.exception("scoring job %d failed", job.id)
      self.failed += 1
      self._emit(job, ErrorEvent(job, f"scoring failed: {e}"))
      return
    self.completed += 1
    self._emit(job, DoneEvent(job, rows, lp, np.asarray(scores), gamma))
