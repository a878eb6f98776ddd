"""What the three Colab notebooks (``colab/*.ipynb``) share: their budget, the setup line, the quickstart run.

The notebooks run in Colab, in Jupyter from a checkout and in the test suite
(``tests/test_notebooks.py``), which sets ``LANGFLOW_NOTEBOOK_QUICK=1`` to
pick :data:`QUICK_BUDGET`: just enough steps to check that every cell runs.
Otherwise :data:`FULL_BUDGET` shows something worth looking at in a few
minutes on a CPU runtime. The quickstart's run (``runs/colab_tiny_<steps>``
under the notebook's working directory) is trained by notebook 01; notebooks
02 and 03 reload it, or train it first when 01 has not run.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping

import jax
import ml_collections
from flax import nnx

import langflow_jax
from langflow_jax import checkpoint as ckpt_lib
from langflow_jax import config as config_lib
from langflow_jax import train

QUICK_ENV = "LANGFLOW_NOTEBOOK_QUICK"
QUICKSTART_CONFIG = "tiny"


@dataclasses.dataclass(frozen=True)
class Budget:
  """How much work each notebook does."""

  quick: bool                    # the test suite's budget
  train_steps: int               # the quickstart run (the tiny config's own budget is 400 steps)
  finetune_steps: int            # notebook 03: fine-tuning on the user's text
  sample_steps: int              # sampler steps (network evaluations per sample)
  eval_sequences: int            # rows of each likelihood bound
  eval_steps: int                # ODE steps of each likelihood bound
  sweep_steps: tuple[int, ...]   # notebook 02: the step counts of the solver comparison
  curve_points: int              # notebook 02: noise levels of the held-out denoising curve


QUICK_BUDGET = Budget(quick=True, train_steps=30, finetune_steps=10, sample_steps=16, eval_sequences=8,
                      eval_steps=8, sweep_steps=(2, 4, 8), curve_points=8)
FULL_BUDGET = Budget(quick=False, train_steps=300, finetune_steps=80, sample_steps=64, eval_sequences=32,
                     eval_steps=32, sweep_steps=(4, 8, 16, 32, 64), curve_points=24)


def budget(environ: Mapping[str, str] | None = None) -> Budget:
  """:data:`QUICK_BUDGET` when ``LANGFLOW_NOTEBOOK_QUICK=1``, else :data:`FULL_BUDGET`."""
  environ = os.environ if environ is None else environ
  return QUICK_BUDGET if environ.get(QUICK_ENV) == "1" else FULL_BUDGET


def setup_line() -> str:
  """Which langflow_jax (its directory: the checkout in use), which JAX, on which devices."""
  devices = jax.devices()
  return (f"langflow_jax {langflow_jax.__version__} from {pathlib.Path(langflow_jax.__file__).parent}\n"
          f"JAX {jax.__version__} on {len(devices)} {devices[0].platform.upper()} device(s): "
          f"{', '.join(str(d) for d in devices)}")


def quickstart_workdir(b: Budget) -> pathlib.Path:
  """The run the three notebooks share, relative to the working directory."""
  return pathlib.Path("runs") / f"colab_{QUICKSTART_CONFIG}_{b.train_steps}"


def quickstart_config(b: Budget) -> ml_collections.ConfigDict:
  """The tiny config with the budget's steps and no progress bar (notebook output stays readable)."""
  return config_lib.load_config(QUICKSTART_CONFIG,
                                [f"--config.train.steps={b.train_steps}", "--config.train.progress=false"])


def training_line(summary: Mapping[str, Any]) -> str:
  """One line for ``train.train_and_evaluate``'s summary (a run that was already complete only reloads)."""
  line = f"{summary['num_params'] / 1e6:.2f}M parameters, step {summary['final_step']}"
  if summary["start_step"] == summary["final_step"]:
    return line + " (already trained: reloaded)"
  nan = float("nan")
  return (f"{line}: training CE {summary['train'].get('ce', nan):.3f}, "
          f"held-out CE {summary['eval'].get('eval/ce', nan):.3f} nats/token")


def quickstart_run(b: Budget) -> tuple[pathlib.Path, ml_collections.ConfigDict, nnx.Module]:
  """The quickstart's run directory, config and EMA model: trained (or finished) here if needed."""
  workdir = quickstart_workdir(b)
  print(training_line(train.train_and_evaluate(quickstart_config(b), workdir)))
  cfg, model = ckpt_lib.load_model(workdir)
  return workdir, cfg, model
