"""What ``make demo`` runs: train the tiny config and report what happened."""

from __future__ import annotations

import pathlib
import time
from typing import Sequence

from langflow_jax import config as config_lib
from langflow_jax import evaluate, metrics, sampling, train
from langflow_jax.data import pipeline
from langflow_jax.data.tokenizer import load_tokenizer


def run_demo(workdir: str | pathlib.Path, overrides: Sequence[str] = ()) -> dict:
  """Trains ``configs/tiny.py`` on the embedded corpus and prints a report."""
  workdir = pathlib.Path(workdir)
  config = config_lib.load_config("tiny", overrides)
  print(f"[demo] training the tiny config ({config.train.steps} steps) in {workdir} ...", flush=True)
  start = time.perf_counter()
  summary = train.train_and_evaluate(config, workdir)
  train_s = time.perf_counter() - start

  split = pipeline.load_split(config.data, "train")
  entropy = metrics.unigram_entropy(split.ids, split.mask)
  report = {
      "train_seconds": train_s,
      "unigram_entropy": entropy,
      "final_train_ce": summary["train"].get("ce"),
      "heldout_ce": summary["eval"].get("eval/ce"),
      "plots": summary.get("plots", []),
  }
  print(f"[demo] trained {summary['final_step']} steps in {train_s:.0f} s "
        f"({summary['num_params'] / 1e6:.2f} M parameters)")
  print(f"[demo] unigram entropy of the corpus:    {entropy:.3f} nats/token")
  print(f"[demo] final training CE (noisy inputs): {report['final_train_ce']:.3f} nats/token")
  print(f"[demo] held-out CE, EMA weights:         {report['heldout_ce']:.3f} nats/token")
  for p in report["plots"]:
    print(f"[demo] wrote {p}")

  print("[demo] likelihood bound on the held-out split (probability-flow ODE) ...", flush=True)
  bound = evaluate.evaluate_workdir(workdir)
  report.update(bound_nats_per_token=bound.nats_per_token, bound_card=bound.card)
  for line in bound.report().splitlines():
    print(f"[demo] {line}")
  start = time.perf_counter()
  _, model = train.load_model(workdir, use_ema=config.sample.use_ema, config=config)
  report["sampling"] = sampling.demo_samples(model, config, load_tokenizer(config.data.tokenizer))
  print(f"[demo] sampling took {time.perf_counter() - start:.0f} s (compilation included)")
  return report
