"""Shared test set-up: import this checkout, isolate caches, small configs."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout, even when another one is pip-installed
# The experiments import each other by bare name (`import harness`), as `python experiments/x.py` runs them.
sys.path.insert(1, str(ROOT / "experiments"))
# The official parity fixture (tests/fixtures/official_tiny/README.md). Another directory with the
# same files, e.g. made from another official-layout checkpoint, can stand in for it.
FIXTURE_ENV = "LANGFLOW_JAX_FIXTURE_DIR"
FIXTURE_DIR = pathlib.Path(os.environ.get(FIXTURE_ENV) or ROOT / "tests" / "fixtures" / "official_tiny").expanduser()

# The suite's models are tiny: compiling, not running, is what takes the time,
# and unoptimised CPU code compiles about twice as fast. Set before jax is
# imported; subprocesses inherit it. Results are compared with tolerances or
# between runs under the same flags, never against optimised-build bits.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def experiment_fixture(name: str):
  """A module-scoped fixture that imports experiments/<name>.py.

  The module is registered in ``sys.modules`` while in use: dataclasses
  defined in a script look their module up.
  """
  @pytest.fixture(scope="module")
  def load():
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)

  return load


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
  os.environ["LANGFLOW_JAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
  yield


@pytest.fixture(scope="session")
def fixture_dir() -> pathlib.Path:
  source = f"set by ${FIXTURE_ENV}" if os.environ.get(FIXTURE_ENV) else f"the default; ${FIXTURE_ENV} overrides it"
  if not FIXTURE_DIR.is_dir():
    pytest.fail(f"the official parity fixture directory {FIXTURE_DIR} ({source}) does not exist")
  missing = [n for n in ("config.json", "model.safetensors", "ref.npz") if not (FIXTURE_DIR / n).is_file()]
  if missing:
    pytest.fail(f"the official parity fixture directory {FIXTURE_DIR} ({source}) lacks {', '.join(missing)}")
  return FIXTURE_DIR


@pytest.fixture(scope="session")
def reference(fixture_dir):
  import numpy as np

  with np.load(fixture_dir / "ref.npz") as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def reference_modes(fixture_dir):
  """The official eval modes (sc_chain_rule, sde) on the fixture, commit 3399494."""
  import numpy as np

  if not (fixture_dir / "ref_modes.npz").is_file():
    pytest.fail(f"the parity fixture {fixture_dir} lacks ref_modes.npz (the official sc_chain_rule/sde outputs)")
  with np.load(fixture_dir / "ref_modes.npz") as f:
    return {k: f[k] for k in f.files}


def small_config(**model):
  """A few-hundred-thousand-parameter config on a small corpus file (tests only)."""
  from langflow_jax.config import base_config

  c = base_config()
  c.model.update(vocab_size=8192, hidden_size=32, cond_dim=16, n_blocks=1, n_heads=2, max_length=32,
                 dropout=0.0)
  c.model.update(**model)
  c.schedule.update(loc=2.0, scale=0.9, entropy=6.0)
  c.objective.skip_warmup_steps = 0
  c.data.update(name="sotu", tokenizer="sotu-bpe8k", seq_len=32)
  c.train.update(steps=4, batch_size=8, log_every=2, eval_every=4, eval_batches=1, checkpoint_every=4,
                 progress=False, plot=False)
  c.optimizer.update(lr=1e-3, warmup_steps=2, ema_decay=0.9)
  return c


def fixed_batch_config(tmp_dir: pathlib.Path, objective_name: str, steps: int):
  """small_config training ``objective_name`` on one repeated batch, with the loss logged every step.

  Unwrapped rows of a corpus whose documents are all the same paragraph: every
  row, hence every batch, is the same 32 tokens, so the loss must fall fast.
  """
  corpus = tmp_dir / "same.txt"
  corpus.write_text("The state of the union is strong, and the budget for roads, ports, schools and "
                    "the post office will be balanced by the end of the coming fiscal year.\n\n" * 30)
  cfg = small_config()  # the 8k-token BPE, 32-token sequences
  cfg.objective.name = objective_name
  cfg.data.update(name=f"file:{corpus}", wrap=False)
  cfg.train.update(steps=steps, log_every=1, eval_every=steps, checkpoint_every=steps)
  cfg.optimizer.update(lr=1e-2, warmup_steps=3)
  cfg.objective.output_bias_init = "zeros"  # the official zero-initialised head: the first loss is log V
  return cfg


def baseline_config(objective_name: str, vocab_size: int, length: int):
  """small_config for a baseline (``ar``, ``mdlm``): two blocks of width 32 over ``vocab_size`` ids at ``length``."""
  cfg = small_config(vocab_size=vocab_size, hidden_size=32, n_heads=2, n_blocks=2, max_length=length)
  cfg.objective.name = objective_name
  cfg.data.seq_len = length
  return cfg


def fresh_and_random_models(cfg, seed: int = 0):
  """(the method's fresh model, the same with every weight moved by N(0, 0.3^2)): a zero-initialised
  head makes every logit of a fresh model 0, which would hide what the tests look at."""
  from flax import nnx
  import jax

  from langflow_jax import methods

  @jax.jit
  def make():
    _, params, rest = nnx.split(methods.create_model(cfg, seed=seed), nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return params, jax.tree.unflatten(treedef, noisy), rest

  graphdef = nnx.graphdef(nnx.eval_shape(lambda: methods.create_model(cfg, seed=seed)))
  fresh, noisy, rest = make()
  return nnx.merge(graphdef, fresh, rest), nnx.merge(graphdef, noisy, rest)


def trained_baseline(tmp_path_factory, objective_name: str, steps: int):
  """(config, summary, run directory) of train_and_evaluate with ``objective_name`` on a fixed batch."""
  from langflow_jax import train

  tmp = tmp_path_factory.mktemp(f"{objective_name}_run")
  cfg = fixed_batch_config(tmp, objective_name, steps=steps)
  return cfg, train.train_and_evaluate(cfg, tmp / "run"), tmp / "run"


def check_baseline_run(run, steps: int, model_type: type) -> list[float]:
  """A trained_baseline run: ``steps`` steps, each one's CE logged, a finite held-out CE, and a run
  that loads back as ``model_type`` under its objective's name. Returns the logged CEs."""
  import math

  from langflow_jax import reporting, train

  cfg, summary, workdir = run
  assert summary["final_step"] == steps
  ce = [r["train/ce"] for r in reporting.read_metrics(workdir) if "train/ce" in r]
  assert len(ce) == steps and math.isfinite(summary["eval"]["eval/ce"])
  saved, model = train.load_model(workdir)
  assert saved.objective.name == cfg.objective.name and isinstance(model, model_type)
  return ce


def check_sample_baseline_cli(workdir: pathlib.Path, capsys, *overrides: str) -> None:
  """``sample-baseline`` on a trained baseline run prints two prompted samples."""
  from langflow_jax import cli

  code = cli.main(["sample-baseline", "--workdir", str(workdir), "--prompt", "The state",
                   "--config.sample.num=2", "--config.sample.seq_len=12", *overrides])
  out = capsys.readouterr().out
  assert code == 0 and out.count("--- sample") == 2
  assert out.count("<|endoftext|>The state") == 2  # BOS, then the prompt


@pytest.fixture
def small():
  return small_config
