"""What ``make demo`` runs: train the tiny config and report what happened."""

from __future__ import annotations

import pathlib
import time
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np

from langflow_jax import checkpoint as ckpt_lib
from langflow_jax import config as config_lib
from langflow_jax import evaluate, metrics, oracles, plots
from langflow_jax import sample as sample_app
from langflow_jax import sampling, train
from langflow_jax.data import pipeline
from langflow_jax.data.tokenizer import load_tokenizer
from langflow_jax.model import LangFlow


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
  # The mean denoising CE is no likelihood: under the information-uniform schedule
  # any model's is about H_inf / 2. The bound below, beside its context-free
  # reference, is the number to compare.
  print(f"[demo] final training CE (noisy inputs): {report['final_train_ce']:.3f} nats/token")
  print(f"[demo] held-out CE, EMA weights:         {report['heldout_ce']:.3f} nats/token")
  print("[demo] (mean CE over the schedule's noise levels: a training diagnostic, not a likelihood)")
  for p in report["plots"]:
    print(f"[demo] wrote {p}")

  print("[demo] likelihood bound on the held-out split (probability-flow ODE) ...", flush=True)
  bound = evaluate.evaluate_workdir(workdir)
  report.update(bound_nats_per_token=bound.nats_per_token, bound_card=bound.card)
  for line in bound.report().splitlines():
    print(f"[demo] {line}")
  _, model = ckpt_lib.load_model(workdir, use_ema=config.sample.use_ema, config=config)
  report["denoising"] = denoising_comparison(model, config, split, workdir / "denoising_curve.png")
  start = time.perf_counter()
  report["sampling"] = demo_samples(model, config, load_tokenizer(config.data.tokenizer))
  print(f"[demo] sampling took {time.perf_counter() - start:.0f} s (compilation included)")
  return report


DEMO_QUANTILES = (0.1, 0.3, 0.5, 0.7, 0.9)


def denoising_comparison(model: LangFlow, config: ml_collections.ConfigDict, train_split: pipeline.PackedSplit,
                         figure: pathlib.Path | None = None, *, print_fn: Callable[[str], None] = print) -> dict:
  """Held-out denoising CE at five noise levels (quantiles of the learned schedule) beside
  the context-free denoiser's at the same levels, rows and eps.

  The mean CE over the schedule is no measure of learning (about H_inf / 2 for any model
  under an information-uniform schedule); the gap to the context-free curve at each gamma
  is what the network takes from context.
  """
  gamma_G = np.asarray(model.schedule.icdf(np.asarray(DEMO_QUANTILES, np.float32)), np.float32)
  prior_V = pipeline.unigram_log_prior(train_split, config.model.vocab_size)
  reference = oracles.ContextFreeDenoiser(model.embedding_matrix(), model.schedule, prior_V)
  held = pipeline.load_split(config.data, "heldout")
  protocol = dict(batch_size=int(config.eval.batch_size), num_batches=1, seed=int(config.eval.seed))
  ce_G = evaluate.denoising_curve(model, held, gamma_G, self_cond=True, **protocol)
  ref_G = evaluate.denoising_curve(reference, held, gamma_G, **protocol)
  print_fn(f"[demo] denoising CE on held-out text at the schedule's quantiles {DEMO_QUANTILES} "
           f"({protocol['batch_size']} sequences):")
  print_fn("[demo]   gamma          " + " ".join(f"{g:7.2f}" for g in gamma_G))
  print_fn("[demo]   model          " + " ".join(f"{c:7.3f}" for c in ce_G))
  print_fn("[demo]   context-free   " + " ".join(f"{c:7.3f}" for c in ref_G))
  print_fn("[demo]   from context   " + " ".join(f"{r - c:+7.3f}" for c, r in zip(ce_G, ref_G)))
  out = {"gamma": gamma_G.tolist(), "model_ce": ce_G.tolist(), "context_free_ce": ref_G.tolist()}
  if figure is not None:
    plots.denoising_curve_plot(figure, gamma_G, {"model": ce_G, "context-free": ref_G},
                               {"model": model.schedule}, title="held-out denoising CE per noise level")
    print_fn(f"[demo] wrote {figure}")
    out["figure"] = str(figure)
  return out


def demo_samples(model: LangFlow, config: ml_collections.ConfigDict, tokenizer, *,
                 prompt: str = "The Congress shall", print_fn: Callable[[str], None] = print) -> dict:
  """The demo's sampling report: a few samples, a prompted one and a best-of-4 one.

  Two compiled calls: the unconditional batch, and the four candidates of the
  prompt (the first printed as "a prompted sample", the best by score as
  "best of 4"). Gen. PPL under the bigram scorer of the training split is
  printed next to the entropy, with held-out data for scale.
  """
  sc = config.sample
  seq_len = int(sc.seq_len or config.data.seq_len)
  options = sampling.SamplerOptions.from_config(sc)
  root = jax.random.PRNGKey(int(sc.seed))
  out = sampling.sample(model, jax.random.fold_in(root, 0), options, num=int(sc.num), seq_len=seq_len)
  cond = sampling.prompt_conditioning(tokenizer, prompt, seq_len)
  best = sampling.best_of_n(model, jax.random.fold_in(root, 1), 4, options, cond=cond, score=sc.score)
  tokens = np.asarray(out.tokens_BxL)
  fixed = np.asarray(cond.fixed_BxL[0])
  print_fn(f"[demo] {len(tokens)} samples ({options.sampler}, {options.steps} steps, {seq_len} tokens):")
  for row in tokens:
    print_fn(f"[demo]   {sample_app.display(tokenizer.decode(row))}")
  first = np.asarray(best.candidates.tokens_BxL[0])
  scores = np.asarray(best.scores_RxN[0])
  print_fn(f"[demo] prompted ({prompt!r}, generated part in [[...]]; candidate 1, score {scores[0]:.3f}):")
  print_fn(f"[demo]   {sample_app.display(sample_app.marked_text(tokenizer, first, fixed))}")
  print_fn(f"[demo] best of 4 by '{sc.score}' score: candidate {int(best.best_R[0]) + 1} (scores "
           f"{', '.join(f'{s:.3f}' for s in scores)}; lower is better):")
  print_fn(f"[demo]   {sample_app.display(sample_app.marked_text(tokenizer, np.asarray(best.tokens_RxL[0]), fixed))}")
  train_split = pipeline.load_split(config.data, "train", tokenizer)
  lm = metrics.BigramLM(train_split.ids, config.model.vocab_size, mask=train_split.mask)
  gen = metrics.generative_perplexity(tokens, lm)
  held = pipeline.load_split(config.data, "heldout", tokenizer)
  ref = metrics.generative_perplexity(held.ids[: max(len(tokens), 64), :seq_len], lm)
  print_fn(f"[demo] Gen PPL under a bigram scorer: samples {gen['gen_ppl']:.1f} (entropy {gen['entropy']:.2f} "
           f"nats), held-out text {ref['gen_ppl']:.1f} (entropy {ref['entropy']:.2f})")
  return {"samples": gen, "heldout": ref, "best_of_4_scores": scores.tolist()}
