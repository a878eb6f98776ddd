"""Cost and convergence of the ODE likelihood bound on the ``bench`` config.

    python experiments/bench_likelihood.py            # full: batch 16, steps 16..256
    python experiments/bench_likelihood.py --quick    # smoke run: batch 2, steps 4..16
    python experiments/bench_likelihood.py --workdir runs/x   # a trained run instead of fresh weights
    python experiments/bench_likelihood.py --table-batch 1 --table-steps 16,32,64,128   # a cheaper table (2-core CPU)

Prints (1) the time of one vector-field evaluation (= one Euler step; a Heun
step is two) relative to one denoiser forward pass, for the forward-mode JVP
estimator used here in the ``sc_chain_rule`` (default) and ``flow`` modes and,
for comparison, the reverse-mode VJP form of the official code; (2) the bound and its terms against the number of steps for
Euler and Heun, and the adaptive solver's step count.

With fresh weights and the official zero output head (``model.logit_init_std=0``), the denoiser is the exact
posterior of i.i.d. uniform tokens and the bound converges to log V nats/token:
the table doubles as a check of the integrator.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

import harness
from langflow_jax import config as config_lib
from langflow_jax import evaluate, likelihood as lk, train
from langflow_jax.data import pipeline
from langflow_jax.model import create_model


def cost_table(model, batch: int, seq_len: int, reps: int) -> None:
  d = model.hidden_size
  graphdef, state = nnx.split(model)  # weights are arguments, not constants folded into the program
  z = jax.random.normal(jax.random.PRNGKey(0), (batch, seq_len, d))
  gamma = jnp.full((batch,), 4.0)
  mask = jnp.ones((batch, seq_len), bool)
  u1 = jax.random.normal(jax.random.PRNGKey(1), (1, batch, seq_len, d))
  u4 = jax.random.normal(jax.random.PRNGKey(2), (4, batch, seq_len, d))
  opts = lk.BoundOptions(mode="sc_chain_rule")
  flow = dataclasses.replace(opts, mode="flow")
  no_sc = dataclasses.replace(opts, self_cond=False)

  def vjp_field(m, z):  # the official form: u^T J from one backward pass
    x_sc = jax.lax.stop_gradient(m.denoise(m(z, gamma, None)))
    out, pullback = jax.vjp(lambda zz: m.denoise(m(zz, gamma, x_sc)), z)
    return out, jnp.sum(u1[0] * pullback(u1[0])[0], axis=(1, 2))

  rows = [
      ("network forward (logits)", lambda m, z: m(z, gamma)),
      ("denoiser x_hat with the self-cond pre-pass (2 forwards)",
       lambda m, z: m.denoise(m(z, gamma, m.denoise(m(z, gamma))))),
      ("ODE evaluation, JVP, 1 probe, self-cond, sc_chain_rule mode",
       lambda m, z: lk.denoiser_and_divergence(m, z, gamma, mask, u1, opts)),
      ("ODE evaluation, JVP, 1 probe, self-cond, flow mode",
       lambda m, z: lk.denoiser_and_divergence(m, z, gamma, mask, u1, flow)),
      ("ODE evaluation, JVP, 1 probe, no self-cond",
       lambda m, z: lk.denoiser_and_divergence(m, z, gamma, mask, u1, no_sc)),
      ("ODE evaluation, JVP, 4 probes, self-cond, sc_chain_rule mode",
       lambda m, z: lk.denoiser_and_divergence(m, z, gamma, mask, u4, opts)),
      ("ODE evaluation, VJP, 1 probe, self-cond, flow mode (official form)", vjp_field),
  ]
  base = base_flops = None
  print(f"\n(1) cost per vector-field evaluation (= one Euler step), batch {batch} x {seq_len} tokens; "
        "XLA's FLOP count of each program against the forward's: the work a row cannot do with less")
  print(f"{'':62s} {'ms':>9s} {'x forward':>10s} {'GFLOP':>8s} {'x forward':>10s}")
  for name, body in rows:
    fn = jax.jit(lambda state, z, body=body: body(nnx.merge(graphdef, state), z))
    compiled = fn.lower(state, z).compile()
    flops = harness.xla_flops(compiled)
    _, timing = harness.timed(lambda: compiled(state, z), reps)
    t = timing.seconds
    base, base_flops = base or t, base_flops or flops
    print(f"{name:62s} {1e3 * t:9.2f} {t / base:10.2f} {flops / 1e9:8.1f} {flops / base_flops:10.2f}", flush=True)
  print("An exact JVP repeats every matmul of the pass it differentiates on the tangent (a product of two "
        "activations, as in attention, twice), so it is at least two passes' work: flow mode = pre-pass + pass + "
        "tangent (>= 3 forwards), sc_chain_rule = both passes and both tangents (>= 4), no self-conditioning >= 2.")


def steps_table(model, config, split, batch: int, steps: list[int], adaptive_rtol: float, max_steps: int) -> None:
  print(f"\n(2) bound (nats/token) vs steps, {batch} held-out sequences of {config.data.seq_len} tokens, "
        f"official grid, 1 Gaussian probe, seed {config.eval.seed}")
  print(f"{'solver':8s} {'steps':>6s} {'evals':>6s} {'bound':>9s} {'reconst':>9s} {'flow':>9s} {'prior':>9s} "
        f"{'seconds':>8s}   (seconds include compilation)")
  base = lk.BoundOptions.from_config(config.eval)

  def row(name: str, opts: lk.BoundOptions) -> str:
    # One call, compilation included: a bound is run once per row, as `eval` runs it.
    totals, timing = harness.timed(lambda: evaluate.run_bound(model, split, opts, batch_size=batch, num_batches=1,
                                                              seed=config.eval.seed), repeats=0)
    per = totals.per_token()
    steps = totals.steps if opts.solver == "adaptive" else opts.steps  # the adaptive solver's own count
    return (f"{name:8s} {steps:6d} {totals.evals:6d} {sum(per.values()):9.4f} "
            f"{per['reconst']:9.4f} {per['flow']:9.4f} {per['prior']:9.4f} {timing.seconds:8.1f}")

  for solver in ("euler", "heun"):
    for n in steps:
      # One compilation per row: a grid padded to the longest would run every
      # row at the longest row's cost, and here the run time is what counts.
      print(row(solver, dataclasses.replace(base, solver=solver, steps=n)))
  opts = dataclasses.replace(base, solver="adaptive", rtol=adaptive_rtol, atol=adaptive_rtol, max_steps=max_steps)
  print(row("tsit5", opts) +
        f"   (adaptive, rtol = atol = {adaptive_rtol:g}; seconds include compilation)")


def main(argv=None) -> None:
  parser = harness.parser(__doc__, "smoke run: small batch, few steps")
  parser.add_argument("--config", default="bench")
  parser.add_argument("--workdir", default=None, help="evaluate a trained run instead of fresh weights")
  parser.add_argument("--table-batch", type=int, default=None,
                      help="sequences in the bound-vs-steps table (default: the config's batch)")
  parser.add_argument("--table-steps", type=harness.ints, default=None,
                      help="comma-separated step counts (default 16,32,64,128,256)")
  args = parser.parse_args(argv)

  if args.workdir:
    config, model = train.load_model(args.workdir)
    source = f"trained run {args.workdir} (EMA weights)"
  else:
    # the official zero head (not the default random one), so the bound's exact value is known
    config = config_lib.load_config(args.config, ["config.model.logit_init_std=0.0"])
    model = create_model(config, seed=0)
    source = (f"fresh weights of config '{args.config}': zero head, the bound's exact value is "
              f"log V = {math.log(config.model.vocab_size):.4f} nats/token")
  batch = 2 if args.quick else config.train.batch_size
  steps = [4, 8, 16] if args.quick else [16, 32, 64, 128, 256]
  steps = args.table_steps or steps
  print(f"bench_likelihood on {jax.devices()[0].platform}: {source}")
  print(f"model: vocab {config.model.vocab_size}, width {config.model.hidden_size}, {config.model.n_blocks} blocks, "
        f"length {config.data.seq_len}, matmuls {config.model.compute_dtype}")
  cost_table(model, batch, config.data.seq_len, reps=2 if args.quick else 5)
  split = pipeline.load_split(config.data, "heldout")
  steps_table(model, config, split, args.table_batch or batch, steps, adaptive_rtol=1e-2 if args.quick else 1e-3,
              max_steps=256 if args.quick else 4096)
  print(f"\nmachine: {harness.machine_note()}")


if __name__ == "__main__":
  main()
