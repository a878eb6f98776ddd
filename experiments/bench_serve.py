"""Serving benchmark of `langflow-jax serve`: closed-loop clients against the LangFlow and the AR server.

  python experiments/bench_serve.py [--quick] [--out experiments/results] [--workdir runs/bench_serving]
      [--length 128] [--concurrency 1,4,16,64] [--steps 16,32] [--mix 8,16,32,64] [--slots 16]
      [--requests 4] [--max-seconds 60] [--stream-every 4] [--server process|thread] [--train-steps 300]

Writes OUT/serve.md (tables, the finding, the targets, the machine line),
OUT/serve.json (every request's times) and OUT/serve.png.

Method
* Models: the ``serving:L`` pair of experiments/bench_serving.py (the
  ``tiny`` backbone at length L, LangFlow and its AR twin, the same config
  but ``objective.name``), trained by the same trainer in WORKDIR/{langflow,ar}_L<L>
  (an existing run is reused or resumed; ``--train-steps 0`` serves fresh
  weights, for timing only).
* Servers: ``langflow-jax serve`` started as its own process (``--server
  process``; ``thread`` runs uvicorn in this process, for smoke runs), one
  after the other on the same machine, each with ``--slots`` slots and its
  shapes compiled before the clock starts, plus warm-up requests.
* Load: C closed-loop asyncio clients (httpx); each sends a streamed,
  unconditional request (LangFlow: all L positions; AR: L - 1 tokens after
  [BOS]), reads it to ``[DONE]``, and sends the next, ``--requests`` times or
  until ``--max-seconds``. End-to-end latency (p50/p95/p99), time to the first
  event (p50; LangFlow's first refinement pass after ``--stream-every`` steps,
  the AR's first ``--stream-every`` tokens), requests/s and tokens/s over the
  measured window; Gen. PPL (Kneser-Ney bigram of the training split) and
  unigram entropy of what was served.
* Schedulers: at equal slots, the stationary batch against the static one
  (a batch starts when every slot is free, after waiting up to 50 ms to fill,
  and runs until its slowest member is done), on requests whose step counts
  are drawn from ``--mix``: where requests differ the static batch waits for
  the slowest.
* Crossover: for each LangFlow step count, the lowest concurrency at which
  the AR server's p50 latency is at most LangFlow's.
* Overhead: the p50 at concurrency 1 against one ``sampling.sample`` call of
  the same request in this process (what ``langflow-jax sample`` runs, after
  compilation).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import pathlib
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from langflow_jax import checkpoint as ckpt_lib  # noqa: E402
from langflow_jax import config as config_lib  # noqa: E402
from langflow_jax import metrics, sampling, train  # noqa: E402
from langflow_jax.data import pipeline  # noqa: E402

QUICK_MODEL = ("config.model.hidden_size=32", "config.model.cond_dim=16", "config.model.n_blocks=1",
               "config.model.n_heads=2")


# --------------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float | None:
  """Linear-interpolated percentile (q in [0, 100]); None for no values."""
  if not values:
    return None
  v = sorted(values)
  pos = (len(v) - 1) * q / 100.0
  lo, hi = math.floor(pos), math.ceil(pos)
  return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(records: list[dict], window_s: float) -> dict[str, Any]:
  ok = [r for r in records if r["ok"]]
  lat = [r["end"] - r["start"] for r in ok]
  ttfe = [r["first"] - r["start"] for r in ok if r["first"] is not None]
  tokens = sum(r["tokens"] for r in ok)
  return {"requests": len(records), "ok": len(ok), "errors": len(records) - len(ok),
          "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95), "p99_s": percentile(lat, 99),
          "ttfe_p50_s": percentile(ttfe, 50), "window_s": window_s,
          "requests_per_s": len(ok) / window_s if window_s > 0 else None,
          "tokens_per_s": tokens / window_s if window_s > 0 else None}


def crossover_concurrency(lf_rows: list[dict], ar_rows: list[dict]) -> int | None:
  """The lowest concurrency at which the AR server's p50 latency is at most LangFlow's (None: never)."""
  ar = {r["concurrency"]: r["p50_s"] for r in ar_rows if r["p50_s"] is not None}
  for row in sorted(lf_rows, key=lambda r: r["concurrency"]):
    c = row["concurrency"]
    if c in ar and row["p50_s"] is not None and ar[c] <= row["p50_s"]:
      return c
  return None


# --------------------------------------------------------------------------- runs and servers


def model_config(args, method: str):
  overrides = [*(QUICK_MODEL if args.quick else ()), *args.overrides, f"config.objective.name={method}"]
  cfg = config_lib.load_config(f"serving:{args.length}", overrides)
  if args.train_steps:
    cfg.train.steps = int(args.train_steps)
  cfg.sample.update(batch_size=args.slots)
  return cfg


def prepare_run(args, method: str, log) -> pathlib.Path:
  """A run directory with a checkpoint: trained (or resumed) to the config's steps, or fresh weights."""
  cfg = model_config(args, method)
  workdir = pathlib.Path(args.workdir) / f"{method}_L{args.length}"
  if args.train_steps == 0:
    if not ckpt_lib.checkpoint_dir(workdir).exists():
      from langflow_jax.baselines import ar
      from langflow_jax.model import create_model

      model = (create_model if method == "langflow" else ar.create_model)(cfg, seed=cfg.train.seed)
      tx = train.make_optimizer(cfg.optimizer, cfg.train.steps)
      state = train.state_from_model(model, tx, cfg.train.seed)
      checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), async_save=False)
      checkpointer.save(1, state, ckpt_lib.meta_json(cfg, {"step": 1}), force=True)
      checkpointer.close()
      log(f"[serve-bench] {workdir}: fresh weights (not trained)")
    return workdir
  summary = train.train_and_evaluate(cfg, workdir)
  log(f"[serve-bench] {workdir}: trained {summary.get('final_step')} steps")
  return workdir


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """``langflow-jax serve`` as a process, or uvicorn in a thread of this one."""

  def __init__(self, args, workdir: pathlib.Path, *, steps: int, scheduler: str, log):
    import httpx

    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.proc = self.thread = None
    max_steps = max([steps, *args.steps, *args.mix])
    if args.server == "process":
      cmd = [sys.executable, "-m", "langflow_jax.cli", "serve", "--workdir", str(workdir), "--port", str(self.port),
             "--slots", str(args.slots), "--steps", str(steps), "--max-steps", str(max_steps), "--scheduler",
             scheduler, "--queue", str(4 * max(args.concurrency))]
      env = dict(os.environ, PYTHONPATH=str(ROOT))
      self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    else:
      import uvicorn

      from langflow_jax import serve

      service = serve.service_from_workdir(str(workdir), slots=args.slots, steps=steps, max_steps=max_steps,
                                           scheduler=scheduler, queue=4 * max(args.concurrency), warmup=False)
      config = uvicorn.Config(serve.create_app(service), host="127.0.0.1", port=self.port, log_level="warning")
      self.server = uvicorn.Server(config)
      self.thread = threading.Thread(target=self.server.run, daemon=True)
      self.thread.start()
    deadline = time.monotonic() + 900
    while True:
      if self.proc is not None and self.proc.poll() is not None:
        raise RuntimeError(f"the server exited: {self.proc.stdout.read()}")
      if time.monotonic() > deadline:
        raise RuntimeError("the server did not come up in 900 s")
      try:
        if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
          break
      except httpx.TransportError:
        pass
      time.sleep(0.2)
    log(f"[serve-bench] server up at {self.url} ({workdir.name}, {scheduler}, default {steps} steps)")

  def stop(self) -> None:
    if self.proc is not None:
      self.proc.terminate()
      try:
        self.proc.wait(120)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    if self.thread is not None:
      self.server.should_exit = True
      self.thread.join(120)


