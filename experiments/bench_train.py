"""Training throughput of the `bench` config against this machine's matmul peak.

    python experiments/bench_train.py [--steps 20] [--dtype float32|bfloat16|both] [--quick]
    python experiments/bench_train.py --breakdown [--steps 5] [--dtype ...]   # where a step's time goes
    python experiments/bench_train.py --loss-curves [--curve-config tiny --curve-steps 400]  # bf16 vs float32

Prints tokens/s, model FLOP/s (matmul FLOPs of the forward and backward pass,
counted analytically, plus the self-conditioning pre-pass in the steps that
drew it) and that as a fraction of the peak of a large jitted matmul measured
in the same run: float32, and bfloat16 inputs with float32 accumulation (the
``compute_dtype=bfloat16`` path's matmuls). ``--dtype both`` times the float32
and the bfloat16 step one after the other and prints their step-time ratio. XLA's own FLOP count of the compiled step (both
branches of the self-conditioning ``cond``) is printed beside it. Compile time
is reported separately. The pre-pass runs in about a quarter of the steps
(``objective.self_cond_prob``), so throughput is total FLOPs over total time
of all timed steps, not a median, which would mostly pick steps without it;
the median times of the steps with and without the pre-pass are printed too.

``--breakdown`` profiles the step by parts, each jitted and timed on its own
(median of ``--steps`` calls), without and with the self-conditioning pre-pass
(``objective.self_cond_prob`` 0 and 1): the network's forward pass, the
training objective's value, its value and gradient, the whole step (AdamW,
EMA, metrics). Each row gives its time in forward passes, XLA's FLOP count of
that compiled part and the rate it runs at against the float32 matmul peak:
what is not matmul work shows as a rate below the peak, and the step minus
the gradient is what the optimizer and the EMA cost.

``--loss-curves`` trains ``--curve-config`` for ``--curve-steps`` steps three
times by the trainer (``train_and_evaluate``, in ``--workdir``; a finished run
is reused): float32 with two seeds (``train.seed`` 0 and 1: the run-to-run
noise) and bfloat16 with seed 0. It prints the three training-CE curves, the
mean gap between the bf16 and the float32 curve of the same seed beside the
gap between the two float32 seeds, and each run's held-out CE.
"""

from __future__ import annotations

import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

import harness
from langflow_jax import config as config_lib
from langflow_jax import objective as objective_lib
from langflow_jax import parallel, reporting, train
from langflow_jax.model import forward_matmul_flops_per_token


