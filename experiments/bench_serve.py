"""Serving benchmark of `langflow-jax serve`: closed-loop clients against the LangFlow and the AR server.

  python experiments/bench_serve.py [--quick] [--out experiments/results] [--workdir runs/bench_serving]
      [--length 128] [--concurrency 1,4,16,64] [--steps 16,32] [--mix 8,16,32,64] [--slots 16]
      [--requests 4] [--max-seconds 60] [--stream-every 4] [--server process|thread] [--train-steps 300]

Writes OUT/serve.md (tables, the finding, the targets, the machine line),
OUT/serve.json (every request's times) and OUT/serve.png.

Method
* Models: the ``serving:L`` pair of experiments/bench_serving.py
  (``serving_pair.py``: the ``tiny`` backbone at length L, LangFlow and its
  AR twin, the same config but ``objective.name``), trained by the same
  trainer in WORKDIR/{langflow,ar}_L<L> (an existing run is reused or
  resumed; ``--train-steps 0`` serves fresh weights, for timing only).
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

import asyncio
import json
import math
import os
import pathlib
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import jax
import numpy as np

import common
import harness
import serving_pair
from harness import fmt
from langflow_jax import checkpoint as ckpt_lib
from langflow_jax import engine as engine_lib
from langflow_jax import methods, plots, sampling, train

QUICK_DIR = "runs/bench_serve_quick"


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
  cfg = serving_pair.model_config(args.length, method, args.overrides, args.train_steps)
  cfg.sample.update(batch_size=args.slots)
  return cfg


def prepare_run(args, method: str) -> pathlib.Path:
  """A run directory with a checkpoint: trained (or resumed) to the config's steps, or fresh weights
  (saved, since the server reads a run directory)."""
  cfg = model_config(args, method)
  workdir = serving_pair.run_dir(args.workdir, method, args.length)
  if args.train_steps == 0:
    if not ckpt_lib.checkpoint_dir(workdir).exists():
      model = methods.create_model(cfg, seed=cfg.train.seed)
      tx = train.make_optimizer(cfg.optimizer, cfg.train.steps)
      ckpt_lib.save_state(workdir, 1, train.state_from_model(model, tx, cfg.train.seed), cfg)
      harness.log(f"[serve-bench] {workdir}: fresh weights (not trained)")
    return workdir
  serving_pair.train_run(cfg, workdir)
  return workdir


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """``langflow-jax serve`` as a process, or uvicorn in a thread of this one."""

  def __init__(self, args, workdir: pathlib.Path, *, steps: int, scheduler: str):
    import httpx

    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.proc = self.thread = None
    max_steps = max([steps, *args.steps, *args.mix])
    if args.server == "process":
      cmd = [sys.executable, "-m", "langflow_jax.cli", "serve", "--workdir", str(workdir), "--port", str(self.port),
             "--slots", str(args.slots), "--steps", str(steps), "--max-steps", str(max_steps), "--scheduler",
             scheduler, "--queue", str(4 * max(args.concurrency))]
      env = dict(os.environ, PYTHONPATH=str(harness.ROOT))
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
    harness.log(f"[serve-bench] server up at {self.url} ({workdir.name}, {scheduler}, default {steps} steps)")

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


def measure(args, url: str, method: str, steps: int | list[int], seed: int) -> list[dict]:
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
    harness.log(f"[serve-bench] {method} steps={steps} C={c}: p50 {fmt(row['p50_s'])} s, "
                f"ttfe {fmt(row['ttfe_p50_s'])} s, "
        f"{fmt(row['requests_per_s'])} req/s, {fmt(row['tokens_per_s'])} tok/s, {row['errors']} errors")
    rows.append(row)
  return rows


def library_latency(workdir: pathlib.Path, steps: int, length: int) -> float:
  """Seconds of one unconditional ``sampling.sample`` call (one candidate): the harness's median of 3
  after a compiling call."""
  _, model = train.load_model(str(workdir))
  opts = sampling.SamplerOptions(steps=steps)
  _, timing = harness.timed(
      lambda: sampling.sample(model, jax.random.PRNGKey(0), opts, num=1, seq_len=length).tokens_BxL, 3)
  return timing.seconds


def engine_latency(workdir: pathlib.Path, args) -> list[dict]:
  """The engine in this process (no HTTP) at concurrency 1, one pass a call and fused
  (``engine.FUSE_PASSES``): p50 time to the first event and to the answer per step count, over
  ``--requests`` requests after ``--warmup``; what the server adds beyond it is the HTTP layer."""
  from langflow_jax import serve

  service = serve.service_from_workdir(str(workdir), slots=args.slots, steps=args.steps[0],
                                       max_steps=max([*args.steps, *args.mix]), warmup=True)
  eng = service.engine.start()
  out = []
  try:
    for fuse in sorted({1, engine_lib.FUSE_PASSES}):
      eng.fuse_passes = fuse
      for steps in args.steps:
        firsts, dones, calls = [], [], eng.ticks
        for r in range(args.warmup + args.requests):
          finished, seen = threading.Event(), {}

          def on_event(e, seen=seen, finished=finished):
            now = time.perf_counter()
            seen.setdefault("first", now)
            if isinstance(e, (engine_lib.DoneEvent, engine_lib.ErrorEvent)):
              seen["done"] = now
              finished.set()

          start = time.perf_counter()
          eng.submit(engine_lib.Job(passes=steps, seed=r, stream_every=args.stream_every, on_event=on_event))
          finished.wait(600)
          if r == args.warmup - 1:
            calls = eng.ticks
          if r >= args.warmup:
            firsts.append(seen["first"] - start)
            dones.append(seen["done"] - start)
        out.append({"fuse_passes": fuse, "steps": steps, "first_event_p50_s": statistics.median(firsts),
                    "p50_s": statistics.median(dones), "calls_per_request": (eng.ticks - calls) / args.requests})
  finally:
    eng.stop()
  return out


def quality(cfg, rows: list[dict]) -> dict[str, dict]:
  """Gen. PPL (bigram) and entropy of up to 64 served outputs a server and step count."""
  scorers = {"bigram": common.bigram_scorer(cfg)}
  out = {}
  for row in rows:
    key = f"{row['method']} {_label(row['steps']) if row['steps'] else ''}".strip()
    ids = [x for x in row["ids"] if len(x) > 1]
    if ids and key not in out:
      out[key] = serving_pair.sample_quality(ids[:64], scorers)
  return out


# --------------------------------------------------------------------------- report


def _label(steps) -> str:
  return f"mix {','.join(map(str, steps))}" if isinstance(steps, list) else str(steps)


def report(data: dict, args) -> list[str]:
  """The report's sections (the harness adds the figure and the machine line)."""
  rows = data["rows"]
  lf = [r for r in rows if r["method"] == "langflow" and r.get("scheduler") == "stationary"
        and not isinstance(r["steps"], list)]
  ar_rows = [r for r in rows if r["method"] == "ar"]
  head = ["server", "steps", "concurrency", "p50 s", "p95 s", "p99 s", "p50 first event s", "req/s", "tok/s", "errors"]
  body = [[f"{r['method']} ({r.get('scheduler', 'stationary')})", _label(r["steps"]) if r["steps"] else "-",
           r["concurrency"], fmt(r["p50_s"]), fmt(r["p95_s"]), fmt(r["p99_s"]), fmt(r["ttfe_p50_s"]),
           fmt(r["requests_per_s"]), fmt(r["tokens_per_s"], 1), r["errors"]] for r in rows]
  title = [f"# Serving benchmark: `langflow-jax serve`, LangFlow against AR (length {args.length}, "
           f"{args.slots} slots)"]
  if args.quick:
    title.append("**QUICK SMOKE RUN: fresh weights of a tiny model; the numbers mean nothing.**")
  finding = []
  for steps in args.steps:
    mine = [r for r in lf if r["steps"] == steps]
    c = crossover_concurrency(mine, ar_rows)
    finding.append(f"- LangFlow at {steps} steps: " + (
        f"the AR server's p50 latency is at most LangFlow's from concurrency {c} on." if c is not None else
        "LangFlow's p50 latency is lower than the AR server's at every concurrency measured."))
  sched = {r["scheduler"]: r for r in rows if isinstance(r["steps"], list)
           and r["concurrency"] == data["scheduler_concurrency"]}
  if {"stationary", "static"} <= set(sched):
    a, b = sched["stationary"], sched["static"]
    ratio = (a["requests_per_s"] or 0) / max(b["requests_per_s"] or 1e-12, 1e-12)
    finding.append(f"- Mixed step counts ({_label(args.mix)}) at concurrency {data['scheduler_concurrency']}: the "
                   f"stationary batch serves {ratio:.2f}x the requests/s of the static one (p50 {fmt(a['p50_s'])} s "
                   f"against {fmt(b['p50_s'])} s); target: >= 1.5x at the same p50 or better.")
  for steps, lib in data["library_s"].items():
    one = [r for r in lf if r["steps"] == int(steps) and r["concurrency"] == 1]
    if one and one[0]["p50_s"]:
      finding.append(f"- Concurrency 1, {steps} steps: the server's p50 is {one[0]['p50_s'] / lib:.2f}x one "
                     f"`sampling.sample` call ({fmt(lib)} s; target <= 1.2x); first event at p50 "
                     f"{fmt(one[0]['ttfe_p50_s'])} s against {args.stream_every} steps' worth "
                     f"{fmt(lib * args.stream_every / int(steps))} s.")
  quality_rows = [[k, fmt(v["gen_ppl_bigram"], 1), fmt(v["entropy"], 3), v["num"]] for k, v in data["quality"].items()]
  engine_rows = [[r["fuse_passes"], r["steps"], fmt(r["first_event_p50_s"]), fmt(r["p50_s"]),
                  fmt(r["p50_s"] / data["library_s"][str(r["steps"])]) + "x", fmt(r["calls_per_request"], 1)]
                 for r in data.get("engine_in_process", [])]
  return [*title, "## Finding", "\n".join(finding), "## Latency and throughput", harness.markdown_table(head, body),
          "Latency is end to end (request sent to `[DONE]`); requests/s and tokens/s over the measured window "
          "(closed loop: each client sends its next request when the last is done). The server runs up to "
          f"`--fuse-passes` passes a call (its default, {engine_lib.FUSE_PASSES} here).",
          "## The engine without HTTP (concurrency 1)",
          harness.markdown_table(["passes a call (at most)", "steps", "p50 first event s", "p50 s",
                                  "x one `sampling.sample` call", "calls a request"], engine_rows),
          "The engine in the benchmark's own process, one request at a time; the server's figures above add "
          "the HTTP layer to these.",
          "## Quality of what was served",
          harness.markdown_table(["server", "Gen. PPL (bigram)", "entropy", "sequences"], quality_rows)]


