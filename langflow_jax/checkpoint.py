"""Orbax checkpoints: train state, data position and resolved config in one step.

A run directory keeps its checkpoints under ``checkpoints/<step>/``, each with
two items:

* ``state``: the :class:`~langflow_jax.train_state.TrainState` pytree (params, EMA,
  optimizer state, step, RNG key), restored onto whatever mesh the caller
  asks for (abstract target with shardings), so a different device count or
  mesh shape is fine;
* ``meta``: JSON with the resolved config, the package version and git
  commit, the data iterator state, the tokenizer's fingerprint and the mesh
  that saved it.

Why nothing is lost:

* Orbax writes a step to ``<step>.orbax-checkpoint-tmp*`` and renames it when
  every file is written, so a listed step is always complete; the leftovers of
  an interrupted save are removed when the next run starts.
* Old steps are deleted only after a newer save has completed (Orbax's
  finalize thread waits for the commit before it applies the keep policy), and
  they are first renamed into ``deleted/``, so a kill in the middle of a
  deletion never leaves a half-deleted step that looks like a checkpoint.
* A step that is listed but unreadable (truncated or damaged files) is skipped
  with a warning and the next older one is used; a resuming run moves it to
  ``damaged/`` so that it can be inspected and is not overwritten.
* A failed save (full disk, permissions) stops the run with one clear error
  and leaves the previous steps as they were.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import pathlib
import shutil
import subprocess
import time
from typing import Any, Callable

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from langflow_jax import __version__
from langflow_jax import config as config_lib
from langflow_jax import parallel
from langflow_jax.data.tokenizer import fingerprint, load_tokenizer
from langflow_jax.errors import CheckpointError, UserError, environment_error
from langflow_jax.train_state import ModelParts, TrainState, abstract_train_state, make_optimizer

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
DELETED_DIR = "deleted"   # steps past the keep policy, renamed here and then removed
DAMAGED_DIR = "damaged"   # unreadable steps moved aside by a resuming run (kept for inspection)


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir).expanduser().resolve() / CHECKPOINT_DIR


def locate(path: str | pathlib.Path) -> tuple[pathlib.Path, int | None]:
  """(checkpoints directory, step or None) for a run directory, its ``checkpoints/``
  directory or one step directory (``runs/base/checkpoints/600``)."""
  path = pathlib.Path(path).expanduser().resolve()
  if not path.exists() and path.name.isdigit() and path.parent.name == CHECKPOINT_DIR and path.parent.is_dir():
    raise missing_step(path.parent, int(path.name), _listed_steps(path.parent))
  if not path.exists():
    raise CheckpointError(f"{path} does not exist.",
                          "pass the --workdir of a training run (langflow-jax train --workdir ... makes one).")
  if (path / CHECKPOINT_DIR).is_dir():
    return path / CHECKPOINT_DIR, None
  if path.name.isdigit() and (path / "state").is_dir():
    return path.parent, int(path.name)
  if path.name == CHECKPOINT_DIR and path.is_dir():
    return path, None
  raise CheckpointError(f"{path} has no checkpoints (it is empty or not a training run).",
                        f"train first (langflow-jax train --workdir {path}) or pass another run directory.")


def _listed_steps(directory: pathlib.Path) -> list[int]:
  """The complete steps in a checkpoints directory, by name (no Orbax needed)."""
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def missing_step(directory: pathlib.Path, step: int, steps: list[int]) -> CheckpointError:
  """The error for a step that is not there: which steps are."""
  if not steps:
    return CheckpointError(f"checkpoint step {step} does not exist: {directory} holds no checkpoint yet.",
                           "train first, or pass another run's checkpoint.")
  listed = ", ".join(map(str, steps[:20])) + (f" and {len(steps) - 20} more" if len(steps) > 20 else "")
  return CheckpointError(f"checkpoint step {step} does not exist in {directory}; its steps are {listed}.",
                         f"pass one of them, e.g. {directory}/{steps[-1]} (the newest).")


def describe_error(e: BaseException, limit: int = 400) -> str:
  """``Type: first line`` of a restore failure, for one log line.

  Orbax wraps a TensorStore read error in an ``Exception`` whose text ends in the
  repr of a pybind11 method and a multi-line spec; the wrapped error (which array,
  what is wrong with it) is the useful part, so it is shown instead.
  """
  shown = e
  if "See full TensorStore details" in str(e) and e.__cause__ is not None:
    shown = e.__cause__
  text = str(shown).split(" See full TensorStore details")[0].strip()
  text = text.splitlines()[0] if text else ""
  if len(text) > limit:
    text = text[:limit - 3] + "..."
  return f"{type(shown).__name__}: {text}" if text else type(shown).__name__


# (checkpoints directory, step) already reported as unreadable in this process: a command
# that reads a step twice (its config, then its weights) warns once.
_WARNED_DAMAGED: set[tuple[str, int]] = set()


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
  """The commit of the source tree this package runs from, if it is a git checkout."""
  root = pathlib.Path(__file__).resolve().parent.parent
  if not (root / ".git").exists():
    return None
  try:
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                         timeout=5, check=True)
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def array_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{"params.backbone.vocab_embed.embedding": (shape, dtype)}`` for every array leaf.

  Works for abstract trains states (nnx Variables end in ``.value``) and for
  Orbax's stored tree metadata alike, so the two can be compared.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not hasattr(leaf, "shape"):
      continue
    names = [_key_name(k) for k in path]
    if names and names[-1] == "value":
      names = names[:-1]
    out[".".join(names)] = (tuple(leaf.shape), str(getattr(leaf, "dtype", "")))
  return out


def tree_differences(saved: dict, wanted: dict, limit: int = 3) -> list[str]:
  """Human-readable differences between two :func:`array_shapes` maps (at most ``limit``)."""
  diffs = []
  for key in sorted(set(saved) | set(wanted)):
    if key not in wanted:
      diffs.append(f"{key} is in the checkpoint only")
    elif key not in saved:
      diffs.append(f"{key} is missing from the checkpoint")
    elif saved[key][0] != wanted[key][0]:
      diffs.append(f"{key} has shape {saved[key][0]} in the checkpoint but {wanted[key][0]} here")
    elif saved[key][1] != wanted[key][1]:
      diffs.append(f"{key} is {saved[key][1]} in the checkpoint but {wanted[key][1]} here")
  if len(diffs) > limit:
    diffs = diffs[:limit] + [f"{len(diffs) - limit} more"]
  return diffs


class Checkpointer:
  """A fault-tolerant wrapper around ``ocp.CheckpointManager``.

  ``keep`` most recent steps are kept, plus every step divisible by
  ``keep_period`` (0: none). ``read_only`` (eval, sample) never creates,
  cleans up or deletes anything.
  """

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, keep_period: int = 0,
               async_save: bool = True, read_only: bool = False):
    self.directory = pathlib.Path(directory).expanduser().resolve()
    self.read_only = read_only
    policies = ocp.checkpoint_managers
    keep_policy = [policies.LatestN(n=keep)] + ([policies.EveryNSteps(interval_steps=keep_period)]
                                                if keep_period else [])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else policies.AnyPreservationPolicy(keep_policy),
        enable_async_checkpointing=async_save and not read_only,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        todelete_subdir=None if read_only else DELETED_DIR,
        save_interval_steps=0 if read_only else 1,
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    try:
      if read_only:  # orbax warns that a read-only directory is read-only
        absl_log.setLevel(max(level, logging.ERROR))
      with _translated(lambda e: environment_error(e, f"opening checkpoints in {self.directory}")):
        self._manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)
    finally:
      absl_log.setLevel(level)
    self._saving: int | None = None  # the step whose async write may still be running
    self._empty_deleted()

  # ------------------------------------------------------------------ listing

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  # ------------------------------------------------------------------ saving

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Starts an (async) save of ``state`` and ``meta`` at ``step``.

    A failure of this save or of the previous one's background write raises
    :class:`CheckpointError`; the steps already on disk stay as they were.
    """
    self.wait()  # surfaces a failed previous write before starting a new one
    self._empty_deleted()
    _WARNED_DAMAGED.discard((str(self.directory), int(step)))  # a new step of that number: warn anew
    meta = dict(meta, step=int(step), version=__version__, git_commit=git_commit(), saved_at=time.time())
    self._saving = int(step)
    with _translated(self._save_error):
      return self._manager.save(
          int(step),
          args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
          force=force)

  def _save_error(self, e: Exception) -> CheckpointError | None:
    """A one-line error for a save that failed for a user-fixable reason (else None: a bug)."""
    step, self._saving = self._saving, None
    err = environment_error(e, f"saving checkpoint step {step} to {self.directory}")
    if err is None:
      return None
    self._manager.reload()
    good = [s for s in self.all_steps() if s != step]
    kept = f"the last complete checkpoint is step {good[-1]}" if good else "no checkpoint was completed yet"
    return CheckpointError(f"{err.problem[:-1]}; {kept}.", err.fix)

  def wait(self) -> None:
    """Blocks until the last save is on disk (raises if it failed)."""
    with _translated(self._save_error):
      self._manager.wait_until_finished()
    self._saving = None

  def close(self) -> None:
    try:
      self.wait()
      self._empty_deleted()
    finally:
      self._manager.close()

  def _empty_deleted(self) -> None:
    """Removes steps that the keep policy already renamed into ``deleted/``."""
    if self.read_only or jax.process_index() != 0:
      return
    shutil.rmtree(self.directory / DELETED_DIR, ignore_errors=True)

  # ------------------------------------------------------------------ restoring

  def _stored_shapes(self, step: int) -> dict:
    metadata = self._manager.item_metadata(step)
    tree = metadata["state"] if metadata is not None else None
    if tree is None:
      raise ValueError("the state metadata is missing")
    return array_shapes(getattr(tree, "tree", tree))

  def _mismatch(self, step: int, diffs: list[str], config: ml_collections.ConfigDict | None,
                what: str) -> CheckpointError:
    detail = "; ".join(diffs)
    if config is not None:
      try:
        saved = config_lib.from_json(self.read_meta(step)["config"])
        changed = config_lib.differences(saved, config, groups=("model", "schedule", "optimizer"))
        if changed:
          detail = "config differs in " + ", ".join(
              f"{k} ({a!r} in the checkpoint, {b!r} here)" for k, a, b in changed[:4]) + "; " + detail
      except (CheckpointError, KeyError, ValueError):
        pass
    return CheckpointError(f"the checkpoint {self.directory}/{step} does not fit this config ({detail}).",
                           f"{what}.")

  def _damaged(self, step: int, e: Exception, errors: list[str]) -> None:
    """Records an unreadable step; a failure of the machine (permissions, memory) is
    not damage and is raised instead, so that a good step is never set aside."""
    err = environment_error(e, f"reading checkpoint step {step} in {self.directory}")
    if err is not None:
      raise err from e
    reason = describe_error(e)
    errors.append(f"step {step}: {reason}")
    if (str(self.directory), step) in _WARNED_DAMAGED:
      return
    _WARNED_DAMAGED.add((str(self.directory), step))
    log.warning("checkpoint step %d in %s is unreadable (%s); trying the previous one", step,
                self.directory, reason)

  def _require_step(self, step: int | None) -> None:
    """A step asked for by number must exist (else: which steps do)."""
    if step is not None and step not in self.all_steps():
      raise missing_step(self.directory, step, self.all_steps())

  def _quarantine(self, steps: list[int]) -> None:
    """Moves unreadable steps to ``damaged/`` (kept, but never listed or overwritten)."""
    if self.read_only or not steps:
      return
    if jax.process_index() == 0:
      for s in steps:
        target = self.directory / DAMAGED_DIR / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        (self.directory / str(s)).rename(target)
        log.warning("moved the unreadable checkpoint step %d to %s", s, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("langflow_jax:checkpoint_quarantine")
    self._manager.reload()

  def _newest_readable(self, step: int | None, read: Callable[[int], Any], *, empty_fix: str,
                       damaged_fix: str) -> tuple[Any, int, list[int]]:
    """``read(s)`` of ``step``, or of the newest step it can read: (result, step, the newer
    unreadable steps). ``read`` raises :class:`_Unreadable` for a damaged step (it is skipped
    with a warning) and anything else for a real error (it propagates)."""
    self._require_step(step)
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}.", empty_fix)
    errors, unreadable = [], []
    for s in steps:
      try:
        return read(s), s, unreadable
      except _Unreadable as e:
        self._damaged(s, e.__cause__, errors)
        unreadable.append(s)
    raise CheckpointError(f"no readable checkpoint in {self.directory} ({errors[0]}).", damaged_fix)

  def restore(self, abstract_state: Any, step: int | None = None, *,
              config: ml_collections.ConfigDict | None = None) -> tuple[Any, dict, int]:
    """Restores ``step`` (default: the newest readable one) onto ``abstract_state``.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings
    (any mesh). A checkpoint whose arrays do not match it raises one
    :class:`CheckpointError` naming the differences (``config`` adds the
    config keys that changed). Unreadable newer steps are skipped with a
    warning (and, unless read-only, moved to ``damaged/``).
    """
    wanted = array_shapes(abstract_state)

    def read(s: int):
      diffs = tree_differences(_reading(self._stored_shapes, s), wanted)
      if diffs:
        raise self._mismatch(s, diffs, config, "resume with the config the run was trained with "
                             "(its config.json), or train this config in a fresh --workdir")
      return _reading(self._manager.restore, s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))

    restored, s, unreadable = self._newest_readable(
        step, read, empty_fix="train first (langflow-jax train) or point at another --workdir.",
        damaged_fix="the files are damaged; restore them from a backup or start a fresh --workdir.")
    if unreadable:
      log.warning("%s checkpoint step %d of %s: the newer step(s) %s were unreadable",
                  "using" if self.read_only else "resuming from", s, self.directory, ", ".join(map(str, unreadable)))
      self._quarantine(unreadable)
    return restored.state, dict(restored.meta), s

  def restore_weights(self, abstract: dict[str, Any], step: int | None = None, *,
                      config: ml_collections.ConfigDict | None = None) -> tuple[dict, dict, int]:
    """Only the subtrees named in ``abstract`` (e.g. ``params``, ``ema_params``) of the
    newest readable step: the fine-tuning start. Same checks as :meth:`restore`."""
    wanted = array_shapes(abstract)

    def read(s: int):
      stored = {k: v for k, v in _reading(self._stored_shapes, s).items() if k.split(".")[0] in abstract}
      diffs = tree_differences(stored, wanted)
      if diffs:
        raise self._mismatch(s, diffs, config, "fine-tune with the model config of the run you start from "
                             "(only data, optimizer and training keys may change)")
      restorer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
      weights = _reading(restorer.restore, self.directory / str(s) / "state", args=ocp.args.PyTreeRestore(
          item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True))
      return weights, _reading(self.read_meta, s)

    (weights, meta), s, _ = self._newest_readable(
        step, read, empty_fix="point --config.train.restore_from at a training run with checkpoints.",
        damaged_fix="the files are damaged; restore them from a backup or start from another run.")
    return weights, meta, s

  def read_meta(self, step: int | None = None) -> dict:
    """The JSON metadata of ``step`` (default: newest readable)."""
    meta, _, _ = self._newest_readable(
        step, lambda s: dict(_reading(self._manager.restore, s, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta),
        empty_fix="train first (langflow-jax train) or point at another --workdir.",
        damaged_fix="the files are damaged; restore them from a backup or start a fresh --workdir.")
    return meta


class _Unreadable(Exception):
  """A checkpoint step that could not be read; the cause is the original error."""


def _reading(fn: Callable[..., Any], *args, **kwargs) -> Any:
  """``fn(*args, **kwargs)``, any failure of which means the step is unreadable."""
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # orbax raises ValueError/KeyError/FileNotFoundError on damage
    raise _Unreadable() from e


@contextlib.contextmanager
def _translated(error_of: Callable[[Exception], UserError | None]):
  """Raises ``error_of(e)`` (one line for the user) in place of an exception it recognises; others propagate."""
  try:
    yield
  except Exception as e:
    err = error_of(e)
    if err is None:
      raise
    raise err from e


def open_run(path: str | pathlib.Path) -> tuple[Checkpointer, int | None]:
  """A read-only :class:`Checkpointer` for a run (or step) directory, with a clear
  error when there is nothing to read; and the step a step directory names."""
  directory, step = locate(path)
  ckpt = Checkpointer(directory, read_only=True)
  if not ckpt.all_steps():
    raise CheckpointError(f"{path} has no complete checkpoint yet.",
                          f"train first (langflow-jax train --workdir {path}) or pass another run directory.")
  return ckpt, step


def saved_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The resolved config stored with the newest readable checkpoint of ``workdir``."""
  ckpt, step = open_run(workdir)
  meta = ckpt.read_meta(step)
  if "config" not in meta:
    raise CheckpointError(f"the checkpoint in {ckpt.directory} stores no config.",
                          "it was not written by langflow-jax; convert it or train a new run.")
  return config_lib.from_json(meta["config"])


def tokenizer_meta(tokenizer) -> dict:
  """What a checkpoint records about its tokenizer (see :func:`check_tokenizer`)."""
  return {"name": tokenizer.name, "vocab_size": int(tokenizer.vocab_size), "fingerprint": fingerprint(tokenizer)}


def check_tokenizer(meta: dict, current: dict, where: str) -> None:
  """``current`` (:func:`tokenizer_meta`) must be the tokenizer the checkpoint was trained with."""
  saved = meta.get("tokenizer")
  if not saved or saved.get("fingerprint") == current["fingerprint"]:
    return  # the same vocabulary (or a checkpoint that does not record it)
  raise CheckpointError(
      f"the checkpoint in {where} was trained with tokenizer '{saved.get('name')}' "
      f"({saved.get('vocab_size')} tokens), but data.tokenizer gives '{current['name']}' "
      f"({current['vocab_size']} tokens) with a different vocabulary.",
      f"use the checkpoint's tokenizer (--config.data.tokenizer={saved.get('name')}); a model only "
      "understands the token ids it was trained on.")


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """Attaches shardings to an abstract pytree (for restoring onto a mesh)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def meta_json(config: ml_collections.ConfigDict, data_state: dict, extra: dict | None = None) -> dict:
  return {"config": config_lib.to_json(config), "data_state": json.loads(json.dumps(data_state)),
          **(extra or {})}


def save_state(workdir: str | pathlib.Path, step: int, state: Any, config: ml_collections.ConfigDict,
               extra: dict | None = None) -> pathlib.Path:
  """Writes ``state`` as ``workdir``'s checkpoint ``step`` and waits for it: a run directory made
  without the trainer (converted weights, a fresh or hand-made model) that every command can read."""
  checkpointer = Checkpointer(checkpoint_dir(workdir), async_save=False)
  try:
    checkpointer.save(step, state, meta_json(config, {"step": step}, extra), force=True)
  finally:
    checkpointer.close()
  return pathlib.Path(workdir)


# --------------------------------------------------------------------------- a run's model


def load_state(workdir: str | pathlib.Path, config: ml_collections.ConfigDict | None = None,
               step: int | None = None, mesh: jax.sharding.Mesh | None = None
               ) -> tuple[ml_collections.ConfigDict, ModelParts, TrainState, dict]:
  """(config, model parts, full train state, metadata) of a run's newest readable
  checkpoint (or of a step directory), on one device, or placed on ``mesh`` by
  the sharding rules (every process reads only its shards). Clear errors for a
  missing or empty workdir, a damaged checkpoint, or a ``config`` that does not fit it."""
  checkpointer, newest = open_run(workdir)
  step = newest if step is None else step
  if config is None:
    config = config_lib.from_json(checkpointer.read_meta(step)["config"])
  tx = make_optimizer(config.optimizer, config.train.steps)
  graphdef, abstract_state = abstract_train_state(config, tx)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_state)
  else:
    abstract = with_shardings(abstract_state, parallel.tree_shardings(abstract_state, mesh))
  state, meta, restored = checkpointer.restore(abstract, step, config=config)
  # The step actually read: without ``step`` a damaged newest one is skipped.
  return config, ModelParts(graphdef, state.buffers), state, {**meta, "restored_step": restored}


