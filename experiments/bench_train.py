"""Training throughput of the `bench` config against this machine's matmul peak.

    python experiments/bench_train.py [--steps 20] [--dtype float32|bfloat16] [--quick]

Prints tokens/s, model FLOP/s (matmul FLOPs of the forward and backward pass,
counted analytically, plus the self-conditioning pre-pass in the steps that
drew it) and that as a fraction of the peak of a large jitted float32 matmul
measured in the same run. XLA's own FLOP count of the compiled step (both
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


def matmul_peak(n: int = 4096, repeats: int = 5) -> float:
  """FLOP/s of an n x n float32 matmul under jit (median of repeats)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  _, timing = harness.timed(lambda: f(a), repeats)
  return 2 * n**3 / timing.seconds


def model_flops_per_token(config) -> tuple[float, float]:
  """Matmul FLOPs per token: (forward + backward, self-conditioning pre-pass)."""
  m = config.model
  forward = forward_matmul_flops_per_token(m, config.data.seq_len)
  sc_pass = forward + 2 * m.hidden_size * m.vocab_size if m.self_conditioning else 0.0  # + E^T softmax; no backward
  return 3 * forward, sc_pass  # backward = 2x forward


def main(argv=None) -> int:
  parser = harness.parser(__doc__, "3 steps, smaller peak matmul (smoke run)")
  parser.add_argument("--config", default="bench")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = parser.parse_args(argv)
  steps = 3 if args.quick else args.steps

  config = config_lib.load_config(args.config, [f"--config.model.compute_dtype={args.dtype}"])
  mesh = parallel.make_mesh(config.mesh)
  tx = train.make_optimizer(config.optimizer, config.train.steps)
  parts, state, shardings = train.init_train_state(config, mesh, tx)
  step_fn = train.jit_train_step(train.make_train_step(config, parts, tx), shardings, mesh)
  b, L, v = config.train.batch_size, config.data.seq_len, config.model.vocab_size
  rng = np.random.default_rng(0)
  batch = parallel.global_batch({"ids": rng.integers(0, v, (b, L), dtype=np.int32),
                                 "mask": np.ones((b, L), bool)}, mesh)

  compiled, compiling = harness.timed(lambda: step_fn.lower(state, batch).compile(), repeats=0)
  compile_s = compiling.seconds
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
  peak = matmul_peak(2048 if args.quick else 4096)

  tokens = b * L
  train_flops, sc_flops = model_flops_per_token(config)
  flops = tokens * (train_flops * steps + sc_flops * sum(sc_fracs))
  total_s = sum(times)
  with_sc = [t for t, f in zip(times, sc_fracs) if f > 0]
  without_sc = [t for t, f in zip(times, sc_fracs) if f == 0]

  def median_ms(ts):
    return f"{statistics.median(ts) * 1e3:.0f} ms ({len(ts)} steps)" if ts else "-"

  print(f"device:            {jax.devices()[0].device_kind} x {jax.device_count()} ({jax.default_backend()})")
  print(f"config:            {args.config}  D={config.model.hidden_size} blocks={config.model.n_blocks} "
        f"heads={config.model.n_heads} V={v} L={L} batch={b} dtype={args.dtype}")
  print(f"compile:           {compile_s:.1f} s")
  print(f"step (mean/{steps}):   {total_s / steps * 1e3:.0f} ms   median with self-cond pre-pass "
        f"{median_ms(with_sc)}, without {median_ms(without_sc)}")
  print(f"tokens/s:          {tokens * steps / total_s:,.0f}")
  print(f"model FLOP/step:   {flops / steps / 1e9:.1f} GFLOP (analytic, matmuls; pre-pass in "
        f"{sum(sc_fracs) / steps:.0%} of steps)   XLA count: {xla_flops / 1e9:.1f} GFLOP")
  print(f"model FLOP/s:      {flops / total_s / 1e9:.1f} GFLOP/s")
  print(f"matmul peak:       {peak / 1e9:.1f} GFLOP/s (jitted float32 {2048 if args.quick else 4096}^3)")
  print(f"fraction of peak:  {flops / total_s / peak:.1%}")
  print(f"machine:           {harness.machine_note()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