def write_plot(out: pathlib.Path, rows: list[dict]) -> str:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  groups: dict[str, list[dict]] = {}
  for r in rows:
    groups.setdefault(f"{r['method']} {r.get('scheduler', '')} {_label(r['steps']) if r['steps'] else ''}".strip(),
                      []).append(r)
  for name, rs in groups.items():
    rs = sorted(rs, key=lambda r: r["concurrency"])
    xs = [r["concurrency"] for r in rs]
    ax1.plot(xs, [r["p50_s"] or np.nan for r in rs], marker="o", label=name)
    ax2.plot(xs, [r["requests_per_s"] or np.nan for r in rs], marker="o", label=name)
  for ax, title in ((ax1, "p50 latency (s)"), (ax2, "requests / s")):
    serving_pair.log_log_axes(ax, "concurrency (closed-loop clients)", title)
  ax2.legend(fontsize=7)
  return plots.save_figure(fig, out / "serve.png")


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
  p = serving_pair.parser(__doc__, "smoke run: fresh tiny models, length 32, concurrency 1,2", QUICK_DIR)
  p.add_argument("--length", type=int, default=None, help="sequence length (default 128)")
  p.add_argument("--concurrency", type=harness.ints, default=None, help="closed-loop clients (default 1,4,16,64)")
  p.add_argument("--steps", type=harness.ints, default=None, help="LangFlow step counts (default 16,32)")
  p.add_argument("--mix", type=harness.ints, default=None,
                 help="step counts of the scheduler comparison (default 8,16,32,64)")
  p.add_argument("--slots", type=int, default=None, help="slots of every server (default 16)")
  p.add_argument("--requests", type=int, default=None, help="requests per client (default 4)")
  p.add_argument("--max-seconds", type=float, default=None, help="stop sending after this long a point (default 120)")
  p.add_argument("--stream-every", type=int, default=None, help="an event every k passes / tokens (default 4)")
  p.add_argument("--warmup", type=int, default=None, help="warm-up requests before each point (default 2)")
  p.add_argument("--server", choices=("process", "thread"), default=None,
                 help="langflow-jax serve as a process (default) or uvicorn in this process (--quick)")
  full = dict(length=128, concurrency=[1, 4, 16, 64], steps=[16, 32], mix=[8, 16, 32, 64], slots=16, requests=4,
              max_seconds=120.0, stream_every=4, warmup=2, server="process")
  quick = dict(length=32, concurrency=[1, 2], steps=[2, 4], mix=[2, 4], slots=2, requests=2, max_seconds=60.0,
               stream_every=1, warmup=1, server="thread")
  return serving_pair.parse_args(p, argv, full, quick, QUICK_DIR)


