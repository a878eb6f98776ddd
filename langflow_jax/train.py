"""The trainer: ``train_and_evaluate(config, workdir)``.

One jitted step takes ``(state, batch)`` with explicit shardings on the mesh
from ``config.mesh``; the same code runs on one CPU or a pod slice. The step
scans over ``train.grad_accum`` micro-batches, applies AdamW with warm-up and
decay, gradient clipping and an EMA of the weights (used for evaluation and
sampling). Metrics are sums with token-count denominators. A NaN or Inf loss
stops the run with a clear error; the last good checkpoint stays.

Determinism: all randomness derives from ``train.seed`` by explicit key
splitting (one key per step, folded from the step number), and the data order
is a function of (``data.seed``, step). The same config gives the same losses
bit for bit, and a resumed run continues exactly.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import math
import os
import pathlib
import signal
import socket
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from langflow_jax import checkpoint as ckpt_lib
from langflow_jax import config as config_lib
from langflow_jax import methods
from langflow_jax import objective as objective_lib
from langflow_jax import parallel, reporting
from langflow_jax.checkpoint import load_model, load_state  # noqa: F401 (their home before checkpoint.py)
from langflow_jax.data import pipeline
from langflow_jax.data.tokenizer import check_matches_model, load_tokenizer
from langflow_jax.errors import CheckpointError, ConfigError, NonFiniteLossError, UserError
from langflow_jax.files import write_atomic
from langflow_jax.methods import create_model
from langflow_jax.model import count_params
# The train state and optimizer live in train_state.py; these names stay importable from here.
from langflow_jax.train_state import (TRAIN_KEY_SALT, ModelParts, TrainState, abstract_train_state,  # noqa: F401
                                      ema_update, fresh_train_state, learning_rate_schedule, make_optimizer,
                                      split_model, state_from_model, training_root_key)

log = logging.getLogger(__name__)
Array = jax.Array


def init_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     tx: optax.GradientTransformation) -> tuple[ModelParts, TrainState, Any]:
  """Sharded initialisation: abstract shapes, shardings, then one jitted init.

  Full-size weights never sit on one device: ``jit(out_shardings=...)`` places
  every parameter where the rules say as it is created.
  """
  graphdef, abstract_state = abstract_train_state(config, tx)
  state_shardings = parallel.tree_shardings(abstract_state, mesh)
  state = jax.jit(lambda: fresh_train_state(config, tx), out_shardings=state_shardings)()
  return ModelParts.from_state(graphdef, state), state, state_shardings


# --------------------------------------------------------------------------- steps


def training_objective(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Callable:
  """The method's objective with what it reads bound: a student's teacher is read from its run here,
  its weights placed on ``mesh`` by the sharding rules like the student's."""
  load_run = functools.partial(ckpt_lib.load_model, mesh=mesh)
  return methods.for_config(config).training_objective(config, load_run=load_run)