def matmul_peak(n: int = 4096, repeats: int = 5, dtype=jnp.float32) -> float:
  """FLOP/s of an n x n matmul under jit (median of repeats), float32 accumulation."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
  _, timing = harness.timed(lambda: f(a), repeats)
  return 2 * n**3 / timing.seconds


def model_flops_per_token(config) -> tuple[float, float]:
  """Matmul FLOPs per token: (forward + backward, self-conditioning pre-pass)."""
  m = config.model
  forward = forward_matmul_flops_per_token(m, config.data.seq_len)
  sc_pass = forward + 2 * m.hidden_size * m.vocab_size if m.self_conditioning else 0.0  # + E^T softmax; no backward
  return 3 * forward, sc_pass  # backward = 2x forward


def setup(config_name: str, overrides: list[str]):
  """(config, mesh, optimizer, model parts, train state, its shardings, a random batch) of a config."""
  config = config_lib.load_config(config_name, overrides)
  mesh = parallel.make_mesh(config.mesh)
  tx = train.make_optimizer(config.optimizer, config.train.steps)
  parts, state, shardings = train.init_train_state(config, mesh, tx)
  b, L, v = config.train.batch_size, config.data.seq_len, config.model.vocab_size
  rng = np.random.default_rng(0)
  batch = parallel.global_batch({"ids": rng.integers(0, v, (b, L), dtype=np.int32),
                                 "mask": np.ones((b, L), bool)}, mesh)
  return config, mesh, tx, parts, state, shardings, batch


def measure(config_name: str, dtype: str, steps: int) -> dict:
  """Compiles and times ``steps`` train steps of ``config_name`` with matmuls in ``dtype``."""
  config, mesh, tx, parts, state, shardings, batch = setup(config_name, [f"--config.model.compute_dtype={dtype}"])
  step_fn = train.jit_train_step(train.make_train_step(config, parts, tx), shardings, mesh)
  b, L = config.train.batch_size, config.data.seq_len
  compiled, compiling = harness.timed(lambda: step_fn.lower(state, batch).compile(), repeats=0)
  xla_flops = harness.xla_flops(compiled)

  history = []  # every step's metrics: the first call is the harness's warm-up

  def one_step():
    nonlocal state
    state, metrics = compiled(state, batch)
    history.append(metrics["terms"])
    return metrics

  _, timing = harness.timed(one_step, repeats=steps)
  times = list(timing.times)
  sc_fracs = [float(t.self_cond_seqs) / max(float(t.num_seqs), 1.0) for t in history[1:]]
  train_flops, sc_flops = model_flops_per_token(config)
  tokens = b * L
  return {"config": config, "dtype": dtype, "compile_s": compiling.seconds, "xla_flops": xla_flops,
          "times": times, "sc_fracs": sc_fracs, "tokens": tokens,
          "flops": tokens * (train_flops * steps + sc_flops * sum(sc_fracs))}


def breakdown(config_name: str, self_cond_prob: float, repeats: int,
              dtype: str = "float32") -> dict[str, tuple[float, float]]:
  """{part: (median seconds, XLA FLOPs)} of the train step's parts at one self-conditioning probability."""
  config, mesh, tx, parts, state, shardings, batch = setup(
      config_name, [f"--config.objective.self_cond_prob={self_cond_prob}", f"--config.model.compute_dtype={dtype}"])
  objective = train.training_objective(config, mesh)
  grad_fn = train.make_grad_fn(config, parts, objective)
  b, L, d = config.train.batch_size, config.data.seq_len, config.model.hidden_size
  key, skip = jax.random.PRNGKey(0), jnp.float32(1.0)
  z_BxLxD = jax.random.normal(key, (b, L, d), jnp.float32)
  gamma_B = jnp.full((b,), 3.0, jnp.float32)

  def loss_value(params, batch):
    out = objective(parts.merge(params), batch["ids"], batch["mask"], key, skip_scale=skip)
    num_tokens = jnp.sum(batch["mask"].astype(jnp.float32))
    return objective_lib.total_loss(out.terms, config.objective, num_tokens, jnp.float32(b))

  pieces = {
      "network forward (logits)": (jax.jit(lambda params, z: parts.merge(params)(z, gamma_B, jnp.zeros_like(z))),
                                   (state.params, z_BxLxD)),
      "objective value": (jax.jit(loss_value), (state.params, batch)),
      "objective value and gradient": (jax.jit(lambda params, batch: grad_fn(params, batch, key, skip)[0]),
                                       (state.params, batch)),
  }
  out = {}
  for name, (fn, args) in pieces.items():
    compiled = fn.lower(*args).compile()
    _, timing = harness.timed(lambda: compiled(*args), repeats)
    out[name] = (timing.seconds, harness.xla_flops(compiled))
  step = train.jit_train_step(train.make_train_step(config, parts, tx, objective), shardings, mesh)
  compiled = step.lower(state, batch).compile()

  def one_step():
    nonlocal state
    state, metrics = compiled(state, batch)
    return metrics

  _, timing = harness.timed(one_step, repeats)
  out["train step (+ AdamW, EMA, metrics)"] = (timing.seconds, harness.xla_flops(compiled))
  return out


