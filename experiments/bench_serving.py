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
  ``objective.name=ar``, in WORKDIR/{langflow,ar}_L<L> (``serving_pair.py``,
  shared with bench_serve.py); an existing run is reused or resumed.
  Equal config, not equal parameter count: the AR twin has
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

import math
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import common
import harness
import serving_pair
import serving_report
from harness import Timing
from langflow_jax import evaluate, methods, sampling, train
from langflow_jax.baselines import ar
from langflow_jax.data import pipeline

METHODS = serving_pair.METHODS
PROBE_STEPS = (2, 4)  # short runs that complete a LangFlow line fit when few grid points are affordable
QUICK_DIR = "runs/bench_serving_quick"
# --quick: the bound's protocol shrunk with the model (the pair's own quick overrides come first)
QUICK_EVAL = ("config.eval.steps=2", "config.eval.batch_size=2")


# --------------------------------------------------------------------------- timing


def time_call(fn: Callable[[], jax.Array], args) -> tuple[Timing, jax.Array]:
  """The harness's timing of a run at this benchmark's ``--repeats`` and ``--max-run-s``, and its output."""
  out, timing = harness.timed(fn, max(args.repeats, 1), args.max_run_s)
  return timing, out


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


def trained_model(cfg, workdir: pathlib.Path, train_steps: int):
  """The EMA model of a run in ``workdir``, trained (or resumed) to ``cfg.train.steps``;
  a fresh model, kept in memory only, when ``train_steps`` is 0. Returns (model, training info)."""
  if train_steps == 0:
    return methods.create_model(cfg, seed=cfg.train.seed), {"trained_steps": 0}
  info = serving_pair.train_run(cfg, workdir)
  _, model = train.load_model(workdir, config=cfg)
  return model, info


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
  return harness.xla_flops(jax.jit(fn).lower(*args)) / length


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

  def __init__(self, args):
    self.args = args
    self.key = jax.random.PRNGKey(args.seed)

  # ----------------------------------------------------------------- latency

  def latency(self, models: dict, length: int) -> dict:
    a = self.args
    q_num = quality_num(a, length)
    rows, fits, samples, checks = [], {}, {}, []
    previous = None  # (batch, fit) of the last concurrency
    for batch in a.batches:
      t, out = time_call(ar_run(models["ar"], length, batch, self.key), a)
      rows.append({"method": "ar", "length": length, "batch": batch, "steps": None, **t.to_json()})
      if batch == q_num:
        samples[("ar", None)] = np.asarray(out)
      harness.log(f"[serving] L={length} B={batch} ar: {t.seconds:.3f} s (compile {t.compile_s:.1f} s)")
      measured: dict[int, Timing] = {}
      outputs: dict[int, np.ndarray] = {}

      def measure(steps: int) -> None:
        t, out = time_call(langflow_run(models["langflow"], length, batch, steps, self.key), a)
        measured[steps], outputs[steps] = t, np.asarray(out)
        harness.log(f"[serving] L={length} B={batch} langflow {steps} steps: {t.seconds:.3f} s "
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
                     **t.to_json()})
        if batch != q_num:
          continue
        if steps in outputs:
          samples[("langflow", steps)] = outputs[steps]
        else:  # one run for the quality table; its time checks the line fit
          out, once = harness.timed(langflow_run(models["langflow"], length, batch, steps, self.key), repeats=0)
          samples[("langflow", steps)] = np.asarray(out)
          took = once.seconds
          checks.append({"length": length, "batch": batch, "steps": steps, "first_call_s": took,
                         "predicted_s": t.seconds + probe_compile})
          harness.log(f"[serving] L={length} B={batch} langflow {steps} steps: one quality run {took:.1f} s "
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
    held = common.heldout(cfg)
    scorers = {"ar": ar.sequence_scorer(models["ar"]), "bigram": common.bigram_scorer(cfg)}

    def score(ids: np.ndarray) -> dict:
      return serving_pair.sample_quality(ids, scorers)

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
    harness.log(f"[serving] L={length} held-out: LangFlow bound PPL <= {bound.perplexity:.1f}, AR PPL "
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
        timing, _ = time_call(best_of_run(model, length, n, steps, 1, self.key), a)
        if timing.seconds <= t_ar or steps <= 2 or attempt == 2:
          break
        steps -= 1
      requests = quality_num(a, length)
      ids = np.asarray(best_of_run(model, length, n, steps, requests, jax.random.fold_in(self.key, 1))())
      rows.append({"n": n, "steps": steps, "budget_s": t_ar, "within_budget": timing.seconds <= t_ar,
                   **timing.to_json(), "_ids": ids})
      harness.log(f"[serving] L={length} best-of-{n}: {steps} steps in {timing.seconds:.3f} s "
               f"(AR: {t_ar:.3f} s)")
    return rows

  # ----------------------------------------------------------------- one length

  def run_length(self, length: int) -> dict:
    a = self.args
    configs = {m: serving_pair.model_config(length, m, a.overrides, a.train_steps) for m in METHODS}
    models, training, info = {}, {}, {}
    for m in METHODS:
      workdir = serving_pair.run_dir(a.workdir, m, length)
      models[m], training[m] = trained_model(configs[m], workdir, a.train_steps)
      info[m] = {"params": param_counts(models[m], configs[m].model.vocab_size),
                 "forward_flops_per_token": forward_flops_per_token(models[m], length)}
    lat = self.latency(models, length)
    samples = lat.pop("_samples")
    fits = lat.pop("_fits")
    quality = self.quality(configs, models, length, samples)
    t_ar = {r["batch"]: r["seconds"] for r in lat["rows"] if r["method"] == "ar"}
    best = self.best_of(models["langflow"], length, t_ar[min(t_ar)], fits) if min(t_ar) == 1 else []
    scorers = {"ar": ar.sequence_scorer(models["ar"])}
    for row in best:
      ids = row.pop("_ids", None)
      if ids is not None:
        q = serving_pair.sample_quality(ids, scorers)
        row.update(gen_ppl_ar=q["gen_ppl_ar"], entropy=q["entropy"])
    cross = {str(b): crossover_steps(t_ar[b], fits[b]) for b in fits}
    m = configs["langflow"].model
    return {"length": length, "model": {k: m[k] for k in ("hidden_size", "n_blocks", "n_heads", "cond_dim",
                                                          "mlp_ratio", "vocab_size", "max_length")},
            "training": training, "models": info, **lat, "crossover_steps": cross, "quality": quality,
            "best_of": best}


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
  parser = serving_pair.parser(
      __doc__, "smoke run: a 1-block width-32 model, length 32, batches 1,2, steps 2,4, fresh weights", QUICK_DIR)
  parser.add_argument("--lengths", type=harness.ints, default=None, help="output lengths (default 128,512)")
  parser.add_argument("--batches", type=harness.ints, default=None, help="concurrencies (default 1,4,16,64)")
  parser.add_argument("--steps", type=harness.ints, default=None, help="LangFlow step counts (default 8,16,32,64,128)")
  parser.add_argument("--best-of", type=harness.ints, default=None, help="best-of-n candidates (default 1,4,16)")
  parser.add_argument("--repeats", type=int, default=None, help="timed runs a point (default 3)")
  parser.add_argument("--max-run-s", type=float, default=None,
                      help="LangFlow runs predicted longer come from the line fit (default 3)")
  parser.add_argument("--quality-tokens", type=int, default=None,
                      help="tokens of samples a quality point: max(2, this // length) sequences (default 2048)")
  full = dict(lengths=[128, 512], batches=[1, 4, 16, 64], steps=[8, 16, 32, 64, 128], best_of=[1, 4, 16], repeats=3,
              max_run_s=3.0, quality_tokens=2048)
  quick = dict(lengths=[32], batches=[1, 2], steps=[2, 4], best_of=[2], repeats=1, max_run_s=30.0, quality_tokens=64)
  args = serving_pair.parse_args(parser, argv, full, quick, QUICK_DIR)
  if args.quick:
    args.overrides = [*QUICK_EVAL, *args.overrides]
  if args.train_steps is None:  # the config's, recorded so that the report and serving.json name it
    args.train_steps = int(serving_pair.model_config(args.lengths[0], "langflow", args.overrides, None).train.steps)
  return args


def main(argv=None) -> pathlib.Path:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  meta = {"argv": argv, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": harness.machine_info(),
          "load_start": harness.load_average(), "uptime_start": _uptime()}
  harness.log(f"[serving] {meta['machine']['device']}, {meta['machine']['cpu']}, load average {meta['load_start']}")
  bench = Bench(args)
  results = [bench.run_length(L) for L in args.lengths]
  meta["load_end"] = harness.load_average()
  figures = serving_report.write_plots(args.out, results, args)
  written = harness.write_results(args.out, "serving", serving_report.report(results, meta, args), figures,
                                  {"meta": meta, "args": vars(args), "results": results}, args.quick)
  return pathlib.Path(written["table"])


def _uptime() -> str:
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "n/a"


if __name__ == "__main__":
  main()
