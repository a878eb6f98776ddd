"""What the reproduction scripts (``exp_*.py``) share: arguments, runs, cached results, tables.

Every script trains its variants with the library trainer, one run directory
per variant under ``--runs`` (default ``runs/experiments``). A run that was
stopped resumes from its last checkpoint (the trainer's auto-resume); a
finished one is reused, also by the other scripts: the learned-Gumbel,
self-conditioned LangFlow run is the same directory in all three. Every
evaluation is cached as JSON beside its run (``RUN/experiments/<name>.json``)
together with its protocol and checkpoint step, so a rerun skips what is done
and recomputes what changed. Each script prints its markdown table and writes
it, with its PNGs, to ``--out`` (default ``experiments/results``), through
``harness.py`` (the command line, timing and results files every script shares).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import statistics
import sys
from typing import Any, Callable, Sequence

import harness
import ml_collections
import numpy as np

from langflow_jax import checkpoint as ckpt_lib
from langflow_jax import config as config_lib
from langflow_jax import methods, metrics, reporting, train
from langflow_jax.data import pipeline
from langflow_jax.errors import ConfigError

# The shared training budget of every variant (tiny config: 2 x 128 blocks,
# 32 x 64-token batches, cosine decay to the last step), pinned here so that
# the demo's own budget in configs/tiny.py can change without moving results.
STEPS = 800
BUDGET_OVERRIDES = ("config.train.batch_size=32",)

# --quick: a one-block model of width 32 on 32-token rows for a few steps,
# with evaluations to match; for smoke tests only (its numbers mean nothing).
QUICK_OVERRIDES = (
    "config.model.hidden_size=32", "config.model.cond_dim=16", "config.model.n_blocks=1",
    "config.model.n_heads=2", "config.model.max_length=32", "config.data.seq_len=32",
    "config.train.batch_size=8", "config.train.log_every=2", "config.train.eval_every=4",
    "config.train.eval_batches=1", "config.train.checkpoint_every=4", "config.train.progress=false",
    "config.train.plot=false",
    "config.optimizer.warmup_steps=1", "config.objective.skip_warmup_steps=2",
)
QUICK_STEPS = 4

# The likelihood-bound protocol of every LangFlow number (config.eval keys),
# the tiny config's own: the sc_chain_rule bound (the divergence of the field
# that is integrated, self-conditioning pre-pass included), Heun with 128 steps
# (256 evaluations) on the schedule's own quantile grid, one Gaussian Hutchinson
# probe, EMA weights, the first 32 held-out sequences (2048 tokens), seed 1.
# Heun 128 because the solver bias at 32 steps (+0.1 to +0.3 nats/token on the
# context-free reference of a 400-800-step run) is as large as the differences
# the studies look for; at 128 it is +0.02 (the card prints it). All models see
# the same sequences and, having the same width, the same eps and probes, so
# differences between rows are more precise than each row's standard error.
EVAL = {"solver": "heun", "steps": 128, "grid": "official", "estimator": "hutchinson_gaussian", "probes": 1,
        "batch_size": 32, "num_batches": 1, "seed": 1, "mode": "sc_chain_rule"}
QUICK_EVAL = {"steps": 2, "batch_size": 4, "num_batches": 1}
# Sampling for Gen. PPL: 64 samples of the full row length, 64 steps (network evaluations).
SAMPLE = {"num": 64, "steps": 64, "seed": 42}
QUICK_SAMPLE = {"num": 4, "steps": 4, "seed": 42}

# The groups that make two runs the same experiment (a reused run must match them).
IDENTITY_GROUPS = ("model", "schedule", "objective", "data", "optimizer")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One trained model of an experiment."""

  name: str                     # run directory name (the budget is appended)
  label: str                    # how tables and plots call it
  config: str = "tiny"          # config file in configs/
  overrides: tuple[str, ...] = ()


