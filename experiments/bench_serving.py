"""Serving benchmark: LangFlow against its autoregressive twin on the same device.

  python experiments/bench_serving.py [--quick] [--out experiments/results] [--workdir runs/bench_serving]
      [--lengths 128,512] [--batches 1,4,16,64] [--steps 8,16,32,64,128] [--repeats 3] [--max-run-s 3]
      [--train-steps 300] [--quality-tokens 2048] [--config.model.x=y ...]

The question: when does LangFlow give the full output sooner than an
autoregressive decoder, at what quality, and where does batching take the
advantage away? Writes OUT/serving.md (tables, the finding in words, the
device and config), OUT/serving.json (every number) and two plots,
OUT/serving_latency.png (time to the full output against concurrency) and
OUT/serving_pareto.png (quality against latency, the crossover marked).

Method
* Models: for each output length L, the config ``serving:L`` (configs/serving.py)
  trained twice by the same trainer, as LangFlow and with
  ``objective.name=ar``, in WORKDIR/{langflow,ar}_L<L>; an existing run is
  reused or resumed. Equal config, not equal parameter count: the AR twin has
  no noise conditioning, so it has fewer weights; both counts and the XLA
  FLOPs of one forward pass are printed. ``--train-steps 0`` benchmarks fresh
  (untrained) weights, for timing only.
* Latency: wall time from the call to the tokens on the host for B sequences
  of L tokens (B = the concurrency), sampled unconditionally. LangFlow: the
  official Euler-EDM sampler with self-conditioning (float64 update off TPU),
  N network passes. AR: the jitted KV-cache decoder, temperature 1, no top-p.
  The first call compiles; its excess over the median is reported as
  compile time. Run time is the median of ``--repeats`` runs (one run when a
  run exceeds ``--max-run-s``). LangFlow's time is linear in N (one identical
  pass per step): step counts are run in increasing order while the predicted
  run stays under ``--max-run-s``, a + b N is fitted to the runs at that L and
  B (with 2- and 4-step runs added when fewer than two grid points were
  affordable), and the remaining points are reported from the fit, marked ~.
* Quality (``--quality-tokens`` tokens of samples a point, the same for every B):
  Gen. PPL of the samples under the trained AR model (the in-package scorer)
  and under a Kneser-Ney bigram of the training split (a scorer that favours
  neither model), with the mean per-sample unigram entropy; held-out text
  scored the same way for scale. On held-out text: LangFlow's likelihood
  bound (Heun, ``eval.steps``, Hutchinson) and the AR model's exact
  perplexity, over the same sequences.
* Best-of-n at equal wall-clock: with the time of one AR output at batch 1
  as the budget, the most steps N that best-of-n LangFlow (n candidates in
  one batch, ranked by the free ``ce`` score) fits by the fit, timed, and
  its chosen samples' quality.
* Crossovers: N_x = (T_AR - a) / b, the step count at which LangFlow's time
  equals AR's at the same L and B; LangFlow is faster below it.

Figures taken on a shared machine are contended; the load average is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from langflow_jax import config as config_lib  # noqa: E402
from langflow_jax import evaluate, methods, metrics, sampling, train  # noqa: E402
from langflow_jax.baselines import ar  # noqa: E402
from langflow_jax.data import pipeline  # noqa: E402
from langflow_jax.data.tokenizer import load_tokenizer  # noqa: E402
from langflow_jax.methods import create_model  # noqa: E402

METHODS = ("langflow", "ar")
PROBE_STEPS = (2, 4)  # short runs that complete a LangFlow line fit when few grid points are affordable
QUICK_MODEL = ("--config.model.hidden_size=32", "--config.model.cond_dim=16", "--config.model.n_blocks=1",
               "--config.model.n_heads=2", "--config.eval.steps=2", "--config.eval.batch_size=2")


# --------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
  """Seconds to the full output: a median of runs, or the line fit's value (``extrapolated``)."""

  seconds: float
  compile_s: float | None = None  # first call minus the median run
  runs: int = 0
  extrapolated: bool = False