# --------------------------------------------------------------------------- load


async def one_request(client, body: dict) -> dict:
  start = time.perf_counter()
  first = None
  final = None
  ok = False
  try:
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
      if r.status_code == 200:
        async for line in r.aiter_lines():
          if not line.startswith("data: "):
            continue
          if first is None:
            first = time.perf_counter()
          data = line[6:]
          if data == "[DONE]":
            ok = final is not None
            break
          event = json.loads(data)
          if event.get("final"):
            final = event
      else:
        await r.aread()
  except Exception:  # counted as an error
    ok = False
  end = time.perf_counter()
  ids = final["choices"][0]["token_ids"] if final else []
  return {"start": start, "first": first, "end": end, "ok": ok, "tokens": len(ids), "ids": ids,
          "steps": body.get("steps")}


async def closed_loop(url: str, concurrency: int, make_body, requests_per_client: int, max_seconds: float,
                      warmup: int = 0) -> tuple[list[dict], float]:
  import httpx

  limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
  async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
    for i in range(warmup):
      await one_request(client, make_body(-1 - i))
    records: list[dict] = []
    t0 = time.perf_counter()
    counter = iter(range(1 << 30))

    async def worker():
      for _ in range(requests_per_client):
        if time.perf_counter() - t0 > max_seconds:
          break
        records.append(await one_request(client, make_body(next(counter))))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records, time.perf_counter() - t0


