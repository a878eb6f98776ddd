"""``langflow-jax distill``: a few-step student of a trained LangFlow run.

    langflow-jax distill --teacher runs/demo --workdir runs/demo-student [--config.distill.method=progressive]

The student's config is the teacher's with :data:`STUDENT_DEFAULTS` and the
overrides on top; it trains through the ordinary trainer
(:func:`langflow_jax.train.train_and_evaluate`, objective ``distill``), so it is
sharded, checkpointed and resumed like any run: rerun the same command.
``flowmap`` is one run. ``progressive`` is one run per halving round: the
rounds before the last live under ``WORKDIR/rounds/`` and each is the next
one's teacher; the last is ``WORKDIR`` itself. ``sample`` and ``serve`` read
``WORKDIR`` as any LangFlow run; its checkpoints carry the student's card.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, Sequence

import ml_collections

from langflow_jax import checkpoint as ckpt_lib
from langflow_jax import config as config_lib
from langflow_jax import distillation, methods, train
from langflow_jax.errors import CheckpointError, ConfigError
from langflow_jax.model import LangFlow

log = logging.getLogger(__name__)

# What a student changes in its teacher's config before the user's overrides:
# the data CE stays a diagnostic (the loss is the distillation error), the
# schedule and the token embeddings stay the teacher's (they define the grid and
# the space the teacher's flow lives in), the skip term is on from the start.
STUDENT_DEFAULTS = (
    "config.objective.name=distill",
    "config.objective.ce_weight=0.0",
    "config.objective.schedule_loss_weight=0.0",
    "config.objective.skip_warmup_steps=0",
    "config.optimizer.embedding_lr_scale=0.0",
    "config.optimizer.schedule_lr_scale=0.0",
)


def teacher_config(path: str) -> ml_collections.ConfigDict:
  """The saved config of a teacher run, with one clear error when it is missing or no LangFlow run."""
  try:
    config = ckpt_lib.saved_config(path)
  except CheckpointError as e:
    raise CheckpointError(f"teacher {path}: {e.problem}",
                          "pass --teacher the --workdir of a trained LangFlow run (langflow-jax train makes one)."
                          ) from e
  method = methods.get(config.objective.name)
  if method.model_class is not LangFlow:
    raise ConfigError(f"the teacher {path} is a {method.label} run (objective.name={method.name}), not LangFlow.",
                      "pass --teacher the --workdir of a LangFlow training run; students distil LangFlow's flow.")
  return config


def student_config(teacher: str | pathlib.Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config of a student of ``teacher``: the teacher's, :data:`STUDENT_DEFAULTS`, then ``overrides``."""
  teacher = str(pathlib.Path(teacher).expanduser().resolve())
  config = teacher_config(teacher)
  config_lib.apply_overrides(config, [*STUDENT_DEFAULTS, f"config.distill.teacher={teacher}",
                                      f"config.train.restore_from={teacher}", *overrides])
  config_lib.validate(config)
  return config


def round_dirs(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> list[pathlib.Path]:
  """The run directory of each round: flowmap, ``workdir``; progressive, one per halving
  under ``workdir/rounds/`` and the last one ``workdir``."""
  if config.distill.method != "progressive":
    return [workdir]
  jumps = distillation.progressive_rounds(config.distill)
  return [workdir / "rounds" / f"{r}-{j}jumps" for r, j in enumerate(jumps[:-1])] + [workdir]


def finished(workdir: pathlib.Path, steps: int) -> bool:
  directory = ckpt_lib.checkpoint_dir(workdir)
  return directory.is_dir() and ckpt_lib.Checkpointer(directory, read_only=True).latest_step() == steps


def distill_workdir(teacher: str | pathlib.Path, workdir: str | pathlib.Path, overrides: Sequence[str] = ()
                    ) -> dict[str, Any]:
  """Trains the student (every round of a progressive one) and returns the last run's summary
  with the student's card. Finished rounds are skipped, a stopped one resumes."""
  config = student_config(teacher, overrides)
  workdir = pathlib.Path(workdir).expanduser()
  dirs = round_dirs(config, workdir)
  summary: dict[str, Any] = {}
  for r, directory in enumerate(dirs):
    c = config_lib.from_json(config_lib.to_json(config))
    if r > 0:
      config_lib.apply_overrides(c, [f"config.distill.round={r}", f"config.distill.round_teacher={dirs[r - 1]}",
                                     f"config.train.restore_from={dirs[r - 1]}"])
    card = distillation.describe_card(distillation.student_card(c.distill))
    if finished(directory, c.train.steps):
      log.info("%s: finished (%s)", directory, card)
      summary = {"final_step": c.train.steps, "workdir": str(directory)}
      continue
    log.info("distilling into %s: %s", directory, card)
    summary = train.train_and_evaluate(c, directory)
    if summary.get("preempted"):
      break
  summary["card"] = distillation.student_card(c.distill)
  return summary