def main(argv=None) -> pathlib.Path:
  args = parse_args(argv)
  runs = {m: prepare_run(args, m) for m in serving_pair.METHODS}
  rows = []
  sched_c = 16 if 16 in args.concurrency else max(args.concurrency)
  saved = args.concurrency
  for scheduler in ("stationary", "static"):  # every request names its steps: one server per scheduler
    server = Server(args, runs["langflow"], steps=args.steps[0], scheduler=scheduler)
    try:
      if scheduler == "stationary":
        for steps in args.steps:
          rows += [dict(r, scheduler=scheduler) for r in measure(args, server.url, "langflow", steps, args.seed)]
      args.concurrency = [sched_c]
      rows += [dict(r, scheduler=scheduler) for r in measure(args, server.url, "langflow", list(args.mix),
                                                             args.seed + 1)]
    finally:
      args.concurrency = saved
      server.stop()
  server = Server(args, runs["ar"], steps=args.steps[0], scheduler="stationary")
  try:
    rows += [dict(r, scheduler="stationary") for r in measure(args, server.url, "ar", None, args.seed)]
  finally:
    server.stop()
  library = {str(s): library_latency(runs["langflow"], s, args.length) for s in args.steps}
  in_process = engine_latency(runs["langflow"], args)
  served = quality(model_config(args, "langflow"), rows)
  for r in rows:
    r.pop("ids", None)  # scored above; the results file keeps the times
  data = {"rows": rows, "library_s": library, "engine_in_process": in_process, "quality": served,
          "scheduler_concurrency": sched_c, "args": vars(args),
          "crossover": {str(s): crossover_concurrency([r for r in rows if r["method"] == "langflow"
                                                       and r["steps"] == s], [r for r in rows if r["method"] == "ar"])
                        for s in args.steps}}
  figure = write_plot(args.out, rows)
  result = harness.write_results(args.out, "serve", report(data, args), [figure], data, args.quick)
  return pathlib.Path(result["table"])


if __name__ == "__main__":
  main()