def measure(args, url: str, method: str, steps: int | list[int], log, seed: int) -> list[dict]:
  rows = []
  for c in args.concurrency:
    rng = random.Random(seed + c)

    def make_body(i, rng=rng):
      body = {"seed": (seed * 100003 + c * 1009 + i) % (2**31 - 1), "stream_every": args.stream_every}
      if method == "langflow":
        body["steps"] = rng.choice(steps) if isinstance(steps, list) else steps
      else:
        body.update(prompt="", max_tokens=args.length - 1)
      return body

    records, window = asyncio.run(closed_loop(url, c, make_body, args.requests, args.max_seconds,
                                              warmup=args.warmup))
    row = {"method": method, "steps": steps, "concurrency": c, **summarize(records, window),
           "records": [{k: r[k] for k in ("start", "first", "end", "ok", "tokens", "steps")} for r in records],
           "ids": [r["ids"] for r in records if r["ok"]]}
    log(f"[serve-bench] {method} steps={steps} C={c}: p50 {fmt(row['p50_s'])} s, ttfe {fmt(row['ttfe_p50_s'])} s, "
        f"{fmt(row['requests_per_s'])} req/s, {fmt(row['tokens_per_s'])} tok/s, {row['errors']} errors")
    rows.append(row)
  return rows


def library_latency(workdir: pathlib.Path, steps: int, length: int) -> float:
  """Seconds of one unconditional ``sampling.sample`` call (one candidate), compiled first."""
  _, model = train.load_model(str(workdir))
  opts = sampling.SamplerOptions(steps=steps)
  jax.block_until_ready(sampling.sample(model, jax.random.PRNGKey(0), opts, num=1, seq_len=length).tokens_BxL)
  times = []
  for i in range(3):
    t = time.perf_counter()
    jax.block_until_ready(sampling.sample(model, jax.random.PRNGKey(i + 1), opts, num=1, seq_len=length).tokens_BxL)
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def quality(cfg, rows: list[dict]) -> dict[str, dict]:
  split = pipeline.load_split(cfg.data, "train")
  lm = metrics.BigramLM(split.ids, cfg.model.vocab_size, mask=split.mask)
  out = {}
  for row in rows:
    key = f"{row['method']} {_label(row['steps']) if row['steps'] else ''}".strip()
    ids = [x for x in row["ids"] if len(x) > 1]
    if ids and key not in out:
      n = min(len(x) for x in ids)
      g = metrics.generative_perplexity(np.asarray([x[:n] for x in ids[:64]]), lm)
      out[key] = {"gen_ppl": float(g["gen_ppl"]), "entropy": float(g["entropy"]), "sequences": min(len(ids), 64)}
  return out


# --------------------------------------------------------------------------- report


def fmt(x, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "n/a"
  return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}"


def table(headers, rows) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def machine_line() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
  d = jax.devices()[0]
  return (f"{d.platform} ({getattr(d, 'device_kind', d)}), {cpu}, {os.cpu_count()} cores, jax {jax.__version__}; "
          f"load average (1, 5, 15 min) at the end: {load}")


def _label(steps) -> str:
  return f"mix {','.join(map(str, steps))}" if isinstance(steps, list) else str(steps)