def time_call(fn: Callable[[], Any], repeats: int, max_run_s: float) -> tuple[Timing, Any]:
  """Times fn() after a first (compiling) call; returns the timing and that call's output."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - start
  times = []
  while len(times) < max(repeats, 1):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
    if times[-1] > max_run_s:
      break
  median = statistics.median(times)
  return Timing(median, max(first - median, 0.0), len(times)), out


def fit_line(points: dict[int, float]) -> tuple[float, float]:
  """(a, b) of t = a + b N by least squares; a proportional fit if noise makes b <= 0."""
  n = np.asarray(sorted(points), np.float64)
  t = np.asarray([points[k] for k in sorted(points)], np.float64)
  if len(n) < 2:
    return 0.0, float(t[0] / n[0])
  b, a = np.polyfit(n, t, 1)
  if b <= 0:
    return 0.0, float(np.max(t / n))
  return float(a), float(b)


def predicted_seconds(steps: int, points: dict[int, float], previous: tuple[int, tuple[float, float]] | None,
                      batch: int) -> float:
  """What a LangFlow run of ``steps`` should take, to decide whether to run it.

  From this batch's runs: the line through them, or with one run the
  proportional bound t N' / N (a >= 0). With none: the last batch's line
  scaled by the batch ratio (per-sequence cost rarely grows with the batch;
  when it does, one run overshoots the cap). 0 when nothing is known.
  """
  if len(points) >= 2:
    a, b = fit_line(points)
    return a + b * steps
  if points:
    (n, t), = points.items()
    return t * steps / n
  if previous is not None:
    prev_batch, (a, b) = previous
    return (a + b * steps) * batch / prev_batch
  return 0.0


def quality_num(args, length: int) -> int:
  """Sequences a quality point: the same number of tokens at every length."""
  return max(2, args.quality_tokens // length)


def crossover_steps(t_ar: float, fit: tuple[float, float]) -> float:
  """N at which LangFlow's a + b N equals AR's time (LangFlow is faster below it)."""
  a, b = fit
  return (t_ar - a) / b


# --------------------------------------------------------------------------- models


def model_config(length: int, method: str, overrides: list[str], train_steps: int | None):
  cfg = config_lib.load_config(f"serving:{length}", [*overrides, f"--config.objective.name={method}"])
  if train_steps:
    cfg.train.steps = int(train_steps)
  return cfg


def trained_model(cfg, workdir: pathlib.Path, train_steps: int, log: Callable[[str], None]):
  """The EMA model of a run in ``workdir``, trained (or resumed) to ``cfg.train.steps``;
  a fresh model when ``train_steps`` is 0. Returns (model, summary)."""
  if train_steps == 0:
    return create_model(cfg, seed=cfg.train.seed), {"trained_steps": 0}
  start = time.perf_counter()
  summary = train.train_and_evaluate(cfg, workdir)
  _, model = train.load_model(workdir, config=cfg)
  history = [r for r in _metrics_rows(workdir) if "eval/ce" in r]
  info = {"trained_steps": int(summary["final_step"]), "train_seconds_this_call": time.perf_counter() - start,
          "tokens": int(summary["final_step"]) * cfg.train.batch_size * cfg.data.seq_len,
          "heldout_ce": history[-1]["eval/ce"] if history else None}
  log(f"[serving] {workdir}: {info['trained_steps']} steps, held-out CE {info['heldout_ce']}")
  return model, info


def _metrics_rows(workdir: pathlib.Path) -> list[dict]:
  from langflow_jax import reporting
  try:
    return reporting.read_metrics(workdir)
  except (FileNotFoundError, OSError):
    return []


def param_counts(model: nnx.Module, vocab_size: int) -> dict[str, int]:
  """All weights, and those outside the V x D embedding/output matrices."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  total = sum(x.size for x in leaves)
  vocab = sum(x.size for x in leaves if vocab_size in x.shape)
  return {"total": int(total), "non_embedding": int(total - vocab)}


def forward_flops_per_token(model: nnx.Module, length: int) -> float:
  """XLA's FLOP count of one forward pass over one sequence, per token."""
  graphdef, state = nnx.split(model)
  if isinstance(model, ar.ARTransformer):
    fn = lambda st, ids: nnx.merge(graphdef, st)(ids)
    args = (state, jnp.zeros((1, length), jnp.int32))
  else:
    z = jnp.zeros((1, length, model.hidden_size), jnp.float32)
    fn = lambda st, z, g, s: nnx.merge(graphdef, st)(z, g, s)
    args = (state, z, jnp.zeros((1,), jnp.float32), z)
  cost = jax.jit(fn).lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", float("nan"))) / length if cost else float("nan")


# --------------------------------------------------------------------------- runners


def method_run(method: str, model, length: int, batch: int, steps: int | None, key) -> Callable[[], jax.Array]:
  """``batch`` unconditional samples of ``length`` tokens by the method's own sampler
  (LangFlow: the official Euler sampler in ``steps`` steps; AR: the KV-cache decoder at temperature 1)."""
  m = methods.get(method)
  return lambda: m.generate(model, key, num=batch, length=length, steps=steps)[0]


def langflow_run(model, length: int, batch: int, steps: int, key) -> Callable[[], jax.Array]:
  return method_run("langflow", model, length, batch, steps, key)


def ar_run(model, length: int, batch: int, key) -> Callable[[], jax.Array]:
  return method_run("ar", model, length, batch, None, key)


def best_of_run(model, length: int, n: int, steps: int, requests: int, key) -> Callable[[], jax.Array]:
  options = sampling.SamplerOptions(steps=steps)
  return lambda: sampling.best_of_n(model, key, n, options, num=requests, seq_len=length, score="ce").tokens_RxL


# --------------------------------------------------------------------------- the benchmark


