"""``langflow-jax serve``: an OpenAI-compatible HTTP server over the stationary batch.

    langflow-jax serve --workdir RUN [--host 127.0.0.1 --port 8000 --slots 16 --steps 32]

The application layer over :mod:`langflow_jax.engine` (starlette + uvicorn,
the ``serve`` extra). Endpoints:

* ``POST /v1/completions``: OpenAI's completions API. Standard fields
  ``prompt``, ``max_tokens``, ``n``, ``best_of``, ``temperature``, ``seed``,
  ``stream``, ``suffix`` (infill: the completion fills the gap between
  ``prompt`` and ``suffix``), ``top_p`` (AR only), ``model`` and ``user``
  (ignored), and ``echo``/``logprobs``/penalties at their defaults only.
  Extra fields: ``steps``, ``sampler``, ``stream_every`` (an event every k-th
  refinement pass), ``score`` (the best-of scorer). A LangFlow completion is
  the argmax decode of the positions after the prompt (``max_tokens`` of
  them; default: every position left), ``finish_reason`` "length".
* ``stream: true``: server-sent events. LangFlow sends one event for every
  ``stream_every``-th refinement pass, each with the current decode of the
  whole output (``"replace": true``: the text replaces the previous one), the
  pass index and gamma; the last event is the answer, then ``data: [DONE]``.
  The AR baseline streams new text (``"replace": false``) as usual.
* ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /v1/models``.

The MDLM baseline is served the same way (``steps``, ``top_p``, ``suffix``;
each event shows the unmasked tokens with the current proposals in the
masked positions).

Every bad field is a 400 whose JSON error names it (``error.param``); a full
queue is a 429 with ``Retry-After``; SIGTERM stops accepting connections,
finishes the requests in flight, then exits 0.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import json
import logging
import math
import pathlib
import secrets
import signal
import threading
import time
import uuid
from typing import AsyncIterator, Sequence

import numpy as np

from langflow_jax import engine as engine_lib
from langflow_jax import methods
from langflow_jax.errors import ConfigError, UserError
from langflow_jax.serving import BadRequest, Plan, RequestDefaults, RequestReader, Serving, is_int

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_SEED = 2**31 - 1
# Fields of OpenAI's completions API that are accepted only at their defaults.
DEFAULT_ONLY = {"echo": (False, None), "logprobs": (None, 0), "presence_penalty": (0, 0.0, None),
                "frequency_penalty": (0, 0.0, None), "logit_bias": (None, {}), "stop": (None, [], "")}
IGNORED = ("model", "user", "stream_options")
# Every method takes these; the method's own fields come from its entry in the registry (Serving.fields).
COMMON_FIELDS = ("prompt", "suffix", "max_tokens", "n", "best_of", "temperature", "seed", "stream", "stream_every",
                 *IGNORED, *DEFAULT_ONLY)


# --------------------------------------------------------------------------- metrics


class Histogram:
  def __init__(self, buckets: Sequence[float]):
    self.buckets = list(buckets)
    self.counts = [0] * (len(self.buckets) + 1)
    self.sum = 0.0
    self.count = 0

  def observe(self, value: float) -> None:
    self.counts[bisect.bisect_left(self.buckets, value)] += 1
    self.sum += value
    self.count += 1

  def lines(self, name: str, labels: str) -> list[str]:
    out, total = [], 0
    for le, c in zip([*self.buckets, math.inf], self.counts):
      total += c
      bound = "+Inf" if le == math.inf else repr(float(le))
      out.append(f'{name}_bucket{{{labels},le="{bound}"}} {total}')
    out += [f"{name}_sum{{{labels}}} {self.sum:.6f}", f"{name}_count{{{labels}}} {self.count}"]
    return out


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
  def __init__(self):
    self.lock = threading.Lock()
    self.requests = collections.Counter()  # by HTTP status
    self.latency = Histogram(LATENCY_BUCKETS)
    self.first_event = Histogram(LATENCY_BUCKETS)
    self.queue_wait = Histogram(LATENCY_BUCKETS)
    self.tokens = 0
    self.recent = collections.deque()  # (time, tokens) of the last minute's completions
    self.started = time.monotonic()

  def count(self, status: int) -> None:
    with self.lock:
      self.requests[status] += 1

  def completed(self, latency: float, tokens: int, queue_wait: float | None) -> None:
    now = time.monotonic()
    with self.lock:
      self.latency.observe(latency)
      if queue_wait is not None:
        self.queue_wait.observe(queue_wait)
      self.tokens += tokens
      self.recent.append((now, tokens))

  def tokens_per_s(self, window: float = 60.0) -> float:
    now = time.monotonic()
    with self.lock:
      while self.recent and self.recent[0][0] < now - window:
        self.recent.popleft()
      span = min(window, max(now - self.started, 1e-9))
      return sum(t for _, t in self.recent) / span


# --------------------------------------------------------------------------- the service


class Service:
  """A loaded run served through one engine: defaults, request checks, responses and metrics. What
  depends on the method is asked of ``serving`` (its entry in :mod:`langflow_jax.methods`)."""

  def __init__(self, engine: engine_lib.Engine, tokenizer, *, serving: Serving, length: int, model_name: str,
               defaults: RequestDefaults = RequestDefaults(), gap_tokens: int = 8):
    self.engine, self.tokenizer, self.serving = engine, tokenizer, serving
    self.length, self.model_name = int(length), model_name
    self.defaults = defaults
    self.gap_tokens = int(gap_tokens)
    self.metrics = Metrics()
    self.draining = False

  @property
  def kind(self) -> str:
    """The method served, as /health and the metrics labels name it."""
    return self.serving.name

  # ---- request checks

  def parse(self, body: bytes) -> Plan:
    if len(body) > MAX_BODY_BYTES:
      raise BadRequest(None, f"the request body is larger than {MAX_BODY_BYTES} bytes.", "body_too_large")
    try:
      text = body.decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRequest(None, f"the request body is not valid UTF-8 (byte 0x{body[e.start]:02x} at offset "
                             f"{e.start}).", "invalid_utf8") from e
    try:
      req = json.loads(text)
    except json.JSONDecodeError as e:
      raise BadRequest(None, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}.",
                       "invalid_json") from e
    if not isinstance(req, dict):
      raise BadRequest(None, "the request body must be a JSON object.", "invalid_json")
    return self.check(req)

  def check(self, req: dict) -> Plan:
    allowed = (*COMMON_FIELDS, *self.serving.fields)
    for key in req:
      if key not in allowed:
        taken_elsewhere = any(key in m.serving.fields for m in methods.METHODS.values())
        why = (f"this server runs the {self.kind} model, which does not take it" if taken_elsewhere
               else f"accepted fields: {', '.join(sorted(allowed))}")
        raise BadRequest(key, f"unknown field '{key}' ({why}).", "unknown_field")
    for key, defaults in DEFAULT_ONLY.items():
      if key in req and not any(req[key] == d and type(req[key]) is type(d) for d in defaults):
        raise BadRequest(key, f"'{key}' is not supported (send it at its default or leave it out).", "unsupported")

    read = RequestReader(req)
    get, int_in = read.get, read.int_in
    s = self.engine.num_slots
    n = int_in("n", 1, 1, s, f" (the server has {s} slots)")
    best_of = int_in("best_of", n, 1, s, f" (the server has {s} slots)")
    if best_of < n:
      raise BadRequest("best_of", f"'best_of'={best_of} must be at least n={n}.")
    stream = get("stream", False, lambda v: isinstance(v, bool), "true or false")
    if stream and best_of > n:
      raise BadRequest("best_of", "'best_of' > n cannot be streamed (the candidates are ranked when all are done).")
    stream_every = int_in("stream_every", 1, 1, 1 << 30)
    seed = int_in("seed", None, 0, MAX_SEED) if req.get("seed") is not None else secrets.randbelow(MAX_SEED)
    sampling_fields = self.serving.check(read, self.defaults)

    prompt = self._text(req, "prompt")
    suffix = self._text(req, "suffix")
    prompt_ids = self._encode(prompt, "prompt")
    if prompt_ids or self.serving.continues_prefix:
      prompt_ids = [self.tokenizer.bos_id, *prompt_ids]
    if len(prompt_ids) >= self.length:
      raise BadRequest("prompt", f"the prompt is {len(prompt_ids)} tokens long (with the separator), but samples have "
                                 f"{self.length} positions; shorten it to fewer than {self.length} tokens.",
                       "prompt_too_long")
    suffix_ids = self._encode(suffix, "suffix")
    if suffix_ids and self.serving.continues_prefix:
      raise BadRequest("suffix", f"'suffix' (infill) needs a diffusion model; the {self.serving.label} only "
                                 "continues.")
    if suffix_ids and not prompt_ids:
      prompt_ids = [self.tokenizer.bos_id]
    p = len(prompt_ids)
    room = self.length - p - len(suffix_ids)
    if room < 1:
      raise BadRequest("suffix", f"prompt and suffix take {p + len(suffix_ids)} of the {self.length} positions; "
                                 "nothing is left to fill.", "prompt_too_long")
    default_tokens = min(self.gap_tokens, room) if suffix_ids else room
    max_tokens = get("max_tokens", default_tokens, is_int, "an integer")
    if not 1 <= max_tokens <= room:
      raise BadRequest("max_tokens", f"'max_tokens'={max_tokens} is beyond the length: samples have {self.length} "
                                     f"positions and the prompt{' and suffix take' if suffix_ids else ' takes'} "
                                     f"{self.length - room}, so use 1 to {room}.")
    cond_ids = cond_fixed = None
    if prompt_ids:
      cond_ids = np.zeros((self.length,), np.int32)
      cond_fixed = np.zeros((self.length,), bool)
      cond_ids[:p], cond_fixed[:p] = prompt_ids, True
      if suffix_ids:
        q = p + max_tokens
        cond_ids[q:q + len(suffix_ids)], cond_fixed[q:q + len(suffix_ids)] = suffix_ids, True
    return Plan(n=n, best_of=best_of, max_tokens=max_tokens, temperature=float(sampling_fields["temperature"]),
                seed=int(seed), stream=stream, stream_every=stream_every, steps=int(sampling_fields["steps"]),
                sampler=sampling_fields["sampler"], score=sampling_fields["score"] if best_of > n else None,
                top_p=float(sampling_fields["top_p"]), cond_ids=cond_ids, cond_fixed=cond_fixed,
                span=(p, p + max_tokens), prompt_tokens=p + len(suffix_ids))

  @staticmethod
  def _text(req: dict, key: str) -> str:
    v = req.get(key)
    if v is None:
      return ""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
      v = v[0]  # OpenAI's batched form with one prompt
    if not isinstance(v, str):
      raise BadRequest(key, f"'{key}' must be a string (one prompt per request), got {json.dumps(v)[:40]}.",
                       "invalid_type")
    try:
      v.encode("utf-8")
    except UnicodeEncodeError as e:
      raise BadRequest(key, f"'{key}' is not valid Unicode text (a lone surrogate at character {e.start}).",
                       "invalid_text") from e
    return v

  def _encode(self, text: str, key: str) -> list[int]:
    if not text.strip():
      return []
    try:
      return list(self.tokenizer.encode(text))
    except Exception as e:
      raise BadRequest(key, f"'{key}' could not be tokenized: {e}.", "invalid_text") from e

  # ---- running a request

  def job(self, plan: Plan, on_event) -> engine_lib.Job:
    return self.serving.job(plan, on_event)

  def decode(self, plan: Plan, row: np.ndarray, upto: int | None = None) -> str:
    a, b = plan.span
    return self.tokenizer.decode([int(t) for t in row[a:b if upto is None else min(b, upto)]])

  def head(self, cid: str) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": self.model_name}

  def final_choices(self, plan: Plan, done: engine_lib.DoneEvent) -> tuple[list[dict], list[float] | None]:
    order = list(range(plan.n))
    scores = None if done.scores_R is None else [float(x) for x in done.scores_R]
    if scores is not None:
      order = sorted(range(plan.best_of), key=lambda j: (scores[j], j))[:plan.n]
    a, b = plan.span
    choices = []
    for index, j in enumerate(order):
      c = {"index": index, "text": self.decode(plan, done.tokens_RxL[j]), "logprobs": None, "finish_reason": "length",
           "token_ids": [int(t) for t in done.tokens_RxL[j][a:b]]}
      if scores is not None:
        c.update(candidate=j, score=scores[j])
      choices.append(c)
    return choices, scores

  def usage(self, plan: Plan) -> dict:
    done = plan.n * plan.max_tokens
    return {"prompt_tokens": plan.prompt_tokens, "completion_tokens": done, "total_tokens": plan.prompt_tokens + done}

  def extras(self, plan: Plan) -> dict:
    return {"seed": plan.seed, "best_of": plan.best_of, **{f: getattr(plan, f) for f in self.serving.echoed}}


# --------------------------------------------------------------------------- HTTP


def _error(status: int, message: str, param=None, code=None, headers=None):
  from starlette.responses import JSONResponse

  body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                    "param": param, "code": code}}
  return JSONResponse(body, status_code=status, headers=headers)


def create_app(service: Service, *, manage_engine: bool = True):
  """The Starlette app; with ``manage_engine`` its lifespan starts the engine and drains it on shutdown."""
  from starlette.applications import Starlette
  from starlette.requests import Request
  from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
  from starlette.routing import Route

  engine = service.engine
  metrics = service.metrics

  def reply(response, started: float | None = None):
    metrics.count(response.status_code)
    return response

  async def completions(request: Request):
    started = time.monotonic()
    if service.draining or engine.stopping:
      return reply(_error(503, "the server is shutting down.", code="shutting_down"))
    body = await request.body()
    try:
      plan = service.parse(body)
    except BadRequest as e:
      return reply(JSONResponse(e.body(), status_code=400))
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def on_event(event):
      loop.call_soon_threadsafe(queue.put_nowait, event)

    job = service.job(plan, on_event)
    try:
      engine.submit(job)
    except engine_lib.QueueFull as e:
      return reply(_error(429, f"the queue is full ({engine.queue_limit} waiting requests); retry later.",
                          code="queue_full", headers={"Retry-After": str(e.retry_after)}))
    except engine_lib.EngineStopped:
      return reply(_error(503, "the server is shutting down.", code="shutting_down"))
    cid = f"cmpl-{uuid.uuid4().hex[:24]}"
    if plan.stream:
      metrics.count(200)
      return StreamingResponse(_events(service, plan, job, queue, cid, started), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    while True:
      try:
        event = await asyncio.wait_for(queue.get(), timeout=1.0)
      except asyncio.TimeoutError:
        if await request.is_disconnected():
          engine.cancel(job)
          return reply(_error(499, "the client went away.", code="cancelled"))
        continue
      if isinstance(event, engine_lib.ErrorEvent):
        return reply(_error(500, event.message, code="engine_error"))
      if isinstance(event, engine_lib.DoneEvent):
        break
    choices, scores = service.final_choices(plan, event)
    latency = time.monotonic() - started
    metrics.completed(latency, plan.n * plan.max_tokens, _queue_wait(job))
    body = {**service.head(cid), "choices": choices, "usage": service.usage(plan), **service.extras(plan)}
    if scores is not None:
      body["candidate_scores"] = scores
    return reply(JSONResponse(body))

  async def health(request: Request):
    stats = engine.stats()
    state = "draining" if (service.draining or engine.stopping) else "ok"
    body = {"status": state, "model": service.model_name, "kind": service.kind, "slots": stats["slots"],
            "busy_slots": stats["busy_slots"], "queue_depth": stats["queue_depth"], "length": service.length}
    return JSONResponse(body, status_code=200 if state == "ok" else 503)

  async def models(request: Request):
    return JSONResponse({"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                                     "owned_by": "langflow-jax"}]})

  async def prometheus(request: Request):
    return PlainTextResponse(metrics_text(service), media_type="text/plain; version=0.0.4")

  @contextlib.asynccontextmanager
  async def lifespan(app):
    if manage_engine and engine._thread is None:
      engine.start()
    try:
      yield
    finally:
      service.draining = True
      if manage_engine:
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)

  routes = [Route("/v1/completions", completions, methods=["POST"]), Route("/health", health),
            Route("/metrics", prometheus), Route("/v1/models", models)]
  return Starlette(routes=routes, lifespan=lifespan)


def _queue_wait(job: engine_lib.Job) -> float | None:
  return None if job.admitted_at is None else job.admitted_at - job.submitted_at


def _sse(obj) -> str:
  return f"data: {json.dumps(obj)}\n\n"


async def _events(service: Service, plan: Plan, job: engine_lib.Job, queue: asyncio.Queue, cid: str,
                  started: float) -> AsyncIterator[str]:
  """The SSE stream of one request; closing it early (the client left) cancels the job."""
  head = service.head(cid)
  replace = service.serving.replaces
  sent = [""] * plan.n
  first = True
  finished = False

  def texts(rows: np.ndarray, done: int | None = None) -> list[str]:
    out = []
    upto = None if (replace or done is None) else plan.span[0] + done  # AR: the tokens drawn so far
    for j in range(plan.n):
      full = service.decode(plan, rows[j], upto)
      if replace:
        out.append(full)
      else:  # AR: the new text only
        out.append(full[len(sent[j]):] if full.startswith(sent[j]) else full)
        sent[j] = full
    return out

  try:
    while True:
      event = await queue.get()
      if isinstance(event, engine_lib.ErrorEvent):
        yield _sse({"error": {"message": event.message, "type": "server_error", "param": None,
                              "code": "engine_error"}})
        finished = True
        break
      if first:
        service.metrics.first_event.observe(time.monotonic() - started)
        first = False
      if isinstance(event, engine_lib.PassEvent):
        rows = event.tokens_RxL
        chunk = {**head, "choices": [{"index": j, "text": t, "logprobs": None, "finish_reason": None}
                                     for j, t in enumerate(texts(rows, event.pass_index))],
                 "pass": event.pass_index, "passes": event.passes, "gamma": event.gamma, "replace": replace,
                 "final": False}
        yield _sse(chunk)
        continue
      final = texts(event.tokens_RxL)
      choices = [{"index": j, "text": t, "logprobs": None, "finish_reason": "length",
                  "token_ids": [int(x) for x in event.tokens_RxL[j][plan.span[0]:plan.span[1]]]}
                 for j, t in enumerate(final)]
      yield _sse({**head, "choices": choices, "pass": job.passes, "passes": job.passes, "gamma": event.gamma,
                  "replace": replace, "final": True, "usage": service.usage(plan), **service.extras(plan)})
      yield "data: [DONE]\n\n"
      service.metrics.completed(time.monotonic() - started, plan.n * plan.max_tokens, _queue_wait(job))
      finished = True
      break
  finally:
    if not finished:
      service.engine.cancel(job)


def metrics_text(service: Service) -> str:
  """Prometheus text exposition of the server's gauges, counters and histograms."""
  m, stats = service.metrics, service.engine.stats()
  labels = f'model="{service.model_name}",kind="{service.kind}"'
  out = []

  def metric(name, kind, help_text, value, extra=""):
    out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                f"{name}{{{labels}{extra}}} {value}"])

  metric("langflow_serve_slots", "gauge", "Slots of the stationary batch.", stats["slots"])
  metric("langflow_serve_busy_slots", "gauge", "Slots running a request now.", stats["busy_slots"])
  metric("langflow_serve_queue_depth", "gauge", "Requests waiting for slots.", stats["queue_depth"])
  metric("langflow_serve_queue_limit", "gauge", "Waiting requests beyond which the server answers 429.",
         stats["queue_limit"])
  with m.lock:
    statuses = dict(m.requests)
  out += ["# HELP langflow_serve_requests_total Completion requests answered, by HTTP status.",
          "# TYPE langflow_serve_requests_total counter"]
  for status in sorted(statuses) or [200]:
    out.append(f'langflow_serve_requests_total{{{labels},status="{status}"}} {statuses.get(status, 0)}')
  for name, hist, help_text in (
      ("langflow_serve_request_latency_seconds", m.latency, "End-to-end latency of completed requests."),
      ("langflow_serve_time_to_first_event_seconds", m.first_event, "Time to the first streamed event."),
      ("langflow_serve_queue_wait_seconds", m.queue_wait, "Time from arrival to slots.")):
    with m.lock:
      out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *hist.lines(name, labels)]
  metric("langflow_serve_generated_tokens_total", "counter", "Completion tokens returned.", m.tokens)
  metric("langflow_serve_tokens_per_second", "gauge", "Completion tokens per second over the last minute.",
         f"{m.tokens_per_s():.3f}")
  metric("langflow_serve_engine_ticks_total", "counter", "Engine steps run.", stats["ticks"])
  metric("langflow_serve_engine_tick_seconds_total", "counter", "Time spent in engine steps.",
         f"{stats['tick_seconds']:.6f}")
  metric("langflow_serve_engine_slot_passes_total", "counter", "Busy slot-passes run (one network pass per slot "
         "and tick; Heun: two).", stats["slot_passes"])
  metric("langflow_serve_engine_errors_total", "counter", "Engine steps that failed (their requests got 500).",
         stats["tick_errors"])
  return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- from a run directory