def write_report(out: pathlib.Path, data: dict, args) -> pathlib.Path:
  rows = data["rows"]
  lf = [r for r in rows if r["method"] == "langflow" and r.get("scheduler") == "stationary"
        and not isinstance(r["steps"], list)]
  ar_rows = [r for r in rows if r["method"] == "ar"]
  head = ["server", "steps", "concurrency", "p50 s", "p95 s", "p99 s", "p50 first event s", "req/s", "tok/s", "errors"]
  body = [[f"{r['method']} ({r.get('scheduler', 'stationary')})", _label(r["steps"]) if r["steps"] else "-",
           r["concurrency"], fmt(r["p50_s"]), fmt(r["p95_s"]), fmt(r["p99_s"]), fmt(r["ttfe_p50_s"]),
           fmt(r["requests_per_s"]), fmt(r["tokens_per_s"], 1), r["errors"]] for r in rows]
  text = [f"# Serving benchmark: `langflow-jax serve`, LangFlow against AR (length {args.length}, "
          f"{args.slots} slots)", ""]
  if args.quick:
    text += ["**QUICK SMOKE RUN: fresh weights of a tiny model; the numbers mean nothing.**", ""]
  text += ["## Finding", ""]
  for steps in args.steps:
    mine = [r for r in lf if r["steps"] == steps]
    c = crossover_concurrency(mine, ar_rows)
    text.append(f"- LangFlow at {steps} steps: " + (
        f"the AR server's p50 latency is at most LangFlow's from concurrency {c} on." if c is not None else
        "LangFlow's p50 latency is lower than the AR server's at every concurrency measured."))
  sched = {r["scheduler"]: r for r in rows if isinstance(r["steps"], list)
           and r["concurrency"] == data["scheduler_concurrency"]}
  if {"stationary", "static"} <= set(sched):
    a, b = sched["stationary"], sched["static"]
    ratio = (a["requests_per_s"] or 0) / max(b["requests_per_s"] or 1e-12, 1e-12)
    text.append(f"- Mixed step counts ({_label(args.mix)}) at concurrency {data['scheduler_concurrency']}: the "
                f"stationary batch serves {ratio:.2f}x the requests/s of the static one (p50 {fmt(a['p50_s'])} s "
                f"against {fmt(b['p50_s'])} s); target: >= 1.5x at the same p50 or better.")
  for steps, lib in data["library_s"].items():
    one = [r for r in lf if r["steps"] == int(steps) and r["concurrency"] == 1]
    if one and one[0]["p50_s"]:
      text.append(f"- Concurrency 1, {steps} steps: the server's p50 is {one[0]['p50_s'] / lib:.2f}x one "
                  f"`sampling.sample` call ({fmt(lib)} s; target <= 1.2x); first event at p50 "
                  f"{fmt(one[0]['ttfe_p50_s'])} s against {args.stream_every} steps' worth "
                  f"{fmt(lib * args.stream_every / int(steps))} s.")
  text += ["", "## Latency and throughput", "", table(head, body), "",
           "Latency is end to end (request sent to `[DONE]`); requests/s and tokens/s over the measured window "
           "(closed loop: each client sends its next request when the last is done).", "",
           "## Quality of what was served", "",
           table(["server", "Gen. PPL (bigram)", "entropy", "sequences"],
                 [[k, fmt(v["gen_ppl"], 1), fmt(v["entropy"], 3), v["sequences"]] for k, v in data["quality"].items()]),
           "", f"![serve]({'serve.png'})", "", f"Machine: {data['machine']}.", ""]
  path = out / "serve.md"
  path.write_text("\n".join(text))
  return path