class Bench:
  """Runs every measurement of one length and keeps the numbers in ``self.result``."""

  def __init__(self, args, log: Callable[[str], None]):
    self.args = args
    self.log = log
    self.key = jax.random.PRNGKey(args.seed)

  # ----------------------------------------------------------------- latency

  def latency(self, models: dict, length: int) -> dict:
    a = self.args
    q_num = quality_num(a, length)
    rows, fits, samples, checks = [], {}, {}, []
    previous = None  # (batch, fit) of the last concurrency
    for batch in a.batches:
      t, out = time_call(ar_run(models["ar"], length, batch, self.key), a.repeats, a.max_run_s)
      rows.append({"method": "ar", "length": length, "batch": batch, "steps": None, **dataclasses.asdict(t)})
      if batch == q_num:
        samples[("ar", None)] = np.asarray(out)
      self.log(f"[serving] L={length} B={batch} ar: {t.seconds:.3f} s (compile {t.compile_s:.1f} s)")
      measured: dict[int, Timing] = {}
      outputs: dict[int, np.ndarray] = {}

      def measure(steps: int) -> None:
        t, out = time_call(langflow_run(models["langflow"], length, batch, steps, self.key), a.repeats, a.max_run_s)
        measured[steps], outputs[steps] = t, np.asarray(out)
        self.log(f"[serving] L={length} B={batch} langflow {steps} steps: {t.seconds:.3f} s "
                 f"(compile {t.compile_s:.1f} s)")

      for steps in sorted(a.steps):
        if predicted_seconds(steps, {n: m.seconds for n, m in measured.items()}, previous, batch) > a.max_run_s:
          break
        measure(steps)
      for steps in PROBE_STEPS:  # too few affordable points for a line: short runs fix it
        if len(measured) < 2 and steps not in measured:
          measure(steps)
      fit = fit_line({n: m.seconds for n, m in measured.items()})
      fits[batch], previous = fit, (batch, fit)
      probe_compile = statistics.median(m.compile_s for m in measured.values())
      for steps in sorted(a.steps):
        t = measured.get(steps) or Timing(fit[0] + fit[1] * steps, None, 0, extrapolated=True)
        rows.append({"method": "langflow", "length": length, "batch": batch, "steps": steps,
                     **dataclasses.asdict(t)})
        if batch != q_num:
          continue
        if steps in outputs:
          samples[("langflow", steps)] = outputs[steps]
        else:  # one run for the quality table; its time checks the line fit
          start = time.perf_counter()
          samples[("langflow", steps)] = np.asarray(jax.block_until_ready(
              langflow_run(models["langflow"], length, batch, steps, self.key)()))
          took = time.perf_counter() - start
          checks.append({"length": length, "batch": batch, "steps": steps, "first_call_s": took,
                         "predicted_s": t.seconds + probe_compile})
          self.log(f"[serving] L={length} B={batch} langflow {steps} steps: one quality run {took:.1f} s "
                   f"(fit + compile: {t.seconds + probe_compile:.1f} s)")
    for row in rows:
      row["tokens_per_s"] = row["batch"] * length / row["seconds"]
    missing = [k for k in [("ar", None)] + [("langflow", n) for n in a.steps] if k not in samples]
    for method, steps in missing:  # the quality batch is not one of the batches
      run = method_run(method, models[method], length, q_num, steps, self.key)
      samples[(method, steps)] = np.asarray(run())
    return {"rows": rows, "fits": {str(b): list(f) for b, f in fits.items()}, "fit_checks": checks,
            "_fits": fits, "_samples": samples}

  # ----------------------------------------------------------------- quality

  def quality(self, configs: dict, models: dict, length: int, samples: dict) -> dict:
    a = self.args
    cfg = configs["langflow"]
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train_split = pipeline.load_split(cfg.data, "train", tokenizer)
    held = pipeline.load_split(cfg.data, "heldout", tokenizer)
    bigram = metrics.BigramLM(train_split.ids, cfg.model.vocab_size, mask=train_split.mask)
    scorer = ar.sequence_scorer(models["ar"])

    def score(ids: np.ndarray) -> dict:
      under_ar = metrics.generative_perplexity(ids, scorer)
      under_bigram = metrics.generative_perplexity(ids, bigram)
      return {"gen_ppl_ar": under_ar["gen_ppl"], "gen_ppl_bigram": under_bigram["gen_ppl"],
              "entropy": metrics.sequence_unigram_entropy(ids), "num": int(len(ids))}

    rows = [{"method": m, "steps": s, **score(ids)} for (m, s), ids in sorted(
        samples.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))]
    reference = score(held.ids[: quality_num(a, length)])

    # held-out likelihood: LangFlow's bound and AR's exact NLL on the same sequences
    bound = evaluate.evaluate_model(cfg, models["langflow"], split="heldout")
    e = cfg.eval
    batch = next(pipeline.eval_batches(held, e.batch_size, 1))
    nll, count = ar.sequence_nll(models["ar"], batch["ids"], batch["mask"], score_first=True)
    ar_nats = float(np.sum(np.asarray(nll, np.float64)) / max(float(np.sum(np.asarray(count))), 1.0))
    heldout = {"sequences": bound.num_sequences, "tokens": bound.num_tokens,
               "langflow_bound_nats": bound.nats_per_token, "langflow_bound_stderr": bound.stderr,
               "langflow_bound_ppl": bound.perplexity, "ar_nats": ar_nats, "ar_ppl": math.exp(ar_nats),
               "protocol": f"Heun {e.steps} steps ({2 * e.steps} passes), {e.estimator}, {e.probes} probe, "
                           f"grid {e.grid}, EMA weights, seed {e.seed}"}
    self.log(f"[serving] L={length} held-out: LangFlow bound PPL <= {bound.perplexity:.1f}, AR PPL "
             f"{math.exp(ar_nats):.1f}")
    return {"samples": rows, "heldout_text": reference, "heldout": heldout}

  # ----------------------------------------------------------------- best-of-n

  def best_of(self, model, length: int, t_ar: float, fits: dict) -> list[dict]:
    a = self.args
    rows = []
    for n in a.best_of:
      if n not in fits:
        continue
      fa, fb = fits[n]
      steps = min(int(math.floor((t_ar - fa) / fb)), max(a.steps))
      if steps < 2:
        rows.append({"n": n, "steps": None, "needs_s": fa + 2 * fb, "budget_s": t_ar, "within_budget": False})
        continue
      for attempt in range(3):  # the fit is a prediction: step down while the real run overshoots
        timing, _ = time_call(best_of_run(model, length, n, steps, 1, self.key), a.repeats, a.max_run_s)
        if timing.seconds <= t_ar or steps <= 2 or attempt == 2:
          break
        steps -= 1
      requests = quality_num(a, length)
      ids = np.asarray(best_of_run(model, length, n, steps, requests, jax.random.fold_in(self.key, 1))())
      rows.append({"n": n, "steps": steps, "budget_s": t_ar, "within_budget": timing.seconds <= t_ar,
                   **dataclasses.asdict(timing), "_ids": ids})
      self.log(f"[serving] L={length} best-of-{n}: {steps} steps in {timing.seconds:.3f} s "
               f"(AR: {t_ar:.3f} s)")
    return rows

  # ----------------------------------------------------------------- one length

  def run_length(self, length: int) -> dict:
    a = self.args
    configs = {m: model_config(length, m, a.overrides, a.train_steps) for m in METHODS}
    models, training, info = {}, {}, {}
    for m in METHODS:
      workdir = pathlib.Path(a.workdir) / f"{m}_L{length}"
      models[m], training[m] = trained_model(configs[m], workdir, a.train_steps, self.log)
      info[m] = {"params": param_counts(models[m], configs[m].model.vocab_size),
                 "forward_flops_per_token": forward_flops_per_token(models[m], length)}
    lat = self.latency(models, length)
    samples = lat.pop("_samples")
    fits = lat.pop("_fits")
    quality = self.quality(configs, models, length, samples)
    t_ar = {r["batch"]: r["seconds"] for r in lat["rows"] if r["method"] == "ar"}
    best = self.best_of(models["langflow"], length, t_ar[min(t_ar)], fits) if min(t_ar) == 1 else []
    scorer = ar.sequence_scorer(models["ar"])
    for row in best:
      ids = row.pop("_ids", None)
      if ids is not None:
        row["gen_ppl_ar"] = metrics.generative_perplexity(ids, scorer)["gen_ppl"]
        row["entropy"] = metrics.sequence_unigram_entropy(ids)
    cross = {str(b): crossover_steps(t_ar[b], fits[b]) for b in fits}
    m = configs["langflow"].model
    return {"length": length, "model": {k: m[k] for k in ("hidden_size", "n_blocks", "n_heads", "cond_dim",
                                                          "mlp_ratio", "vocab_size", "max_length")},
            "training": training, "models": info, **lat, "crossover_steps": cross, "quality": quality,
            "best_of": best}