def _check_overrides(overrides: Sequence[str]) -> None:
  for item in overrides:
    if not item.lstrip("-").startswith(("config.sample.", "config.mesh.")):
      raise ConfigError(f"`serve` takes only --config.sample.* and --config.mesh.* overrides, got '{item}'.",
                        "the model is fixed by the checkpoint; change sampling (or mesh) keys only.")


def service_from_workdir(workdir: str, *, slots: int | None = None, steps: int | None = None,
                         max_steps: int | None = None, queue: int | None = None, scheduler: str = "stationary",
                         static_wait_s: float = 0.05, fuse_passes: int | None = None, warmup: bool = True,
                         overrides: Sequence[str] = ()) -> Service:
  """Loads a run (EMA weights) and builds its engine and service. ``slots`` defaults to the run's
  ``sample.batch_size``, ``steps`` to ``sample.steps``, ``max_steps`` to max(steps, 1024)."""
  import jax

  from langflow_jax import checkpoint as ckpt_lib
  from langflow_jax import config as config_lib
  from langflow_jax import parallel, train
  from langflow_jax.data.tokenizer import load_tokenizer

  if scheduler not in engine_lib.SCHEDULERS:
    raise UserError(f"unknown scheduler '{scheduler}'.", f"use one of {', '.join(engine_lib.SCHEDULERS)}.")
  _check_overrides(overrides)
  config = ckpt_lib.saved_config(workdir)
  config_lib.apply_overrides(config, list(overrides))
  config_lib.validate_sample(config)
  sc = config.sample
  slots = int(slots if slots is not None else sc.batch_size)
  steps = int(steps if steps is not None else sc.steps)
  max_steps = int(max_steps if max_steps is not None else max(steps, 1024))
  if slots < 1:
    raise UserError(f"--slots {slots} must be positive.", "use e.g. --slots 16.")
  if not 1 <= steps <= max_steps <= config_lib.MAX_SAMPLE_STEPS:
    raise UserError(f"--steps {steps} and --max-steps {max_steps} must satisfy 1 <= steps <= max-steps <= "
                    f"{config_lib.MAX_SAMPLE_STEPS}.", "use e.g. --steps 32 --max-steps 1024.")
  if queue is not None and queue < 0:
    raise UserError(f"--queue {queue} must not be negative.", "use e.g. --queue 64.")
  length = int(sc.seq_len or config.data.seq_len)
  method = methods.for_config(config)
  mesh = None
  if method.serving.shards_slots and jax.device_count() > 1:
    mesh = parallel.make_mesh(config.mesh)
    shards = parallel.data_parallel_size(mesh)
    if slots % shards:
      raise UserError(f"--slots {slots} does not divide over the mesh's {shards} data shards.",
                      f"use a multiple of {shards} (e.g. --slots {shards * max(1, slots // shards)}).")
  _, model = train.load_model(workdir, use_ema=sc.use_ema, config=config, mesh=mesh)
  tokenizer = load_tokenizer(config.data.tokenizer)
  name = pathlib.Path(workdir).resolve().name
  method.check_model(model)
  backend = method.serving.slots(model, slots=slots, length=length, max_steps=max_steps, sample_cfg=sc, mesh=mesh)
  fuse_passes = engine_lib.FUSE_PASSES if fuse_passes is None else int(fuse_passes)
  if fuse_passes < 1:
    raise UserError(f"--fuse-passes {fuse_passes} must be at least 1.", "use 1 (one pass a call) or e.g. 4.")
  engine = engine_lib.Engine(backend, queue_limit=queue, scheduler=scheduler, static_wait_s=static_wait_s,
                             fuse_passes=fuse_passes)
  if warmup:
    engine.warmup((sc.sampler,))  # a method without samplers to choose from ignores it
  defaults = RequestDefaults(steps=steps, max_steps=max_steps, sampler=sc.sampler, score=sc.score,
                             temperature=float(sc.temperature), top_p=float(sc.top_p))
  return Service(engine, tokenizer, serving=method.serving, length=length, model_name=name, defaults=defaults,
                 gap_tokens=int(sc.gap_tokens))


