"""Throughput per mesh layout and the ahead-of-time memory table.

    python experiments/bench_scaling.py            # full run (tens of minutes on a laptop)
    python experiments/bench_scaling.py --quick    # smoke run: tiny config, 3 layouts, 2 steps, one AOT row

1. tokens/s of the ``bench`` config's train step for several (data, fsdp,
   tensor) layouts of ``--devices`` simulated CPU devices, against one
   device. The simulated devices share the same cores, so the ratio is the
   overhead a layout adds (collectives, resharding, smaller kernels), not a
   speed-up.
2. per-device memory of the ``lm1b`` and ``owt`` train steps at 8, 64 and 256
   devices, pure data parallelism and pure FSDP, compiled ahead of time in a
   fresh process each (``langflow-jax aot``).
"""

from __future__ import annotations

import os
import pathlib

import harness  # imports no jax: the device count is set from the flags first

LAYOUTS = [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
QUICK_LAYOUTS = [(8, 1, 1), (1, 8, 1), (2, 2, 2)]
AOT_ROWS = [(c, n, layout) for c in ("lm1b", "owt") for n in (8, 64, 256) for layout in ("data", "fsdp")]
QUICK_AOT_ROWS = [("lm1b", 8, "fsdp")]


def time_layout(config, mesh_sizes, devices, steps: int) -> dict:
  import numpy as np

  from langflow_jax import parallel, train
  from langflow_jax.data import pipeline

  d, f, t = mesh_sizes
  config.mesh.update(data=d, fsdp=f, tensor=t)
  mesh = parallel.make_mesh(config.mesh, devices[:d * f * t])
  tx = train.make_optimizer(config.optimizer, config.train.steps)
  parts, state, shardings = train.init_train_state(config, mesh, tx)
  step = train.jit_train_step(train.make_train_step(config, parts, tx), shardings, mesh)
  split = pipeline.load_split(config.data, "train")
  it = pipeline.BatchIterator(split, config.train.batch_size, config.data.seed)
  batches = iter([parallel.global_batch(next(it), mesh) for _ in range(steps + 1)])

  def one_step():
    nonlocal state
    state, metrics = step(state, next(batches))
    return metrics

  # the first step compiles; the median of the others is the step time
  metrics, timing = harness.timed(one_step, repeats=steps)
  seconds, compile_s = timing.seconds, timing.compile_s
  tokens = config.train.batch_size * config.data.seq_len
  loss = float(np.asarray(metrics["terms"].ce_sum) / np.asarray(metrics["terms"].num_tokens))
  return {"layout": f"data={d} fsdp={f} tensor={t}", "devices": d * f * t, "step_s": seconds,
          "tokens_per_s": tokens / seconds, "compile_s": compile_s, "ce": loss}


def throughput_table(config_name: str, num_devices: int, steps: int, quick: bool) -> list[dict]:
  import jax

  from langflow_jax import config as config_lib

  devices = jax.devices()
  assert len(devices) >= num_devices, f"need {num_devices} devices, have {len(devices)}"
  rows = []
  for sizes in [(1, 1, 1)] + [l for l in (QUICK_LAYOUTS if quick else LAYOUTS)
                               if l[0] * l[1] * l[2] == num_devices]:
    config = config_lib.load_config(config_name)
    rows.append(time_layout(config, sizes, devices, steps))
    print(f"  {rows[-1]['layout']:<26} {rows[-1]['tokens_per_s']:9.0f} tok/s "
          f"(compile {rows[-1]['compile_s']:.0f} s)", flush=True)
  base = rows[0]["tokens_per_s"]
  for r in rows:
    r["overhead_vs_one_device"] = base / r["tokens_per_s"]
  return rows


def aot_table(rows: list[tuple[str, int, str]]) -> list[dict]:
  from langflow_jax import aot

  out = []
  for config_name, n, layout in rows:
    mesh = ["--config.mesh.data=-1", "--config.mesh.fsdp=1"] if layout == "data" else \
        ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]
    r, timing = harness.timed(lambda: aot.report_in_subprocess(config_name, mesh, n), repeats=0)
    out.append(dict(r.to_json(), layout=layout, wall_s=timing.seconds))
    print(f"  {config_name:<5} {n:>4} {layout:<5} params+EMA+Adam {r.state / aot.GiB:7.2f} GiB  "
          f"temp {r.temp / aot.GiB:7.2f} GiB  peak {r.peak / aot.GiB:7.2f} GiB", flush=True)
  return out


def main(argv=None) -> None:
  parser = harness.parser(__doc__, "smoke run")
  parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices for the throughput table")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per layout")
  parser.add_argument("--skip-aot", action="store_true", help="only the throughput table")
  parser.add_argument("--skip-throughput", action="store_true", help="only the AOT memory table")
  parser.add_argument("--out", type=pathlib.Path, default=None, help="also write the figures as JSON")
  args = parser.parse_args(argv)
  steps = args.steps or (2 if args.quick else 10)
  config_name = "tiny" if args.quick else "bench"

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["JAX_NUM_CPU_DEVICES"] = str(args.devices)
  import jax

  results = {"config": config_name, "jax": jax.__version__, "machine": harness.machine_note()}
  if not args.skip_throughput:
    print(f"{config_name} config, train step on {args.devices} simulated CPU devices sharing "
          f"{os.cpu_count()} cores ({steps} timed steps per layout)", flush=True)
    results["throughput"] = throughput_table(config_name, args.devices, steps, args.quick)
    print(f"\n{'layout':<26} {'tokens/s':>9} {'step ms':>8} {'overhead vs 1 device':>21}")
    for r in results["throughput"]:
      print(f"{r['layout']:<26} {r['tokens_per_s']:9.0f} {1000 * r['step_s']:8.1f} "
            f"{r['overhead_vs_one_device']:20.2f}x")

  if not args.skip_aot:
    print("\nahead-of-time memory per device (train step, CPU compile; state exact, temp an estimate)",
          flush=True)
    results["aot"] = aot_table(QUICK_AOT_ROWS if args.quick else AOT_ROWS)
    print(f"\n{'config':<6} {'devices':>7} {'layout':<6} {'seq/dev':>7} {'params':>9} {'EMA':>9} "
          f"{'Adam':>9} {'temp':>9} {'peak':>9}   (GiB)")
    g = lambda b: f"{b / 1024 ** 3:9.2f}"
    for r in results["aot"]:
      print(f"{r['config_name']:<6} {r['devices']:>7} {r['layout']:<6} {r['batch_per_device']:>7} "
            f"{g(r['params'])} {g(r['ema'])} {g(r['opt_state'])} {g(r['temp'])} {g(r['peak'])}")
  print(f"\nmachine: {results['machine']}")
  if args.out:
    harness.write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