# --------------------------------------------------------------------------- report


def _fmt_s(row: dict) -> str:
  s = row["seconds"]
  text = f"{s:.3f}" if s < 10 else f"{s:.1f}"
  return ("~" + text) if row["extrapolated"] else text


def _fmt_n(x: float) -> str:
  return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def machine_info() -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  device = jax.devices()[0]
  return {"device": f"{device.platform}: {getattr(device, 'device_kind', str(device))}", "cpu": cpu,
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "python": platform.python_version()}


def load_average() -> str:
  try:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return "n/a"


def finding(results: list[dict], batches: list[int]) -> list[str]:
  """The answer in sentences, one paragraph a length, derived from the numbers."""
  paragraphs = []
  for r in results:
    L = r["length"]
    ar_t = {x["batch"]: x["seconds"] for x in r["rows"] if x["method"] == "ar"}
    lf = {(x["batch"], x["steps"]): x["seconds"] for x in r["rows"] if x["method"] == "langflow"}
    steps = sorted({s for _, s in lf})
    b0, b1 = min(batches), max(batches)
    cross = {int(b): v for b, v in r["crossover_steps"].items()}
    lo, hi = steps[0], steps[-1]
    words = []
    x0 = cross[b0]
    head = (f"**Length {L}.** At batch {b0}, AR with a KV cache gives the full output in {ar_t[b0]:.3f} s; "
            f"LangFlow takes {lf[(b0, lo)]:.3f} s at {lo} steps ({lf[(b0, lo)] / ar_t[b0]:.1f}x AR) and "
            f"{lf[(b0, hi)]:.3f} s at {hi} ({lf[(b0, hi)] / ar_t[b0]:.1f}x). ")
    if x0 < lo:
      head += (f"They break even at {max(x0, 0):.1f} steps, below the fewest steps measured: LangFlow is "
               "slower at every measured step count.")
    elif x0 >= hi:
      head += f"LangFlow is faster at every measured step count (break-even at {x0:.0f} steps)."
    else:
      head += f"LangFlow is faster up to {x0:.1f} steps and slower beyond."
    words.append(head)
    if b1 != b0:
      trend = "falls" if cross[b1] < x0 else "rises"
      words.append(f"The break-even step count {trend} from {max(x0, 0):.1f} at batch {b0} to "
                   f"{max(cross[b1], 0):.1f} at batch {b1}" +
                   (": batching takes away what advantage parallel decoding has, since the AR decoder "
                    "turns idle per-token steps into throughput while every LangFlow step already "
                    "processes the whole sequence." if trend == "falls" else
                    ": batching favours LangFlow here.") +
                   f" At batch {b1} AR reaches {b1 * L / ar_t[b1]:.0f} tokens/s against "
                   f"{b1 * L / lf[(b1, lo)]:.0f} for LangFlow at {lo} steps.")
    q = {(x["method"], x["steps"]): x for x in r["quality"]["samples"]}
    ar_q = q[("ar", None)]
    lf_lo, lf_hi = q[("langflow", lo)], q[("langflow", hi)]
    ref = r["quality"]["heldout_text"]
    ho = r["quality"]["heldout"]
    words.append(
        f"Quality: LangFlow's samples score Gen. PPL {lf_lo['gen_ppl_ar']:.0f} at {lo} steps and "
        f"{lf_hi['gen_ppl_ar']:.0f} at {hi} under the AR scorer (entropy {lf_lo['entropy']:.2f} / "
        f"{lf_hi['entropy']:.2f}) against {ar_q['gen_ppl_ar']:.0f} for AR's own samples (entropy "
        f"{ar_q['entropy']:.2f}; held-out text {ref['gen_ppl_ar']:.0f}, {ref['entropy']:.2f}); under the "
        f"bigram scorer {lf_hi['gen_ppl_bigram']:.0f} against {ar_q['gen_ppl_bigram']:.0f} (held-out text "
        f"{ref['gen_ppl_bigram']:.0f}). On held-out text LangFlow's bound gives PPL <= "
        f"{ho['langflow_bound_ppl']:.0f} and AR's PPL is {ho['ar_ppl']:.0f}.")
    dominating = [s for s in steps
                  if lf[(b0, s)] < ar_t[b0] and q[("langflow", s)]["gen_ppl_ar"] < ar_q["gen_ppl_ar"]]
    if dominating:
      words.append(f"Pareto: LangFlow at {', '.join(map(str, dominating))} steps is both faster and better than "
                   f"AR at batch {b0}.")
    else:
      words.append(f"Pareto: no LangFlow point is both faster than AR and better under the AR scorer at "
                   f"batch {b0}.")
    fitted = [x for x in r["best_of"] if x["within_budget"]]
    if fitted:
      parts = [f"best-of-{x['n']} at {x['steps']} steps ({x['seconds']:.3f} s, Gen. PPL {x['gen_ppl_ar']:.0f}, "
               f"entropy {x['entropy']:.2f})" for x in fitted]
      words.append(f"In the time of one AR output LangFlow fits {'; '.join(parts)}, against AR's "
                   f"{ar_q['gen_ppl_ar']:.0f}.")
    elif r["best_of"]:
      need = min(x["seconds"] if x["steps"] else x["needs_s"] for x in r["best_of"])
      words.append(f"In the time of one AR output ({ar_t[b0]:.3f} s) LangFlow cannot run even best-of-1 at 2 "
                   f"steps ({need:.3f} s).")
    paragraphs.append(" ".join(words))
  return paragraphs


