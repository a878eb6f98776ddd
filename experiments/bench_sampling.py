"""Sampling benchmark: step cost, latency to a full batch, quality against steps and best-of-n.

  python experiments/bench_sampling.py [--workdir runs/demo] [--quick]
  python experiments/bench_sampling.py --skip-quality --skip-latency --samplers euler --repeats 7

1. Cost of one sampler step relative to one denoiser forward pass, on the
   ``bench`` config (random weights; cost does not depend on them). The step
   cost is the slope (T(N2) - T(N1)) / (N2 - N1) of whole jitted runs, so the
   fixed costs (initial noise, final pass) cancel. Target: at most 1.1x. Also
   against one denoiser evaluation (the forward plus x_hat = E^T softmax, the
   quantity every step of the method consumes), and the FLOP floor of the
   ratio: a step does the forward's matmuls plus the [V, D] product of x_hat.
2. Latency to a full batch of samples for steps in {8, 16, 32, 64, 128}.
3. On a trained run (``--workdir``, default runs/demo): Gen. PPL under an
   autoregressive scorer (the Kneser-Ney bigram of the run's training split)
   and the mean per-sample unigram entropy, against steps and against
   best-of-n (n = 1, 2, 4, 8) by each score (ce, denoise, bound) with its cost;
   held-out text scored the same way for scale.

Compilation is excluded from every time (one warm-up call each); times are
medians of repeated runs. Figures on a shared CPU are contended.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

import common
import harness
from langflow_jax import config as config_lib
from langflow_jax import sampling, train
from langflow_jax.model import create_model, forward_matmul_flops_per_token


def step_cost(quick: bool, samplers: tuple[str, ...] = ("euler", "euler32", "heun", "multistep"),
              repeats: int | None = None, latency: bool = True) -> None:
  """The step-cost rows (and the latency table); ``repeats`` timed runs per
  measurement, by default 3 with ``quick`` and 5 without."""
  config = config_lib.load_config("bench")
  batch, length = (4, 64) if quick else (config.train.batch_size, config.data.seq_len)
  model = create_model(config)
  graphdef, state = nnx.split(model)
  key = jax.random.PRNGKey(0)
  z = jax.random.normal(key, (batch, length, model.hidden_size))
  s = jax.random.normal(jax.random.PRNGKey(1), z.shape)
  gamma = jnp.full((batch,), 5.0)
  forward = jax.jit(lambda st, z, g, s: nnx.merge(graphdef, st)(z, g, s))
  denoiser = jax.jit(lambda st, z, g, s: (lambda m: m.denoise(m(z, g, s)))(nnx.merge(graphdef, st)))
  repeats = repeats or (3 if quick else 5)
  t_fwd = harness.timed(lambda: forward(state, z, gamma, s), repeats)[1].seconds
  t_den = harness.timed(lambda: denoiser(state, z, gamma, s), repeats)[1].seconds
  m, d, v = config.model, model.hidden_size, model.vocab_size
  # + E^T softmax(logits): the x_hat every step needs
  floor = 1 + 2 * d * v / forward_matmul_flops_per_token(m, length)
  print(f"## Step cost (bench config: D={d}, {m.n_blocks} blocks, V={v}, "
        f"batch {batch} x {length} tokens, {jax.devices()[0].platform})\n")
  print(f"one network forward pass (logits): {t_fwd * 1e3:.2f} ms")
  print(f"one denoiser evaluation (logits and x_hat = E^T softmax(logits)): {t_den * 1e3:.2f} ms "
        f"= {t_den / t_fwd:.2f}x the forward")
  print(f"matmul FLOPs of a step over those of a forward: {floor:.3f} (the floor of step / forward)\n")
  print("| sampler | NFE/step | ms per step | step / forward | step / denoiser evaluation |")
  print("|---|---|---|---|---|")
  n1, n2 = (4, 12) if quick else (8, 40)
  variants = {"euler": ("euler (float64 update, official)", dict(update_dtype="float64")),
              "euler32": ("euler (float32 update)", dict(update_dtype="float32")),
              "heun": ("heun", dict(sampler="heun")), "multistep": ("multistep", dict(sampler="multistep"))}
  variants = [variants[name] for name in samplers]
  for label, kw in variants:
    times = {}
    for n in (n1, n2):
      options = sampling.SamplerOptions(steps=n, **kw)
      times[n] = harness.timed(lambda: sampling.sample(model, key, options, num=batch, seq_len=length).tokens_BxL,
                               repeats)[1].seconds
    per_step = (times[n2] - times[n1]) / (n2 - n1)
    print(f"| {label} | {sampling.SAMPLERS[options.sampler]} | {per_step * 1e3:.2f} | {per_step / t_fwd:.2f}x | "
          f"{per_step / t_den:.2f}x |")
  print()
  if not latency:
    return
  print(f"## Latency to a full batch ({batch} x {length} tokens, euler)\n")
  print("| steps | seconds | tokens/s |")
  print("|---|---|---|")
  for n in ((8, 16) if quick else (8, 16, 32, 64, 128)):
    options = sampling.SamplerOptions(steps=n)
    _, timing = harness.timed(lambda: sampling.sample(model, key, options, num=batch, seq_len=length).tokens_BxL, 2)
    t = timing.seconds
    print(f"| {n} | {t:.3f} | {batch * length / t:.0f} |")
  print()


def quality(workdir: str, quick: bool, num: int) -> None:
  config, model = train.load_model(workdir)
  seq_len = int(config.sample.seq_len or config.data.seq_len)
  num = 8 if quick else num
  lm = common.bigram_scorer(config)
  ref = common.gen_ppl(common.heldout(config).ids[:num, :seq_len], lm)
  key = jax.random.PRNGKey(0)
  print(f"## Quality on {workdir} ({num} samples of {seq_len} tokens; scorer: Kneser-Ney bigram of the train "
        f"split)\n")
  print(f"held-out text: Gen PPL {ref['gen_ppl']:.1f}, entropy {ref['entropy']:.3f}\n")
  print("| sampler | steps | NFE | Gen PPL | entropy |")
  print("|---|---|---|---|---|")
  steps_list = (8, 32) if quick else (8, 16, 32, 64, 128)
  samplers = ("euler", "multistep") if quick else ("euler", "heun", "multistep")
  for name in samplers:
    for n in steps_list:
      options = sampling.SamplerOptions(sampler=name, steps=n)
      out = sampling.sample(model, key, options, num=num, seq_len=seq_len)
      r = common.gen_ppl(out.tokens_BxL, lm)
      print(f"| {name} | {n} | {options.nfe} | {r['gen_ppl']:.1f} | {r['entropy']:.3f} |")
  print()
  steps = 32
  print(f"### Best-of-n (euler, {steps} steps)\n")
  print("| score | n | Gen PPL | entropy | mean score of the chosen | scoring ms per candidate |")
  print("|---|---|---|---|---|---|")
  for score in ("ce", "denoise", "bound"):
    for n in ((1, 2) if quick else (1, 2, 4, 8)):
      res = sampling.best_of_n(model, key, n, sampling.SamplerOptions(steps=steps), num=num, seq_len=seq_len,
                               score=score)
      r = common.gen_ppl(res.tokens_RxL, lm)
      _, timing = harness.timed(lambda: sampling.score_samples(model, res.candidates, score, key=key), 1)
      cost = timing.seconds / (num * n)
      print(f"| {score} | {n} | {r['gen_ppl']:.1f} | {r['entropy']:.3f} | {float(res.score_R.mean()):.3f} | "
            f"{cost * 1e3:.2f} |")
  print()


def main(argv=None) -> None:
  parser = harness.parser(__doc__, "small sizes: a smoke run")
  parser.add_argument("--workdir", default="runs/demo", help="a trained run for the quality tables")
  parser.add_argument("--skip-quality", action="store_true", help="timings only")
  parser.add_argument("--skip-timing", action="store_true", help="quality tables only")
  parser.add_argument("--num", type=int, default=64, help="samples per quality row")
  parser.add_argument("--samplers", default="euler,euler32,heun,multistep",
                      help="step-cost rows: euler (float64 update, official), euler32, heun, multistep")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed runs per step-cost measurement (default 5; 3 with --quick)")
  parser.add_argument("--skip-latency", action="store_true", help="no latency table")
  args = parser.parse_args(argv)
  print(f"# bench_sampling ({'quick, ' if args.quick else ''}jax {jax.__version__}, {jax.devices()[0]})\n")
  if not args.skip_timing:
    step_cost(args.quick, tuple(args.samplers.split(",")), args.repeats, not args.skip_latency)
  if not args.skip_quality:
    if (pathlib.Path(args.workdir) / "checkpoints").is_dir():
      quality(args.workdir, args.quick, args.num)
    else:
      print(f"(no trained run at {args.workdir}: train one with `make demo` for the quality tables)\n")
  print(f"Machine: {harness.machine_note()}.")


if __name__ == "__main__":
  main()
