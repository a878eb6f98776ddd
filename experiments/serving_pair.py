"""What the two serving benchmarks share: the model pair, its runs, its flags, and how what it produced is scored.

``bench_serving.py`` times the pair's samplers in this process (time to the
full output); ``bench_serve.py`` puts each model behind ``langflow-jax serve``
and measures it with HTTP clients. Both measure the same two models: the
config ``serving:L`` (configs/serving.py) trained as LangFlow and as its
autoregressive twin (the same config but ``objective.name``), in
``WORKDIR/{langflow,ar}_L<L>``, so a pair one of them trained is reused by the
other. Both score their samples the same way: Gen. PPL under a Kneser-Ney
bigram of the training split (``common.bigram_scorer``; and, in
bench_serving, under the trained AR model) with the mean per-sample unigram
entropy.
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np

import harness
from langflow_jax import config as config_lib
from langflow_jax import metrics, reporting, train

METHODS = ("langflow", "ar")
# --quick: a one-block width-32 pair, fresh weights; for smoke tests only (its numbers mean nothing).
QUICK_MODEL = ("config.model.hidden_size=32", "config.model.cond_dim=16", "config.model.n_blocks=1",
               "config.model.n_heads=2")


def parser(doc: str, quick_help: str, quick_dir: str) -> argparse.ArgumentParser:
  """The flags both benchmarks take: where the report and the runs go, the training budget, the seed
  (and, through :func:`parse_args`, ``--config.group.key=value`` overrides of the pair's config)."""
  p = harness.parser(doc, quick_help)
  p.add_argument("--out", default=None,
                 help=f"where the report goes (default experiments/results; --quick: {quick_dir})")
  p.add_argument("--workdir", default=None,
                 help=f"the pair's runs, reused or resumed (default runs/bench_serving; --quick: {quick_dir})")
  p.add_argument("--train-steps", type=int, default=None,
                 help="training steps a model (default: the config's; 0: fresh weights, for timing only)")
  p.add_argument("--seed", type=int, default=0)
  return p


def parse_args(p: argparse.ArgumentParser, argv: Sequence[str] | None, full: dict[str, Any],
               quick: dict[str, Any], quick_dir: str) -> argparse.Namespace:
  """The harness's parse with the pair's defaults: fresh weights of the quick model under ``--quick``."""
  args = harness.parse_with_defaults(
      p, argv, {"out": str(harness.RESULTS), "workdir": "runs/bench_serving", **full},
      {"out": quick_dir, "workdir": quick_dir, "train_steps": 0, **quick}, config_overrides=True)
  args.out = pathlib.Path(args.out)
  args.overrides = [*(QUICK_MODEL if args.quick else ()), *args.overrides]
  return args


def model_config(length: int, method: str, overrides: Sequence[str], train_steps: int | None
                 ) -> ml_collections.ConfigDict:
  """``serving:length`` as ``method`` (``overrides`` are ``config.group.key=value``)."""
  cfg = config_lib.load_config(f"serving:{length}", [*overrides, f"config.objective.name={method}"])
  if train_steps:
    cfg.train.steps = int(train_steps)
  return cfg


def run_dir(root: str | pathlib.Path, method: str, length: int) -> pathlib.Path:
  return pathlib.Path(root) / f"{method}_L{length}"


def train_run(cfg: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
  """Trains (or resumes, or reuses) the run to ``cfg.train.steps``; what the report says of it."""
  # this call's share of the training: a reused run reports (nearly) nothing
  summary, timing = harness.timed(lambda: train.train_and_evaluate(cfg, workdir), repeats=0)
  history = [r for r in reporting.read_metrics(workdir) if "eval/ce" in r]
  info = {"trained_steps": int(summary["final_step"]), "train_seconds_this_call": timing.seconds,
          "tokens": int(summary["final_step"]) * cfg.train.batch_size * cfg.data.seq_len,
          "heldout_ce": history[-1]["eval/ce"] if history else None}
  harness.log(f"[serving] {workdir}: {info['trained_steps']} steps, held-out CE {info['heldout_ce']}")
  return info


def sample_quality(ids: Sequence[Sequence[int]] | np.ndarray, scorers: Mapping[str, Callable]) -> dict[str, Any]:
  """Gen. PPL of ``ids`` under each scorer (``gen_ppl_<name>``), their mean per-sample unigram entropy and
  count. Rows of unequal length (a served output cut short) are cut to the shortest."""
  rows = [list(x) for x in ids if len(x) > 1]
  n = min(len(x) for x in rows)
  ids_NxL = np.asarray([x[:n] for x in rows])
  out: dict[str, Any] = {f"gen_ppl_{name}": float(metrics.generative_perplexity(ids_NxL, scorer)["gen_ppl"])
                         for name, scorer in scorers.items()}
  return {**out, "entropy": metrics.sequence_unigram_entropy(ids_NxL), "num": int(len(ids_NxL))}


def log_log_axes(ax, xlabel: str, title: str, xbase: float = 2) -> None:
  """The axes of every serving figure: concurrency or seconds (log), seconds or PPL (log), a light grid."""
  ax.set_xscale("log", base=xbase)
  ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