def write_report(out: pathlib.Path, results: list[dict], meta: dict, args) -> pathlib.Path:
  lines = ["# Serving benchmark: LangFlow against autoregressive decoding", ""]
  lines += [f"Written by `python experiments/bench_serving.py{' ' + ' '.join(meta['argv']) if meta['argv'] else ''}` "
            f"on {meta['date']}.", ""]
  lines += ["## Finding", ""]
  lines += [p + "\n" for p in finding(results, args.batches)]
  trained = all(r["training"][m]["trained_steps"] for r in results for m in METHODS)
  lines += [
      ("Caveats: quality numbers come from models trained for a few hundred steps on a 2.3M-token corpus on a "
       "CPU; they order the methods at this budget, not at convergence. " if trained else
       "Caveats: fresh (untrained) weights: the quality numbers mean nothing, only the timings do. ") +
      f"Timings are wall-clock on a machine shared with other jobs (load average {meta['load_start']} at the "
      f"start, {meta['load_end']} at the end: 1, 5, 15 minutes), so they are contended; `~` marks a LangFlow "
      "time taken from its line fit in steps rather than measured.", ""]
  shapes = ", ".join(f"{quality_num(args, r['length'])} x {r['length']}" for r in results)
  lines += ["## Device and config", ""]
  m = meta["machine"]
  lines += [f"* device: {m['device']}, {m['cpu']}, {m['cpu_count']} cores; jax {m['jax']}, Python {m['python']}",
            f"* load average at start / end: {meta['load_start']} / {meta['load_end']} (`uptime`: "
            f"{meta['uptime_start']})"]
  if not args.quick and 1024 not in args.lengths:
    lines.append("* length 1024 not run (`--lengths 128,512,1024` adds it): on a 2-core CPU its model pair's "
                 "training and its batch-64 runs do not fit the benchmark's half hour.")
  for r in results:
    mc = r["model"]
    p = {k: r["models"][k]["params"] for k in METHODS}
    f = {k: r["models"][k]["forward_flops_per_token"] for k in METHODS}
    tr = r["training"]
    blocks = f"{mc['n_blocks']} block{'s' if mc['n_blocks'] != 1 else ''}"
    trained = (f" ({tr['langflow'].get('tokens', 0) / 1e3:.0f}k tokens each); the trainer's final held-out CE "
               f"(EMA) {_ce(tr['langflow'])} / {_ce(tr['ar'])} nats (LangFlow: denoising CE over noise levels, "
               "not a likelihood)" if tr["langflow"]["trained_steps"] else " (fresh weights: timing only)")
    lines.append(
        f"* length {r['length']}: config `serving:{r['length']}` (width {mc['hidden_size']}, {blocks}, "
        f"{mc['n_heads']} heads, MLP x{mc['mlp_ratio']}, vocab {mc['vocab_size']}); parameters LangFlow "
        f"{p['langflow']['total'] / 1e6:.3f}M ({p['langflow']['non_embedding'] / 1e6:.3f}M outside the V x D "
        f"matrices), AR {p['ar']['total'] / 1e6:.3f}M ({p['ar']['non_embedding'] / 1e6:.3f}M); forward FLOPs "
        f"per token (XLA) LangFlow {f['langflow'] / 1e6:.2f}M, AR {f['ar'] / 1e6:.2f}M; trained "
        f"{tr['langflow']['trained_steps']} / {tr['ar']['trained_steps']} steps{trained}")
  lines += [
      "* equal config, not equal parameter count: the AR twin drops the noise conditioning (gamma MLP, adaLN, "
      "self-conditioning input) and LangFlow adds the skip logits z E^T; matching weights would change the "
      "width or depth of one backbone and with it the per-token cost, so both counts are shown instead.",
      f"* LangFlow: official Euler-EDM sampler with self-conditioning, temperature 1, update in "
      f"{sampling.SamplerOptions().resolved_update_dtype()}; AR: KV-cache decoder under jit + lax.scan, "
      "temperature 1, top-p 1 (ancestral); both unconditional, float32 weights.",
      f"* timing: median of {args.repeats} timed run{'s' if args.repeats != 1 else ''} after a compiling first "
      f"call (one run when a run exceeds {args.max_run_s:g} s); compile = first call minus the median; "
      f"LangFlow points predicted above {args.max_run_s:g} s come from t = a + b N fitted to its runs at the "
      "same length and batch (`~`).",
      f"* quality: {args.quality_tokens} tokens a point ({shapes}), same seed; Gen. PPL = "
      "exp(sum NLL / sum (len - 1)) under the trained AR model of the same length and under a Kneser-Ney "
      "bigram of the training split; entropy = mean per-sample unigram entropy (nats).", ""]

  lines += ["## Time to the full output", "",
            "Seconds for B sequences (B = concurrency), and tokens/s = B x length / seconds.", ""]
  head = "| length | method | steps | " + " | ".join(f"B={b} s | B={b} tok/s" for b in args.batches)
  lines += [head + " | compile s (per B) |", "|" + "---|" * (3 + 2 * len(args.batches) + 1)]
  for r in results:
    groups = [("ar", None)] + [("langflow", s) for s in sorted(args.steps)]
    for method, steps in groups:
      rows = {x["batch"]: x for x in r["rows"] if x["method"] == method and x["steps"] == steps}
      cells = []
      for b in args.batches:
        x = rows[b]
        tps = ("~" if x["extrapolated"] else "") + f"{x['tokens_per_s']:.0f}"
        cells += [_fmt_s(x), tps]
      comp = "/".join("-" if rows[b]["compile_s"] is None else f"{rows[b]['compile_s']:.1f}" for b in args.batches)
      name = "AR (KV cache)" if method == "ar" else "LangFlow"
      lines.append(f"| {r['length']} | {name} | {steps if steps else r['length']} | " + " | ".join(cells) +
                   f" | {comp} |")
  lines += ["", "(AR's steps column: one decode step per token.)", ""]

  lines += ["## Break-even steps", "",
            "N_x = (T_AR - a) / b: the LangFlow step count whose time to the full output equals AR's at the same "
            "length and batch; LangFlow is faster below it.", ""]
  lines += ["| length | " + " | ".join(f"B={b}" for b in args.batches) + " |", "|" + "---|" * (1 + len(args.batches))]
  for r in results:
    lines.append(f"| {r['length']} | " + " | ".join(_fmt_n(r["crossover_steps"][str(b)]) for b in args.batches) + " |")
  checks = [c for r in results for c in r["fit_checks"]]
  if checks:
    worst = max(abs(c["first_call_s"] / c["predicted_s"] - 1) for c in checks)
    lines += ["", f"Check of the line fit: {len(checks)} extrapolated points were also run once for the quality "
              f"table; their first call (compile included) differs from fit + compile by at most {worst:.0%}."]
  lines.append("")

  lines += ["## Quality", "",
            "Samples of the quality batch (the same for every concurrency). AR's own samples are scored by the model "
            "that drew them, which favours them (their expected NLL is that model's entropy); the bigram column "
            "favours neither method.", ""]
  lines += ["| length | method | steps | Gen. PPL (AR scorer) | Gen. PPL (bigram) | entropy |",
            "|---|---|---|---|---|---|"]
  for r in results:
    for x in r["quality"]["samples"]:
      name = "AR (KV cache)" if x["method"] == "ar" else "LangFlow"
      lines.append(f"| {r['length']} | {name} | {x['steps'] or '-'} | {x['gen_ppl_ar']:.1f} | "
                   f"{x['gen_ppl_bigram']:.1f} | {x['entropy']:.2f} |")
    ref = r["quality"]["heldout_text"]
    lines.append(f"| {r['length']} | held-out text | - | {ref['gen_ppl_ar']:.1f} | {ref['gen_ppl_bigram']:.1f} | "
                 f"{ref['entropy']:.2f} |")
  lines += ["", "Held-out likelihood (same sequences for both):", "",
            "| length | sequences x tokens | LangFlow bound (nats/token) | LangFlow PPL <= | AR (nats/token) | "
            "AR PPL | bound protocol |", "|---|---|---|---|---|---|---|"]
  for r in results:
    h = r["quality"]["heldout"]
    lines.append(f"| {r['length']} | {h['sequences']} x {r['length']} | {h['langflow_bound_nats']:.3f} +- "
                 f"{h['langflow_bound_stderr']:.3f} | {h['langflow_bound_ppl']:.1f} | {h['ar_nats']:.3f} | "
                 f"{h['ar_ppl']:.1f} | {h['protocol']} |")
  lines.append("")

  lines += ["## Best-of-n LangFlow against one AR output at equal wall-clock", "",
            "Budget: AR's time to one full output at batch 1. Steps: the most the line fit at batch n allows "
            "(capped at the largest step count), lowered while the timed run overshoots; candidates ranked by the "
            f"free `ce` score; quality over {args.quality_tokens} tokens of requests.", ""]
  lines += ["| length | n | steps | seconds (1 request) | AR seconds | within budget | Gen. PPL (AR scorer) "
            "| entropy |", "|---|---|---|---|---|---|---|---|"]
  for r in results:
    ar_q = next(x for x in r["quality"]["samples"] if x["method"] == "ar")
    for x in r["best_of"]:
      if x.get("steps"):
        lines.append(f"| {r['length']} | {x['n']} | {x['steps']} | {x['seconds']:.3f} | {x['budget_s']:.3f} | "
                     f"{'yes' if x['within_budget'] else 'no'} | {x['gen_ppl_ar']:.1f} | {x['entropy']:.2f} |")
      else:
        lines.append(f"| {r['length']} | {x['n']} | - | ~{x['needs_s']:.3f} at 2 steps | {x['budget_s']:.3f} | no | "
                     "- | - |")
    t_ar = next(x["seconds"] for x in r["rows"] if x["method"] == "ar" and x["batch"] == min(args.batches))
    lines.append(f"| {r['length']} | AR, 1 sample | - | - | {t_ar:.3f} | - | {ar_q['gen_ppl_ar']:.1f} | "
                 f"{ar_q['entropy']:.2f} |")
  lines += ["", "## Plots", "", "![latency vs concurrency](serving_latency.png)", "",
            "![quality vs latency](serving_pareto.png)", ""]
  path = out / "serving.md"
  path.write_text("\n".join(lines))
  return path