def write_plot(out: pathlib.Path, data: dict) -> pathlib.Path:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  groups: dict[str, list[dict]] = {}
  for r in data["rows"]:
    groups.setdefault(f"{r['method']} {r.get('scheduler', '')} {_label(r['steps']) if r['steps'] else ''}".strip(),
                      []).append(r)
  for name, rs in groups.items():
    rs = sorted(rs, key=lambda r: r["concurrency"])
    xs = [r["concurrency"] for r in rs]
    ax1.plot(xs, [r["p50_s"] or np.nan for r in rs], marker="o", label=name)
    ax2.plot(xs, [r["requests_per_s"] or np.nan for r in rs], marker="o", label=name)
  for ax, title in ((ax1, "p50 latency (s)"), (ax2, "requests / s")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrency (closed-loop clients)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
  ax2.legend(fontsize=7)
  fig.tight_layout()
  path = out / "serve.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# --------------------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="smoke run: fresh tiny models, length 32, concurrency 1,2")
  p.add_argument("--out", default=None, help="default experiments/results (--quick: runs/bench_serve_quick)")
  p.add_argument("--workdir", default=None, help="the runs (default runs/bench_serving; --quick: runs/bench_serve_quick)")
  p.add_argument("--length", type=int, default=None, help="sequence length (default 128)")
  p.add_argument("--concurrency", type=_ints, default=None, help="closed-loop clients (default 1,4,16,64)")
  p.add_argument("--steps", type=_ints, default=None, help="LangFlow step counts (default 16,32)")
  p.add_argument("--mix", type=_ints, default=None, help="step counts of the scheduler comparison (default 8,16,32,64)")
  p.add_argument("--slots", type=int, default=None, help="slots of every server (default 16)")
  p.add_argument("--requests", type=int, default=None, help="requests per client (default 4)")
  p.add_argument("--max-seconds", type=float, default=None, help="stop sending after this long a point (default 120)")
  p.add_argument("--stream-every", type=int, default=None, help="an event every k passes / tokens (default 4)")
  p.add_argument("--warmup", type=int, default=None, help="warm-up requests before each point (default 2)")
  p.add_argument("--server", choices=("process", "thread"), default=None,
                 help="langflow-jax serve as a process (default) or uvicorn in this process (--quick)")
  p.add_argument("--train-steps", type=int, default=None, help="training steps a model (default: the config's; 0: fresh)")
  p.add_argument("--seed", type=int, default=0)
  args, rest = p.parse_known_args(argv)
  bad = [x for x in rest if not x.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)}")
  q = args.quick
  defaults = dict(out="runs/bench_serve_quick" if q else "experiments/results",
                  workdir="runs/bench_serve_quick" if q else "runs/bench_serving", length=32 if q else 128,
                  concurrency=[1, 2] if q else [1, 4, 16, 64], steps=[2, 4] if q else [16, 32],
                  mix=[2, 4] if q else [8, 16, 32, 64], slots=2 if q else 16, requests=2 if q else 4,
                  max_seconds=60.0 if q else 120.0, stream_every=1 if q else 4, warmup=1 if q else 2,
                  server="thread" if q else "process", train_steps=0 if q else None)
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  args.overrides = [x[2:] for x in rest]
  return args


def main(argv=None) -> pathlib.Path:
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  log = lambda s: print(s, flush=True)
  runs = {m: prepare_run(args, m, log) for m in ("langflow", "ar")}
  rows = []
  sched_c = 16 if 16 in args.concurrency else max(args.concurrency)
  saved = args.concurrency
  for scheduler in ("stationary", "static"):  # every request names its steps: one server per scheduler
    server = Server(args, runs["langflow"], steps=args.steps[0], scheduler=scheduler, log=log)
    try:
      if scheduler == "stationary":
        for steps in args.steps:
          rows += [dict(r, scheduler=scheduler) for r in measure(args, server.url, "langflow", steps, log,
                                                                 args.seed)]
      args.concurrency = [sched_c]
      rows += [dict(r, scheduler=scheduler) for r in measure(args, server.url, "langflow", list(args.mix), log,
                                                             args.seed + 1)]
    finally:
      args.concurrency = saved
      server.stop()
  server = Server(args, runs["ar"], steps=args.steps[0], scheduler="stationary", log=log)
  try:
    rows += [dict(r, scheduler="stationary") for r in measure(args, server.url, "ar", None, log, args.seed)]
  finally:
    server.stop()
  library = {str(s): library_latency(runs["langflow"], s, args.length) for s in args.steps}
  cfg = model_config(args, "langflow")
  data = {"rows": rows, "library_s": library, "quality": quality(cfg, rows), "scheduler_concurrency": sched_c,
          "machine": machine_line(), "args": {k: v for k, v in vars(args).items()},
          "crossover": {str(s): crossover_concurrency([r for r in rows if r["method"] == "langflow"
                                                       and r["steps"] == s], [r for r in rows if r["method"] == "ar"])
                        for s in args.steps}}
  report = write_report(out, data, args)
  write_plot(out, data)
  for r in rows:
    r.pop("ids", None)
  (out / "serve.json").write_text(json.dumps(data, indent=1, default=float) + "\n")
  log(report.read_text())
  log(f"[serve-bench] wrote {report}, {out / 'serve.json'}, {out / 'serve.png'}")
  return report


if __name__ == "__main__":
  main()
