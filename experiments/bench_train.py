"""Training throughput of the `bench` config against this machine's matmul peak.

    python experiments/bench_train.py [--steps 20] [--dtype float32|bfloat16|both] [--quick]

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
"""

from __future__ import annotations

import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

import harness
from langflow_jax import config as config_lib
from langflow_jax import parallel, train
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


def measure(config_name: str, dtype: str, steps: int) -> dict:
  """Compiles and times ``steps`` train steps of ``config_name`` with matmuls in ``dtype``."""
  config = config_lib.load_config(config_name, [f"--config.model.compute_dtype={dtype}"])
  mesh = parallel.make_mesh(config.mesh)
  tx = train.make_optimizer(config.optimizer, config.train.steps)
  parts, state, shardings = train.init_train_state(config, mesh, tx)
  step_fn = train.jit_train_step(train.make_train_step(config, parts, tx), shardings, mesh)
  b, L, v = config.train.batch_size, config.data.seq_len, config.model.vocab_size
  rng = np.random.default_rng(0)
  batch = parallel.global_batch({"ids": rng.integers(0, v, (b, L), dtype=np.int32),
                                 "mask": np.ones((b, L), bool)}, mesh)

  compiled, compiling = harness.timed(lambda: step_fn.lower(state, batch).compile(), repeats=0)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

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
  args = parser.parse_args(argv)
  steps = 3 if args.quick else args.steps
  dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)

  runs = {dtype: measure(args.config, dtype, steps) for dtype in dtypes}
  peak_n = 2048 if args.quick else 4096
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