def _ce(info: dict) -> str:
  return "n/a" if info.get("heldout_ce") is None else f"{info['heldout_ce']:.3f}"


# --------------------------------------------------------------------------- plots


def write_plots(out: pathlib.Path, results: list[dict], args) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = len(results)
  cmap = plt.get_cmap("viridis")
  steps = sorted(args.steps)
  colors = {s: cmap(i / max(len(steps) - 1, 1) * 0.85) for i, s in enumerate(steps)}

  fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
  for ax, r in zip(axes[0], results):
    for s in steps:
      rows = sorted((x for x in r["rows"] if x["method"] == "langflow" and x["steps"] == s), key=lambda x: x["batch"])
      bs = [x["batch"] for x in rows]
      ts = [x["seconds"] for x in rows]
      ax.plot(bs, ts, "-", color=colors[s], lw=1.2, label=f"LangFlow {s} steps")
      for x in rows:
        ax.plot(x["batch"], x["seconds"], "o", color=colors[s], mfc="white" if x["extrapolated"] else colors[s])
    rows = sorted((x for x in r["rows"] if x["method"] == "ar"), key=lambda x: x["batch"])
    ax.plot([x["batch"] for x in rows], [x["seconds"] for x in rows], "s-", color="crimson", lw=2.2,
            label="AR (KV cache)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrency (sequences per call)")
    ax.set_ylabel("seconds to the full output")
    ax.set_title(f"length {r['length']}")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].legend(fontsize=7, title="hollow: from the line fit", title_fontsize=7)
  fig.tight_layout()
  latency = out / "serving_latency.png"
  fig.savefig(latency, dpi=120)
  plt.close(fig)

  fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
  b0 = min(args.batches)
  for ax, r in zip(axes[0], results):
    q = {(x["method"], x["steps"]): x for x in r["quality"]["samples"]}
    lat = {(x["method"], x["steps"]): x["seconds"] for x in r["rows"] if x["batch"] == b0}
    xs = [lat[("langflow", s)] for s in steps]
    ys = [q[("langflow", s)]["gen_ppl_ar"] for s in steps]
    ax.plot(xs, ys, "o-", color="tab:blue", label=f"LangFlow (Euler, batch {b0})")
    for s, x, y in zip(steps, xs, ys):
      ax.annotate(f"{s}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    t_ar = lat[("ar", None)]
    y_ar = q[("ar", None)]["gen_ppl_ar"]
    ax.plot([t_ar], [y_ar], "*", ms=14, color="crimson", label="AR (KV cache), 1 sample")
    ax.axvline(t_ar, color="crimson", ls="--", lw=1)
    ref = r["quality"]["heldout_text"]["gen_ppl_ar"]
    ax.axhline(ref, color="gray", ls=":", lw=1, label="held-out text")
    fitted = [x for x in r["best_of"] if x.get("steps")]
    for x in fitted:  # hollow: over the budget
      ax.plot([x["seconds"]], [x["gen_ppl_ar"]], "D", color="tab:green",
              mfc="tab:green" if x["within_budget"] else "white")
      ax.annotate(f"best-of-{x['n']}, {x['steps']} st.", (x["seconds"], x["gen_ppl_ar"]),
                  textcoords="offset points", xytext=(4, -10), fontsize=7, color="tab:green")
    nx = r["crossover_steps"][str(b0)]
    if steps[0] <= nx <= steps[-1]:
      y_x = float(np.exp(np.interp(np.log(nx), np.log(steps), np.log(ys))))
      note = f"crossover: {nx:.1f} steps"
    else:
      y_x = fitted[0]["gen_ppl_ar"] if fitted and fitted[0]["n"] == 1 else y_ar
      note = f"crossover: {max(nx, 0):.1f} steps (outside the grid)"
    ax.plot([t_ar], [y_x], "X", ms=11, color="black", label=note)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"seconds to the full output (batch {b0})")
    ax.set_ylabel("Gen. PPL under the AR scorer (lower is better)")
    ax.set_title(f"length {r['length']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  pareto = out / "serving_pareto.png"
  fig.savefig(pareto, dpi=120)
  plt.close(fig)
  return [str(latency), str(pareto)]


# --------------------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: a 1-block width-32 model, length 32, batches 1,2, steps 2,4, fresh weights")
  parser.add_argument("--out", default=None,
                      help="where serving.md, .json and the plots go (default experiments/results; --quick: "
                           "runs/bench_serving_quick)")
  parser.add_argument("--workdir", default=None,
                      help="the trained runs, reused or resumed (default runs/bench_serving; --quick: "
                           "runs/bench_serving_quick)")
  parser.add_argument("--lengths", type=_ints, default=None, help="output lengths (default 128,512)")
  parser.add_argument("--batches", type=_ints, default=None, help="concurrencies (default 1,4,16,64)")
  parser.add_argument("--steps", type=_ints, default=None, help="LangFlow step counts (default 8,16,32,64,128)")
  parser.add_argument("--best-of", type=_ints, default=None, help="best-of-n candidates (default 1,4,16)")
  parser.add_argument("--repeats", type=int, default=None, help="timed runs a point (default 3)")
  parser.add_argument("--max-run-s", type=float, default=None,
                      help="LangFlow runs predicted longer come from the line fit (default 3)")
  parser.add_argument("--train-steps", type=int, default=None,
                      help="training steps a model (default: the config's 300; 0: fresh weights)")
  parser.add_argument("--quality-tokens", type=int, default=None,
                      help="tokens of samples a quality point: max(2, this // length) sequences (default 2048)")
  parser.add_argument("--seed", type=int, default=0)
  args, rest = parser.parse_known_args(argv)
  bad = [x for x in rest if not x.startswith("--config.")]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)}")
  quick = args.quick
  defaults = dict(out="runs/bench_serving_quick" if quick else "experiments/results",
                  workdir="runs/bench_serving_quick" if quick else "runs/bench_serving",
                  lengths=[32] if quick else [128, 512], batches=[1, 2] if quick else [1, 4, 16, 64],
                  steps=[2, 4] if quick else [8, 16, 32, 64, 128], best_of=[2] if quick else [1, 4, 16],
                  repeats=1 if quick else 3, max_run_s=30.0 if quick else 3.0, train_steps=0 if quick else None,
                  quality_tokens=64 if quick else 2048)
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  args.overrides = (list(QUICK_MODEL) if quick else []) + rest
  if args.train_steps is None:
    args.train_steps = int(model_config(args.lengths[0], "langflow", args.overrides, None).train.steps)
  return args


def main(argv=None) -> pathlib.Path:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  log = lambda s: print(s, flush=True)
  meta = {"argv": argv, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
          "load_start": load_average(), "uptime_start": _uptime()}
  log(f"[serving] {meta['machine']['device']}, {meta['machine']['cpu']}, load average {meta['load_start']}")
  bench = Bench(args, log)
  results = [bench.run_length(L) for L in args.lengths]
  meta["load_end"] = load_average()
  report = write_report(out, results, meta, args)
  plots = write_plots(out, results, args)
  (out / "serving.json").write_text(json.dumps({"meta": meta, "args": {k: v for k, v in vars(args).items()},
                                                "results": results}, indent=1, default=float) + "\n")
  log(report.read_text())
  log(f"[serving] wrote {report}, {out / 'serving.json'}, {', '.join(plots)}")
  return report


def _uptime() -> str:
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "n/a"


if __name__ == "__main__":
  main()