def load_model(workdir: str | pathlib.Path, use_ema: bool = True,
               config: ml_collections.ConfigDict | None = None,
               step: int | None = None, mesh: jax.sharding.Mesh | None = None
               ) -> tuple[ml_collections.ConfigDict, nnx.Module]:
  """The trained model (EMA weights by default) and config of a training run: the
  model its ``objective.name`` trains (:mod:`langflow_jax.methods`: a LangFlow, the AR or the MDLM baseline).

  ``config`` (default: the one saved with the checkpoint) may change data,
  eval and sample keys; its tokenizer must be the checkpoint's. ``step`` picks
  a checkpoint; the default is the newest readable one. With ``mesh`` the
  weights are restored sharded by the rules (for sharded sampling and eval).
  """
  config, model, _ = load_model_and_step(workdir, use_ema, config, step, mesh)
  return config, model


def load_model_and_step(workdir: str | pathlib.Path, use_ema: bool = True,
                        config: ml_collections.ConfigDict | None = None,
                        step: int | None = None, mesh: jax.sharding.Mesh | None = None
                        ) -> tuple[ml_collections.ConfigDict, nnx.Module, int]:
  """:func:`load_model`, and the checkpoint step it read (for reports that name it)."""
  config, parts, state, meta = load_state(workdir, config, step, mesh)
  check_tokenizer(meta, tokenizer_meta(load_tokenizer(config.data.tokenizer)), str(workdir))
  return config, parts.merge(state.ema_params if use_ema else state.params), meta["restored_step"]