def parse_args(doc: str, argv: Sequence[str] | None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
  """The flags of a training experiment: the harness's, plus where its runs live and their budget."""
  parser = harness.parser(doc, "smoke run: a one-block width-32 model for a few steps, tiny evaluations")
  parser.add_argument("--out", default=str(harness.RESULTS),
                      help="where the markdown table and PNGs go")
  parser.add_argument("--runs", default=None,
                      help="run directories (default runs/experiments; runs/experiments-quick with --quick)")
  parser.add_argument("--steps", type=int, default=None,
                      help=f"training steps per variant (default {STEPS}; {QUICK_STEPS} with --quick)")
  if extra is not None:
    extra(parser)
  args = parser.parse_args(argv)
  args.out = pathlib.Path(args.out)
  args.runs = pathlib.Path(args.runs or harness.ROOT / "runs" / ("experiments-quick" if args.quick else "experiments"))
  args.steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
  return args


def eval_protocol(args: argparse.Namespace, **changes: Any) -> dict[str, Any]:
  return {**EVAL, **(QUICK_EVAL if args.quick else {}), **changes}


def sample_protocol(args: argparse.Namespace) -> dict[str, Any]:
  return dict(QUICK_SAMPLE if args.quick else SAMPLE)


def langflow_bound(workdir: pathlib.Path, protocol: dict[str, Any], compute: bool = True) -> dict[str, Any] | None:
  """The ODE bound of a LangFlow run under ``protocol`` (config.eval keys), cached;
  the scripts share the cache entries of the same protocol. ``compute=False``: only a cached one (or ``None``)."""
  from langflow_jax import evaluate

  overrides = [f"config.eval.{k}={v}" for k, v in protocol.items()]
  name = f"bound-{protocol['solver']}{protocol['steps']}-{protocol['grid']}"
  name += "" if protocol.get("self_cond", True) else "-no-self-cond"
  name += "" if protocol.get("mode", "sc_chain_rule") == "sc_chain_rule" else f"-{protocol['mode']}"
  return cached(workdir, name, {"eval": protocol},
                (lambda: evaluate.evaluate_workdir(workdir, overrides, write=False).to_json()) if compute else None)


def variant_config(variant: Variant, args: argparse.Namespace) -> ml_collections.ConfigDict:
  overrides = [*(QUICK_OVERRIDES if args.quick else BUDGET_OVERRIDES), f"config.train.steps={args.steps}",
               f"config.train.eval_every={args.steps}", *variant.overrides]
  return config_lib.load_config(variant.config, overrides)


def run_dir(variant: Variant, args: argparse.Namespace) -> pathlib.Path:
  return args.runs / f"{variant.name}-{args.steps}"


def finished_step(workdir: pathlib.Path) -> int | None:
  """The newest checkpoint step of a run directory (None: nothing trained yet)."""
  if not ckpt_lib.checkpoint_dir(workdir).is_dir():
    return None
  return ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), read_only=True).latest_step()


def ensure_trained(variant: Variant, args: argparse.Namespace) -> tuple[pathlib.Path, ml_collections.ConfigDict]:
  """Trains the variant to its budget (resuming a stopped run); a finished run is reused.

  A run directory that holds a different experiment (model, schedule,
  objective, data or optimizer keys differ) is an error, not silently reused.
  """
  config = variant_config(variant, args)
  workdir = run_dir(variant, args)
  step = finished_step(workdir)
  if step is not None:
    method = methods.for_config(config)
    changed = [c for c in config_lib.differences(ckpt_lib.saved_config(workdir), config, IDENTITY_GROUPS)
               if method.uses_key(c[0])]
    if changed:
      k, a, b = changed[0]
      raise ConfigError(f"{workdir} holds another experiment ({k}: {a!r} there, {b!r} here).",
                        "remove that run directory or pass another --runs.")
  if step == config.train.steps:
    harness.log(f"[{variant.name}] reusing {workdir} (step {step})")
    return workdir, config
  harness.log(f"[{variant.name}] training {variant.label}: {config.train.steps} steps "
      f"{'from step ' + str(step) + ' ' if step else ''}in {workdir}")
  summary = train.train_and_evaluate(config, workdir)
  if summary.get("preempted"):
    # The checkpoint is saved; measuring a half-trained run would cache a wrong number.
    from langflow_jax.cli import preempted_exit_status

    harness.log(f"[{variant.name}] stopped by {summary['preempted']} at step {summary.get('final_step')}: "
        "rerun the same command to resume")
    sys.exit(preempted_exit_status(summary["preempted"]))
  return workdir, config