def report_breakdown(rows: dict[float, dict[str, tuple[float, float]]], peak: float, config_name: str,
                     dtype: str) -> None:
  probs = sorted(rows)
  print(f"train step by parts, config {config_name}, matmuls {dtype}; ms, x the network forward, XLA GFLOP, "
        f"fraction of the float32 matmul peak ({peak / 1e9:.1f} GFLOP/s)")
  print(f"{'':38}" + "".join(f"{'p_sc = ' + format(p, 'g'):>36}" for p in probs))
  for name in rows[probs[0]]:
    cells = []
    for p in probs:
      seconds, flops = rows[p][name]
      fwd = rows[p]["network forward (logits)"][0]
      cells.append(f"{seconds * 1e3:9.0f} {seconds / fwd:6.2f}x {flops / 1e9:8.1f} {flops / seconds / peak:8.1%}")
    print(f"{name:38}" + "".join(f"{c:>36}" for c in cells))
  for p in probs:
    r = rows[p]
    forward, value = r["network forward (logits)"][0], r["objective value"][0]
    grad, step = r["objective value and gradient"][0], r["train step (+ AdamW, EMA, metrics)"][0]
    print(f"p_sc = {p:g}: the backward takes {(grad - value) / forward:.2f} network forwards (its matmuls "
          f"are 2); the optimizer, EMA and metrics add {(step - grad) * 1e3:.0f} ms ({(step - grad) / step:.1%} "
          f"of the step)")


CURVE_RUNS = (("float32", 0), ("float32", 1), ("bfloat16", 0))


def loss_curves(config_name: str, steps: int, workdir: pathlib.Path) -> dict[tuple[str, int], list[dict]]:
  """{(dtype, seed): the run's metrics rows}, each trained (or reused) by the trainer."""
  out = {}
  for dtype, seed in CURVE_RUNS:
    run = workdir / f"{config_name}_{dtype}_seed{seed}_{steps}"
    rows = reporting.read_metrics(run)
    if not any(r["step"] == steps and "eval/ce" in r for r in rows):
      config = config_lib.load_config(config_name, [
          f"--config.model.compute_dtype={dtype}", f"--config.train.seed={seed}",
          f"--config.train.steps={steps}", f"--config.train.eval_every={steps}",
          f"--config.train.log_every={max(1, steps // 20)}"])
      harness.log(f"[bench_train] training {run.name} ...")
      train.train_and_evaluate(config, run)
      rows = reporting.read_metrics(run)
    out[(dtype, seed)] = rows
  return out