def serve_workdir(workdir: str, *, host: str = "127.0.0.1", port: int = 8000, print_fn=print, **kwargs) -> None:
  """What ``langflow-jax serve`` runs: load, warm up, serve until SIGTERM / Ctrl-C, drain, return."""
  try:
    import uvicorn
  except ImportError as e:
    raise UserError("the server needs starlette and uvicorn.", "install the extra: pip install -e '.[serve]'.") from e
  t0 = time.monotonic()
  service = service_from_workdir(workdir, **kwargs)
  e, d, fields = service.engine, service.defaults, service.serving.fields
  print_fn(f"[serve] {service.kind} model {service.model_name}: {e.num_slots} slots x {service.length} tokens, "
           f"{e.scheduler} batch, queue {e.queue_limit}"
           + (f", {d.steps} steps by default (at most {d.max_steps})" if "steps" in fields else "")
           + (f", sampler {d.sampler}" if "sampler" in fields else "")
           + f"; ready in {time.monotonic() - t0:.1f} s")
  from langflow_jax import checkpoint as ckpt_lib
  from langflow_jax.distillation import describe_card

  saved = ckpt_lib.saved_config(workdir)
  card = methods.for_config(saved).card(saved)
  if card:  # a student: of which teacher, by which method, for how many steps
    print_fn(f"[serve] {describe_card(card)}")
  print_fn(f"[serve] listening on http://{host}:{port}  (POST /v1/completions, GET /health, GET /metrics)")
  app = create_app(service)
  config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", access_log=False)
  # uvicorn drains on SIGTERM / SIGINT, then re-raises the signal to the handler that was installed
  # before it: this one records it, so that a drained server returns (exit status 0).
  received = []
  previous = {}
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGTERM, signal.SIGINT):
      previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
  try:
    uvicorn.Server(config).run()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  stats = e.stats()
  why = f" on {signal.Signals(received[0]).name}" if received else ""
  print_fn(f"[serve] stopped{why} after {stats['completed']} completed requests ({stats['ticks']} engine steps)")