def seconds_per_step(workdir: pathlib.Path) -> float:
  """Median training seconds per step over the logged windows, the first (which
  holds the compilation) left out when there are others; from the metrics log."""
  rates = [row["train/steps_per_s"] for row in reporting.read_metrics(workdir)
           if isinstance(row.get("train/steps_per_s"), float) and row["train/steps_per_s"] > 0]
  rates = rates[1:] if len(rates) > 1 else rates
  return statistics.median(1.0 / r for r in rates) if rates else math.nan


def cached(workdir: pathlib.Path, name: str, protocol: dict[str, Any], compute: Callable[[], Any] | None) -> Any:
  """``compute()``, or its saved result when this protocol was already run on this checkpoint
  (``compute=None``: the saved result or ``None``)."""
  protocol = json.loads(json.dumps({**protocol, "checkpoint_step": finished_step(workdir)}))
  path = workdir / "experiments" / f"{name}.json"
  if path.is_file():
    saved = json.loads(path.read_text())
    if saved.get("protocol") == protocol:
      harness.log(f"[{workdir.name}] cached {name}")
      return saved["result"]
  if compute is None:
    return None
  harness.log(f"[{workdir.name}] computing {name} ...")
  result = compute()
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps({"protocol": protocol, "result": result}, indent=1, default=harness.jsonable) + "\n")
  os.replace(tmp, path)
  return json.loads(path.read_text())["result"]


def heldout(config: ml_collections.ConfigDict) -> pipeline.PackedSplit:
  return pipeline.load_split(config.data, "heldout")


def bigram_scorer(config: ml_collections.ConfigDict) -> metrics.BigramLM:
  """The Gen. PPL scorer of every experiment: a Kneser-Ney bigram of the training split.

  It is trained on none of the models' outputs and costs nothing, so all
  generators are scored by the same, independent judge; it measures local
  (adjacent-token) plausibility only.
  """
  split = pipeline.load_split(config.data, "train")
  return metrics.BigramLM(split.ids, config.model.vocab_size, mask=split.mask)


def gen_ppl(ids_NxL: np.ndarray, scorer: metrics.BigramLM) -> dict[str, float]:
  return metrics.generative_perplexity(np.asarray(ids_NxL), scorer)


# --------------------------------------------------------------------------- output


def budget_note(args: argparse.Namespace, config: ml_collections.ConfigDict) -> str:
  m, t = config.model, config.train
  return (f"{'QUICK SMOKE RUN (numbers meaningless): ' if args.quick else ''}"
          f"every model trained {t.steps} steps x {t.batch_size} sequences x {config.data.seq_len} tokens "
          f"({t.steps * t.batch_size * config.data.seq_len / 1e6:.2f}M tokens) on '{config.data.name}' "
          f"({config.data.tokenizer}); {m.n_blocks} blocks of width {m.hidden_size}, {m.n_heads} heads; "
          f"AdamW lr {config.optimizer.lr:g} ({config.optimizer.decay} decay), EMA {config.optimizer.ema_decay}")


def write_results(args: argparse.Namespace, name: str, paragraphs: Sequence[str], figure: str,
                  data: dict[str, Any]) -> dict[str, Any]:
  """The harness's report and results files, with the experiment's training budget in the JSON."""
  return harness.write_results(args.out, name, paragraphs, [figure], {**data, "steps": args.steps}, args.quick)
