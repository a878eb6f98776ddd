"""Orbax checkpoints: train state, data position and resolved config in one step.

A checkpoint step directory holds two items:

* ``state``: the :class:`~langflow_jax.train.TrainState` pytree (params, EMA,
  optimizer state, step, RNG key), restored onto whatever mesh the caller
  asks for (abstract target with shardings), so a different device count is
  fine;
* ``meta``: JSON with the resolved config, the package version and the data
  iterator state.

Orbax writes each step to a temporary directory and renames it when complete,
so an interrupted save is never listed. A step that is listed but unreadable
(truncated files) is skipped with a warning, and the next older one is used;
nothing is deleted.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from langflow_jax import __version__
from langflow_jax import config as config_lib
from langflow_jax.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir).expanduser().resolve() / CHECKPOINT_DIR


class Checkpointer:
  """A thin, fault-tolerant wrapper around ``ocp.CheckpointManager``."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, keep_period: int = 0,
               async_save: bool = True, create: bool = True):
    self.directory = pathlib.Path(directory).expanduser().resolve()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        keep_period=keep_period or None,
        enable_async_checkpointing=async_save,
        create=create,
    )
    self._manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"), options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    meta = dict(meta, step=int(step), version=__version__)
    return self._manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
    """Restores ``step`` (default: the newest readable one) onto ``abstract_state``.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings.
    """
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}.",
                            "train first (langflow-jax train) or point at another --workdir.")
    errors = []
    for s in steps:
      try:
        restored = self._manager.restore(
            s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                       meta=ocp.args.JsonRestore()))
        if errors:
          log.warning("resumed from checkpoint step %d; newer steps were unreadable: %s", s,
                      "; ".join(errors))
        return restored.state, dict(restored.meta), s
      except Exception as e:  # orbax raises ValueError/KeyError/FileNotFoundError on damage
        msg = f"step {s}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        log.warning("checkpoint %s is unreadable, trying an older one (%s)", s, msg)
        errors.append(msg)
    raise CheckpointError(f"no readable checkpoint in {self.directory} ({errors[0]}).",
                          "the files are damaged; restore them or start a fresh --workdir.")

  def read_meta(self, step: int | None = None) -> dict:
    """The JSON metadata of ``step`` (default: newest readable)."""
    steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
    for s in steps:
      try:
        return dict(self._manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
      except Exception as e:
        log.warning("metadata of checkpoint %s is unreadable (%s)", s, e)
    raise CheckpointError(f"no readable checkpoint in {self.directory}.",
                          "train first (langflow-jax train) or point at another --workdir.")

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def saved_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The resolved config stored with the newest checkpoint of ``workdir``."""
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    raise CheckpointError(f"{workdir} has no checkpoints/ directory.",
                          "pass the --workdir of a training run (or train one first).")
  ckpt = Checkpointer(directory, create=False, async_save=False)
  meta = ckpt.read_meta()
  return config_lib.from_json(meta["config"])


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """Attaches shardings to an abstract pytree (for restoring onto a mesh)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def meta_json(config: ml_collections.ConfigDict, data_state: dict, extra: dict | None = None) -> dict:
  return {"config": config_lib.to_json(config), "data_state": json.loads(json.dumps(data_state)),
          **(extra or {})}