def report_loss_curves(curves: dict[tuple[str, int], list[dict]], config_name: str, steps: int) -> None:
  train_ce = {k: {r["step"]: r["train/ce"] for r in rows if "train/ce" in r} for k, rows in curves.items()}
  common = sorted(set.intersection(*(set(c) for c in train_ce.values())))
  names = [f"{d} seed {s}" for d, s in CURVE_RUNS]
  print(f"training CE (window means) of {config_name}, {steps} steps, by the trainer")
  print(f"{'step':>6}" + "".join(f"{n:>18}" for n in names))
  every = max(1, len(common) // 8)
  for step in common[::every] + ([common[-1]] if common[-1] not in common[::every] else []):
    print(f"{step:>6}" + "".join(f"{train_ce[k][step]:18.4f}" for k in CURVE_RUNS))
  (f32, s0), (_, s1), (bf16, _) = CURVE_RUNS
  gap = lambda a, b: float(np.mean([abs(train_ce[a][s] - train_ce[b][s]) for s in common]))  # noqa: E731
  print(f"mean |CE gap| over {len(common)} logged steps: bf16 - float32 (seed {s0}) "
        f"{gap((bf16, s0), (f32, s0)):.4f}; float32 seed {s1} - seed {s0} (run-to-run) "
        f"{gap((f32, s1), (f32, s0)):.4f}")
  final = {k: next(r["eval/ce"] for r in reversed(rows) if "eval/ce" in r) for k, rows in curves.items()}
  print("held-out CE (EMA) at the end: " + ", ".join(f"{n} {final[k]:.4f}" for n, k in zip(names, CURVE_RUNS)))


def report(r: dict, config_name: str, peaks: dict[str, float], peak_n: int) -> None:
  config, steps, times, sc_fracs = r["config"], len(r["times"]), r["times"], r["sc_fracs"]
  total_s = sum(times)
  with_sc = [t for t, f in zip(times, sc_fracs) if f > 0]
  without_sc = [t for t, f in zip(times, sc_fracs) if f == 0]

  def median_ms(ts):
    return f"{statistics.median(ts) * 1e3:.0f} ms ({len(ts)} steps)" if ts else "-"

  b, L = config.train.batch_size, config.data.seq_len
  print(f"device:            {jax.devices()[0].device_kind} x {jax.device_count()} ({jax.default_backend()})")
  print(f"config:            {config_name}  D={config.model.hidden_size} blocks={config.model.n_blocks} "
        f"heads={config.model.n_heads} V={config.model.vocab_size} L={L} batch={b} dtype={r['dtype']}")
  print(f"compile:           {r['compile_s']:.1f} s")
  print(f"step (mean/{steps}):   {total_s / steps * 1e3:.0f} ms   median with self-cond pre-pass "
        f"{median_ms(with_sc)}, without {median_ms(without_sc)}")
  print(f"tokens/s:          {r['tokens'] * steps / total_s:,.0f}")
  print(f"model FLOP/step:   {r['flops'] / steps / 1e9:.1f} GFLOP (analytic, matmuls; pre-pass in "
        f"{sum(sc_fracs) / steps:.0%} of steps)   XLA count: {r['xla_flops'] / 1e9:.1f} GFLOP")
  print(f"model FLOP/s:      {r['flops'] / total_s / 1e9:.1f} GFLOP/s")
  for dtype, peak in peaks.items():
    print(f"matmul peak:       {peak / 1e9:.1f} GFLOP/s (jitted {dtype} {peak_n}^3, float32 accumulation); "
          f"fraction of it: {r['flops'] / total_s / peak:.1%}")


def main(argv=None) -> int:
  parser = harness.parser(__doc__, "3 steps, smaller peak matmul (smoke run)")
  parser.add_argument("--config", default="bench")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "both"])
  parser.add_argument("--breakdown", action="store_true", help="time the step's parts instead (each --dtype)")
  parser.add_argument("--loss-curves", action="store_true", help="bf16 against float32 training curves instead")
  parser.add_argument("--curve-config", default="tiny")
  parser.add_argument("--curve-steps", type=int, default=400)
  parser.add_argument("--workdir", type=pathlib.Path, default=harness.ROOT / "runs" / "bench_train_curves")
  args = parser.parse_args(argv)
  steps = 3 if args.quick else args.steps
  peak_n = 2048 if args.quick else 4096
  dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
  if args.loss_curves:
    curve_steps = 4 if args.quick else args.curve_steps
    report_loss_curves(loss_curves(args.curve_config, curve_steps, args.workdir), args.curve_config, curve_steps)
    print(f"machine:           {harness.machine_note()}")
    return 0
  if args.breakdown:
    peak = matmul_peak(peak_n)
    for dtype in dtypes:
      report_breakdown({p: breakdown(args.config, p, steps, dtype) for p in (0.0, 1.0)}, peak, args.config, dtype)
    print(f"machine:           {harness.machine_note()}")
    return 0

  runs = {dtype: measure(args.config, dtype, steps) for dtype in dtypes}
  peaks = {dtype: matmul_peak(peak_n, dtype=jnp.dtype(dtype)) for dtype in ("float32", "bfloat16")}
  for dtype in dtypes:
    report(runs[dtype], args.config, peaks, peak_n)
  if len(runs) == 2:
    f32, bf16 = (sum(runs[d]["times"]) for d in dtypes)
    print(f"bf16 / float32:    step {bf16 / f32:.2f}x the time ({f32 / bf16:.2f}x the speed); "
          f"matmul peak {peaks['bfloat16'] / peaks['float32']:.2f}x")
  print(f"machine:           {harness.machine_note()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