def make_grad_fn(config: ml_collections.ConfigDict, parts: ModelParts, objective: Callable | None = None) -> Callable:
  """``(params, batch, key, skip_scale) -> (grads, terms, gamma_B, ce_B)`` for one global batch.

  ``objective`` is the method's :meth:`~langflow_jax.methods.Method.training_objective`
  (built from ``config`` when not given).

  The batch is split into ``train.grad_accum`` micro-batches scanned in
  turn. Micro-batch k takes rows k, k + accum, ... so that every micro-batch
  is spread over all data-parallel devices (contiguous row blocks would sit
  on a few of them). Terms are sums with whole-batch denominators, so the
  result does not depend on ``accum``.
  """
  objective = objective or training_objective(config)
  obj_cfg = config.objective
  accum = int(config.train.grad_accum)

  def grad_fn(params: nnx.State, batch: dict[str, Array], key: Array, skip_scale: Array):
    ids, mask = batch["ids"], batch["mask"]
    b = ids.shape[0]
    num_tokens = jnp.sum(mask.astype(jnp.float32))
    num_seqs = jnp.sum((jnp.sum(mask, axis=-1) > 0).astype(jnp.float32))

    def micro(x):
      x = x.reshape((b // accum, accum) + x.shape[1:]).swapaxes(0, 1)
      return parallel.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    def loss_fn(params, ids_m, mask_m, key_m):
      model = parts.merge(params)
      out = objective(model, ids_m, mask_m, key_m, skip_scale=skip_scale)
      return objective_lib.total_loss(out.terms, obj_cfg, num_tokens, num_seqs), out

    def accumulate(carry, xs):
      grads_acc, terms_acc = carry
      (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *xs)
      grads = parallel.constrain_tree(jax.tree.map(jnp.add, grads_acc, grads))
      return (grads, objective_lib.add_terms(terms_acc, out.terms)), (out.gamma_B, out.ce_per_token_B)

    zeros = parallel.constrain_tree(jax.tree.map(jnp.zeros_like, params))
    (grads, terms), (gamma, ce) = jax.lax.scan(
        accumulate, (zeros, objective_lib.zero_terms()),
        (micro(ids), micro(mask), jax.random.split(key, accum)))
    # back to batch order: row j * accum + k was row j of micro-batch k
    return grads, terms, gamma.swapaxes(0, 1).reshape(-1), ce.swapaxes(0, 1).reshape(-1)

  return grad_fn


def make_train_step(config: ml_collections.ConfigDict, parts: ModelParts, tx: optax.GradientTransformation,
                    objective: Callable | None = None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The pure train step; jit it with shardings (see :func:`jit_train_step`)."""
  grad_fn = make_grad_fn(config, parts, objective)

  def train_step(state: TrainState, batch: dict[str, Array]) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(state.rng, state.step)
    skip_scale = objective_lib.skip_warmup_scale(state.step, config.objective.skip_warmup_steps)
    grads, terms, gamma, ce = grad_fn(state.params, batch, key, skip_scale)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, state.step, config.optimizer.ema_decay)
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    metrics = {
        "terms": terms,
        "grad_norm": optax.global_norm(grads),
        "update_norm": optax.global_norm(updates),
        "param_norm": optax.global_norm(params),
        "skip_scale": skip_scale,
        "gamma_B": gamma,
        "ce_B": ce,
    }
    return new_state, metrics

  return train_step


def batch_shardings(mesh: jax.sharding.Mesh) -> dict[str, jax.sharding.NamedSharding]:
  return {"ids": parallel.batch_sharding(mesh), "mask": parallel.batch_sharding(mesh)}


def jit_train_step(step_fn, state_shardings, mesh):
  """Explicit in/out shardings; the old state's buffers are donated."""
  return parallel.mesh_jit(step_fn, mesh, in_shardings=(state_shardings, batch_shardings(mesh)),
                           out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=(0,))


def make_eval_step(config: ml_collections.ConfigDict, parts: ModelParts,
                   mesh: jax.sharding.Mesh | None = None, param_shardings: Any = None,
                   objective: Callable | None = None):
  """Held-out loss of the same objective without dropout, summed terms.

  With ``mesh`` (and the parameters' shardings) it is jitted with explicit
  shardings like the train step.
  """
  objective = objective or training_objective(config)

  def eval_step(params: nnx.State, batch: dict[str, Array], key: Array) -> objective_lib.LossTerms:
    model = parts.merge(params)
    return objective(model, batch["ids"], batch["mask"], key, train=False).terms

  if mesh is None:
    return jax.jit(eval_step)
  rep = parallel.replicated(mesh)
  return parallel.mesh_jit(eval_step, mesh, in_shardings=(param_shardings, batch_shardings(mesh), rep),
                           out_shardings=rep)


def evaluate_loss(eval_step, params, split: pipeline.PackedSplit, config, mesh) -> dict[str, float]:
  """Mean held-out CE over ``train.eval_batches`` fixed batches (fixed keys)."""
  batch_size = config.train.batch_size
  terms = objective_lib.zero_terms()
  key = jax.random.PRNGKey(config.train.seed + 1)
  index, count = parallel.data_shard(mesh)
  for i, local in enumerate(pipeline.eval_batches(split, batch_size, config.train.eval_batches, index, count)):
    batch = parallel.global_batch(local, mesh)
    terms = objective_lib.add_terms(terms, eval_step(params, batch, jax.random.fold_in(key, i)))
  m = objective_lib.metrics_from_terms(jax.device_get(terms), config.objective.schedule_loss_weight)
  return {"eval/ce": m["ce"], "eval/loss": m["loss"]}


# --------------------------------------------------------------------------- loop


def host_metrics(metrics: dict, config: ml_collections.ConfigDict) -> dict[str, float]:
  m = objective_lib.metrics_from_terms(metrics["terms"], config.objective.schedule_loss_weight)
  for k in ("grad_norm", "update_norm", "param_norm", "skip_scale"):
    m[k] = float(metrics[k])
  return m


def schedule_summary(model: nnx.Module) -> dict[str, float]:
  """The learned schedule's parameters (none for models without one, e.g. the AR baseline)."""
  schedule = getattr(model, "schedule", None)
  return {} if schedule is None else {f"schedule/{k}": v for k, v in schedule.summary().items()}


class _Preemption:
  """SIGTERM (preemption) or a first Ctrl-C sets a flag; the loop saves a checkpoint
  and exits cleanly. A second Ctrl-C stops at once (the last checkpoint stays)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested: str | None = None
    self._previous: dict = {}

  def __enter__(self):
    for sig in self.SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker): no handler
        pass
    return self

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name
    if signum == signal.SIGINT:
      print("interrupted: saving a checkpoint after this step, then stopping (Ctrl-C again stops at once).",
            file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def _check_workdir_writable(workdir: pathlib.Path) -> None:
  """Creates nothing: the workdir, or the nearest directory above it that exists, must be
  a directory this process may create files in (the full check follows in _check_workdir)."""
  existing = workdir.absolute()
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    reason = os.strerror(errno.ENOTDIR)
  elif not os.access(existing, os.W_OK | os.X_OK):
    reason = os.strerror(errno.EACCES)
  else:
    return
  raise UserError(f"cannot write to workdir {workdir} ({reason}).",
                  "choose a writable --workdir (a directory you may create files in, on a disk with space).")


LOCK_FILE = ".lock"  # in the workdir: flock-ed by the training process, holding "<pid> <host>"


class _RunLock:
  """One training process per run directory: ``flock`` on ``WORKDIR/.lock``.

  A second ``train`` on the same workdir stops with one line naming the pid that holds
  it. The kernel releases the lock when its process ends, however it ends (kill -9
  included), so a lock file left behind by a killed run never blocks the next one.
  Process 0 of a multi-host run takes it for all of them.
  """

  def __init__(self, workdir: pathlib.Path):
    self.path = workdir / LOCK_FILE
    self._fd: int | None = None

  def __enter__(self) -> "_RunLock":
    if jax.process_index() != 0:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 256, 0).decode(errors="replace").split()
      os.close(fd)
      who = f"pid {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "another process"
      kill = f" (kill {holder[0]})" if holder else ""
      raise UserError(
          f"another training process ({who}) is already using workdir {self.path.parent}.",
          f"wait for it to finish or stop it{kill}, or train in another --workdir; two runs in one "
          "directory would write every checkpoint and metrics line twice.") from None
    except OSError as e:  # a file system without locks (some network disks)
      os.close(fd)
      log.warning("cannot lock %s (%s); make sure no other run trains in this workdir", self.path, e.strerror)
      return self
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      os.close(self._fd)  # releases the flock
      self._fd = None


def _check_workdir(workdir: pathlib.Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_test.{jax.process_index()}.{os.getpid()}"  # one per process on shared disks
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise UserError(f"cannot write to workdir {workdir} ({e.strerror}).",
                    "choose a writable --workdir (a directory you may create files in, on a disk with space).") from e


def _start_state(config, workdir, checkpointer, state, state_shardings, tokenizer: dict,
                 train_split: pipeline.PackedSplit):
  """Where a run starts, in order of precedence:

  1. the newest readable checkpoint in ``workdir`` (resume: everything restored,
     including optimizer, step, RNG and data position);
  2. else ``train.restore_from``: params and EMA of another run, with a fresh
     optimizer, step 0 and the data from the start (fine-tuning);
  3. else a fresh initialisation.

  Returns (state, data_state, extra metadata for the checkpoints).
  """
  abstract = ckpt_lib.with_shardings(jax.eval_shape(lambda: state), state_shardings)
  restore_from = config.train.restore_from
  if checkpointer.latest_step() is not None:
    try:
      state, meta, step = checkpointer.restore(abstract, config=config)
    except CheckpointError:
      # a different tokenizer explains a shape mismatch better than the shapes do
      ckpt_lib.check_tokenizer(checkpointer.read_meta(), tokenizer, str(workdir))
      raise
    ckpt_lib.check_tokenizer(meta, tokenizer, str(workdir))
    log.info("resuming %s from checkpoint step %d", workdir, step)
    if restore_from:
      log.info("train.restore_from=%s is ignored: %s already has checkpoints, so the run resumes", restore_from,
               workdir)
    changed = config_lib.differences(config_lib.from_json(meta["config"]), config)
    if changed:
      log.info("config changes since the checkpoint: %s", ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed))
    return state, meta.get("data_state", {"step": int(state.step)}), {"restored_from": meta.get("restored_from")}
  if restore_from:
    source, step = ckpt_lib.open_run(restore_from)
    try:
      weights, meta, step = source.restore_weights(
          {"params": abstract.params, "ema_params": abstract.ema_params, "buffers": abstract.buffers}, step,
          config=config)
    except CheckpointError:
      ckpt_lib.check_tokenizer(source.read_meta(step), tokenizer, str(restore_from))
      raise
    ckpt_lib.check_tokenizer(meta, tokenizer, str(restore_from))
    origin = f"{source.directory}/{step}"
    log.info("starting from the weights of %s (params and EMA; fresh optimizer, step 0)", origin)
    weights = methods.for_config(config).start_weights(weights)
    return state.replace(params=weights["params"], ema_params=weights["ema_params"],
                         buffers=weights["buffers"]), {"step": 0}, \
        {"restored_from": origin}
  log_prior_V = None
  bias_init = methods.for_config(config).head_bias_init(config)
  if bias_init == "unigram" or config.schedule.entropy_init == "unigram":
    log_prior_V = pipeline.unigram_log_prior(train_split, config.model.vocab_size)
  if bias_init == "unigram":
    state = with_output_bias(state, log_prior_V)
    log.info("output bias initialised to the training split's log unigram frequencies")
  if config.schedule.entropy_init == "unigram":
    state, entropy = with_schedule_entropy(state, log_prior_V)
    if entropy is not None:
      log.info("schedule entropy H_inf initialised to the training split's unigram entropy, %.3f nats", entropy)
  return state, {"step": 0}, {}


OUTPUT_BIAS_PATH = ("output_layer", "linear", "bias")
SCHEDULE_ENTROPY_PATH = ("schedule", "entropy")


def with_param(state: TrainState, suffix: tuple[str, ...], value: np.ndarray) -> tuple[TrainState, bool]:
  """``state`` with every parameter whose path ends in ``suffix`` (raw and EMA) set to
  ``value``, its dtype and sharding kept; and whether there was one."""
  found = []

  def put(path, leaf):
    # nnx.State paths end in the variable's keys, then (for Variables) its ".value"
    keys = [k for k in (getattr(p, "key", getattr(p, "name", None)) for p in path) if k != "value"]
    if tuple(keys[-len(suffix):]) != suffix:
      return leaf
    found.append(path)
    return jax.device_put(jnp.asarray(value, leaf.dtype).reshape(leaf.shape), leaf.sharding)

  params = jax.tree_util.tree_map_with_path(put, state.params)
  ema = jax.tree_util.tree_map_with_path(put, state.ema_params)
  return state.replace(params=params, ema_params=ema), bool(found)


def with_output_bias(state: TrainState, log_prior_V: np.ndarray) -> TrainState:
  """The head's bias (raw and EMA) set to ``log_prior_V`` (centred).

  With the skip term, a LangFlow whose network output is this bias alone is
  the exact context-free posterior (uniform-prior likelihood times the
  unigram prior); the network then only has to learn what context adds.
  """
  state, found = with_param(state, OUTPUT_BIAS_PATH, log_prior_V - log_prior_V.mean())
  if not found:
    raise ConfigError("objective.output_bias_init=unigram: this model has no output_layer.linear.bias.",
                      "use --config.objective.output_bias_init=zeros.")
  return state


def with_schedule_entropy(state: TrainState, log_prior_V: np.ndarray) -> tuple[TrainState, float | None]:
  """The learned schedule's H_inf set to the entropy of the unigram prior, and that value
  (``None``, state unchanged, for models without one: fixed schedules, the baselines).

  H_inf is the plateau of the CE curve at infinite noise, where the best
  denoiser is the unigram prior, so the data know it before any training; a
  starting value far from it (the OWT-fitted 7.02 on a 33-token corpus) makes
  the early fit widen the schedule over noise levels that teach nothing.
  """
  p_V = np.exp(log_prior_V.astype(np.float64))
  entropy = float(-np.sum(p_V * log_prior_V))
  state, found = with_param(state, SCHEDULE_ENTROPY_PATH, np.float32(entropy))
  return state, entropy if found else None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains ``config`` in ``workdir``, resuming from its newest checkpoint.

  The config, mesh, model shapes and data are checked before the workdir is
  created; the workdir is then locked (``.lock``) for the whole run, so a
  second process on it stops with a clear error. Returns a summary: final
  step, last train and eval metrics, timings (and ``preempted``: the signal's
  name, when SIGTERM or Ctrl-C stopped the run after a checkpoint).
  """
  # Everything that can be checked is checked before the workdir is created or locked, so
  # that a run that does not start leaves nothing behind.
  config_lib.validate(config)
  workdir = pathlib.Path(workdir).expanduser()
  _check_workdir_writable(workdir)
  mesh = parallel.make_mesh(config.mesh)
  parallel.check_batch(config.train.batch_size, mesh, grad_accum=config.train.grad_accum)
  nnx.eval_shape(lambda: create_model(config, seed=config.train.seed))  # head widths, schedule: no arrays
  if config.train.restore_from and not ckpt_lib.checkpoint_dir(workdir).is_dir():
    ckpt_lib.locate(config.train.restore_from)  # a missing start run, before anything is created
  tokenizer = load_tokenizer(config.data.tokenizer)
  check_matches_model(config, tokenizer)
  train_split = pipeline.load_split(config.data, "train", tokenizer)
  heldout_split = pipeline.load_split(config.data, "heldout", tokenizer)
  _check_workdir(workdir)
  with _RunLock(workdir):
    return _train(config, workdir, mesh, tokenizer, train_split, heldout_split)


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh: jax.sharding.Mesh, tokenizer,
           train_split: pipeline.PackedSplit, heldout_split: pipeline.PackedSplit) -> dict[str, Any]:
  """The run itself, in a created and locked workdir (see :func:`train_and_evaluate`)."""
  tx = make_optimizer(config.optimizer, config.train.steps)
  parts, state, state_shardings = init_train_state(config, mesh, tx)
  checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), keep=config.train.keep_checkpoints,
                                       keep_period=config.train.keep_period)
  tokenizer_info = ckpt_lib.tokenizer_meta(tokenizer)
  try:
    state, data_state, origin = _start_state(config, workdir, checkpointer, state, state_shardings,
                                             tokenizer_info, train_split)
  except BaseException:
    checkpointer.close()
    raise
  parts = ModelParts.from_state(parts.graphdef, state)  # restored buffers, not the donated ones
  method = methods.for_config(config)
  run_meta = {"tokenizer": tokenizer_info, "mesh": {"shape": dict(mesh.shape), "devices": jax.device_count(),
                                                    "processes": jax.process_count()}, **origin}
  if method.card(config) is not None:
    run_meta["card"] = method.card(config)
  if jax.process_index() == 0:
    write_atomic(workdir / "config.json", config_lib.to_json(config))

  start = int(state.step)
  reporting.drop_rows_after(workdir, start)  # rows of steps lost with a killed run get rewritten
  data_index, data_count = parallel.data_shard(mesh)
  it = pipeline.BatchIterator(train_split, config.train.batch_size, config.data.seed,
                              process_index=data_index, process_count=data_count,
                              prefetch=config.data.prefetch, threads=config.data.prefetch_threads)
  it.set_state(data_state)
  objective = training_objective(config, mesh)  # a student's teacher is read once, here
  train_step = jit_train_step(make_train_step(config, parts, tx, objective), state_shardings, mesh)
  eval_step = make_eval_step(config, parts, mesh, state_shardings.ema_params, objective)
  writer = reporting.MetricWriter(workdir)
  timer = reporting.PhaseTimer()
  progress = reporting.Progress(config.train.steps, start, config.train.progress)
  tokens_per_step = config.train.batch_size * config.data.seq_len
  summary: dict[str, Any] = {"start_step": start, "num_params": count_params(parts.merge(state.params))}
  last_train, last_eval = {}, {}
  pending = None  # (step, metrics) of the last dispatched step, fetched one step late
  window_terms = objective_lib.zero_terms()  # loss sums since the last log line
  window_start, window_steps = time.perf_counter(), 0
  last_good_step = checkpointer.latest_step()

  def save(step: int) -> None:
    nonlocal last_good_step
    with timer.phase("checkpoint"):
      checkpointer.save(step, state, ckpt_lib.meta_json(config, it.get_state(), run_meta), force=True)
    last_good_step = step

  def fetch(step: int, metrics: dict) -> dict[str, float]:
    host = host_metrics(jax.device_get(metrics), config)
    if not all(math.isfinite(host[k]) for k in ("loss", "ce", "grad_norm")):
      raise NonFiniteLossError(
          f"training loss became {host['loss']} at step {step} (grad norm {host['grad_norm']}); "
          f"the last good checkpoint is step {last_good_step}.",
          "lower --config.optimizer.lr or keep --config.optimizer.grad_clip > 0, then rerun "
          "the same command to resume from the last good checkpoint.")
    return host

  with _Preemption() as preemption:
    try:
      for step in range(start, config.train.steps):
        with timer.phase("data"):
          batch = parallel.global_batch(next(it), mesh)
        with timer.phase("step"):
          state, metrics = train_step(state, batch)
          window_terms = objective_lib.add_terms(window_terms, metrics["terms"])
          window_steps += 1
        done = step + 1
        if pending is not None:
          fetch(*pending)  # one step late: the host never stalls the device
        pending = (done, metrics)
        is_last = done == config.train.steps
        if done % config.train.log_every == 0 or is_last or preemption.requested:
          with timer.phase("step"):
            last_train = fetch(*pending)
            # report the whole window's token-weighted means, not the last step's
            last_train.update(objective_lib.metrics_from_terms(jax.device_get(window_terms),
                                                               config.objective.schedule_loss_weight))
          pending, window_terms = None, objective_lib.zero_terms()
          elapsed = time.perf_counter() - window_start
          last_train.update({
              "lr": float(learning_rate_schedule(config.optimizer, config.train.steps)(done - 1)),
              "tokens_per_s": window_steps * tokens_per_step / max(elapsed, 1e-9),
              "steps_per_s": window_steps / max(elapsed, 1e-9),
              **schedule_summary(parts.merge(state.params)),
              **timer.pop(),
          })
          writer.write(done, {f"train/{k}" if "/" not in k else k: v for k, v in last_train.items()})
          progress.update(window_steps, loss=f"{last_train['loss']:.3f}",
                          tok_s=f"{last_train['tokens_per_s']:.0f}")
          window_start, window_steps = time.perf_counter(), 0
          if jax.process_index() == 0:
            np.savez(workdir / "last_gamma_ce.npz", gamma=np.asarray(metrics["gamma_B"]),
                     ce=np.asarray(metrics["ce_B"]))
        if done % config.train.eval_every == 0 or is_last:
          with timer.phase("eval"):
            last_eval = evaluate_loss(eval_step, state.ema_params, heldout_split, config, mesh)
          writer.write(done, last_eval)
          progress.write(f"step {done}: train ce {last_train.get('ce', float('nan')):.4f}  "
                         f"held-out ce (EMA) {last_eval['eval/ce']:.4f}")
        if done % config.train.checkpoint_every == 0 or is_last or preemption.requested:
          if pending is not None:
            fetch(*pending)  # never checkpoint a state whose loss was not checked
            pending = None
          save(done)
        if preemption.requested:
          checkpointer.wait()
          progress.write(f"{preemption.requested}: saved checkpoint at step {done} in {checkpointer.directory}; "
                         "rerun the same command to resume.")
          summary["preempted"] = preemption.requested
          break
    except BaseException:
      # keep the error that stopped the run; a pending save still completes
      progress.close()
      writer.close()
      try:
        checkpointer.close()
      except Exception as e:  # noqa: BLE001 - the first error is the one to report
        log.warning("the last checkpoint save did not complete either: %s", e)
      raise
    progress.close()
    writer.close()
    checkpointer.close()

  summary.update(final_step=int(state.step), train=last_train, eval=last_eval)
  if config.train.plot and jax.process_index() == 0:
    from langflow_jax import plots

    summary["plots"] = plots.training_plots(workdir, getattr(parts.merge(state.params), "schedule", None))
  return summary
