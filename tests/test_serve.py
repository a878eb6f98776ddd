"""The server (serve.py) over the stationary batch (engine.py): a real uvicorn server on a free
127.0.0.1 port and real clients (httpx, openai). No timing is asserted."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from langflow_jax import engine, sampling, serve  # noqa: E402
from langflow_jax import sample as sample_app  # noqa: E402
from tests.conftest import ROOT, small_config  # noqa: E402

L = 32  # small_config's length
STEPS = 8


def perturbed(model, seed=0):
  """Random weights everywhere (a fresh model's blocks and head start at zero)."""
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  noisy = [np.asarray(p) + 0.2 * rng.standard_normal(p.shape, np.float32) for p in leaves]
  nnx.update(model, jax.tree.unflatten(treedef, noisy))
  return model


def save_run(path, objective="langflow"):
  from langflow_jax import checkpoint as ckpt_lib
  from langflow_jax import model as model_lib
  from langflow_jax import train
  from langflow_jax.baselines import ar

  c = small_config()
  c.objective.name = objective
  c.sample.update(steps=STEPS, batch_size=4)
  model = (model_lib.create_model if objective == "langflow" else ar.create_model)(c, seed=3)
  if objective == "langflow":
    perturbed(model.backbone)
  else:
    perturbed(model)
  tx = train.make_optimizer(c.optimizer, c.train.steps)
  return ckpt_lib.save_state(path, 1, train.state_from_model(model, tx, c.train.seed), c)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class ThreadServer:
  """uvicorn in a thread of this process (the engine thread beside it)."""

  def __init__(self, service):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    config = uvicorn.Config(serve.create_app(service), host="127.0.0.1", port=self.port, log_level="warning",
                            lifespan="on")
    self.server = uvicorn.Server(config)
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    deadline = time.monotonic() + 60
    while not self.server.started:
      assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
      time.sleep(0.05)

  def stop(self):
    self.server.should_exit = True
    self.thread.join(60)


@pytest.fixture(scope="module")
def lf_run(tmp_path_factory):
  return save_run(tmp_path_factory.mktemp("serve") / "lf")


@pytest.fixture(scope="module")
def lf_server(lf_run):
  service = serve.service_from_workdir(str(lf_run), slots=4, steps=STEPS, max_steps=64, warmup=False)
  server = ThreadServer(service)
  yield server
  server.stop()


@pytest.fixture(scope="module")
def client(lf_server):
  with httpx.Client(base_url=lf_server.url, timeout=120) as c:
    yield c


def sse_events(lines):
  """The JSON payloads of an SSE stream, and whether it ended with [DONE]."""
  events, done = [], False
  for line in lines:
    if not line.startswith("data: "):
      continue
    data = line[len("data: "):]
    if data == "[DONE]":
      done = True
      break
    events.append(json.loads(data))
  return events, done


# --------------------------------------------------------------------------- the engine against the sampler


@pytest.fixture(scope="module")
def small_model():
  from langflow_jax.model import create_model

  model = create_model(small_config(), seed=3)
  perturbed(model.backbone)
  return model


@pytest.fixture(scope="module")
def lf_engine(small_model):
  eng = engine.Engine(engine.LangFlowSlots(small_model, slots=4, length=L, max_steps=16)).start()
  yield eng
  eng.stop()


def run_job(eng, job, timeout=300):
  events, finished = [], threading.Event()

  def on_event(e):
    events.append(e)
    if isinstance(e, (engine.DoneEvent, engine.ErrorEvent)):
      finished.set()

  job.on_event = on_event
  eng.submit(job)
  assert finished.wait(timeout)
  return events


@pytest.mark.parametrize("fuse", [1, 4])
@pytest.mark.parametrize("sampler, rows", [("euler", 3), ("heun", 1), ("multistep", 2), ("stochastic", 1)])
def test_engine_gives_the_samplers_tokens(small_model, lf_engine, sampler, rows, fuse, monkeypatch):
  # One request through the stationary batch = sampling.sample with the same seed and steps (the keys of
  # `langflow-jax sample --seed`), prompt held by the same conditioning, candidates side by side; one pass
  # a call or fused (blocks of 2 here: an event every 2 passes).
  churn = 0.5 if sampler == "stochastic" else 0.0
  lf_engine.backend.churn = churn
  monkeypatch.setattr(lf_engine, "fuse_passes", fuse)
  ids = np.zeros(L, np.int32)
  fixed = np.zeros(L, bool)
  ids[:3], fixed[:3] = [0, 5, 7], True
  options = sampling.SamplerOptions(sampler=sampler, steps=6, churn=churn)
  cond = sampling.Conditioning(jnp.tile(jnp.asarray(ids)[None], (rows, 1)), jnp.tile(jnp.asarray(fixed)[None], (rows, 1)))
  k_sample, _ = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(11), 0))
  ref = sampling.sample(small_model, k_sample, options, cond=cond)
  events = run_job(lf_engine, engine.Job(rows=rows, passes=6, seed=11, sampler=sampler, cond_ids=ids,
                                         cond_fixed=fixed, stream_every=2))
  *passes, done = events
  assert isinstance(done, engine.DoneEvent)
  assert [e.pass_index for e in passes] == [2, 4]
  np.testing.assert_array_equal(done.tokens_RxL, np.asarray(ref.tokens_BxL))
  np.testing.assert_allclose(done.logprob_RxL, np.asarray(ref.token_logprob_BxL), atol=1e-4)
  np.testing.assert_array_equal(done.tokens_RxL[:, :3], np.tile(ids[:3], (rows, 1)))
  assert passes[0].gamma > passes[1].gamma > done.gamma  # noisy to clean


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_fused_passes_give_the_same_tokens_and_events_in_fewer_calls(small_model, sampler):
  # Up to fuse_passes passes a call, cut at every stream event and at the end: the same tokens as
  # sampling.sample, the same events, and ceil-per-segment calls (7 passes, events every 3: 3 + 3 + 1).
  eng = engine.Engine(engine.LangFlowSlots(small_model, slots=4, length=L, max_steps=16), fuse_passes=4).start()
  try:
    k_sample, _ = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(11), 0))
    for passes, every, calls in ((7, 3, 3), (6, 0, 2)):
      ref = sampling.sample(small_model, k_sample, sampling.SamplerOptions(sampler=sampler, steps=passes), num=1,
                            seq_len=L)
      before = eng.ticks
      *streamed, done = run_job(eng, engine.Job(passes=passes, seed=11, sampler=sampler, stream_every=every))
      assert isinstance(done, engine.DoneEvent)
      assert [e.pass_index for e in streamed] == list(range(every, passes, every) if every else [])
      np.testing.assert_array_equal(done.tokens_RxL, np.asarray(ref.tokens_BxL))
      assert eng.ticks - before == calls
  finally:
    eng.stop()


def test_stream_only_ticks_skip_the_log_probabilities_and_the_last_one_has_them(small_model, monkeypatch):
  # A pass that only streams needs the argmax tokens; the log-softmax over the vocabulary is paid at a
  # job's last pass alone (where DoneEvent reports it).
  eng = engine.Engine(engine.LangFlowSlots(small_model, slots=4, length=L, max_steps=16))
  calls, tick = [], eng.backend.tick

  def spy(*args, **kwargs):
    out = tick(*args, **kwargs)
    calls.append((args[5], out[1] is None))  # (emit, no log-probabilities)
    return out

  monkeypatch.setattr(eng.backend, "tick", spy)
  eng.start()
  try:
    *streamed, done = run_job(eng, engine.Job(passes=4, seed=3, stream_every=2))
  finally:
    eng.stop()
  assert [e.pass_index for e in streamed] == [2]
  assert calls == [(False, True), (True, True), (False, True), (True, False)]
  ref = sampling.sample(small_model, jax.random.split(jax.random.fold_in(jax.random.PRNGKey(3), 0))[0],
                        sampling.SamplerOptions(steps=4), num=1, seq_len=L)
  np.testing.assert_allclose(done.logprob_RxL, np.asarray(ref.token_logprob_BxL), atol=1e-4)


def test_engine_mixes_step_counts_and_survives_bad_jobs(lf_engine):
  # Jobs of different step counts share the batch (one compiled shape); a failing callback or
  # admission fails only its own job.
  results, finished = {}, threading.Event()
  lock = threading.Lock()

  def recorder(name):
    def on_event(e):
      if isinstance(e, (engine.DoneEvent, engine.ErrorEvent)):
        with lock:
          results[name] = e
          if len(results) == 4:
            finished.set()
      if name == "raises":
        raise RuntimeError("a consumer bug")
    return on_event

  jobs = {"short": engine.Job(passes=2, seed=1), "long": engine.Job(passes=12, seed=2, rows=2),
          "raises": engine.Job(passes=3, seed=3, stream_every=1),
          "bad": engine.Job(passes=4, seed=4, sampler="no-such-sampler")}
  for name, job in jobs.items():
    job.on_event = recorder(name)
    lf_engine.submit(job)
  assert finished.wait(300)
  assert isinstance(results["bad"], engine.ErrorEvent)
  for name in ("short", "long", "raises"):
    assert isinstance(results[name], engine.DoneEvent), name
  assert results["long"].tokens_RxL.shape == (2, L)
  # the loop still runs
  assert isinstance(run_job(lf_engine, engine.Job(passes=2, seed=5))[-1], engine.DoneEvent)


MESH_WORKER = """
import threading
import jax, numpy as np
from langflow_jax import engine, parallel, sampling
from langflow_jax.model import create_model
from tests.conftest import small_config
from tests.test_serve import perturbed
assert jax.device_count() == 2
model = create_model(small_config(), seed=3)
perturbed(model.backbone)
backend = engine.LangFlowSlots(model, slots=4, length=32, max_steps=8, mesh=parallel.make_mesh(small_config().mesh))
eng = engine.Engine(backend).start()
for rows in (1, 3):
  done = threading.Event()
  events = []
  eng.submit(engine.Job(rows=rows, passes=6, seed=11, on_event=lambda e: (events.append(e), done.set())))
  done.wait()
  k_sample, _ = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(11), 0))
  ref = sampling.sample(model, k_sample, sampling.SamplerOptions(steps=6), num=rows, seq_len=32)
  np.testing.assert_array_equal(events[-1].tokens_RxL, np.asarray(ref.tokens_BxL))
assert backend._state["z"].sharding.spec[0] == "data"
eng.stop()
print("mesh ok")
"""


def test_slots_shard_over_the_data_axis():
  # Two CPU devices: the slots split over data, the tokens are still the single-device sampler's.
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, "-c", MESH_WORKER], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0 and "mesh ok" in out.stdout, out.stdout + out.stderr


# --------------------------------------------------------------------------- the HTTP server


def test_completion_matches_the_sample_command(lf_run, client):
  # openai's client against base_url; the tokens are those of `langflow-jax sample` with the same flags.
  openai = pytest.importorskip("openai")
  api = openai.OpenAI(base_url=f"{str(client.base_url).rstrip('/')}/v1", api_key="none", max_retries=0)
  out = api.completions.create(model="lf", prompt="The Congress shall", max_tokens=10, seed=7,
                               extra_body={"steps": STEPS})
  (choice,) = out.choices
  assert choice.finish_reason == "length" and isinstance(choice.text, str)
  ref = sample_app.generate_from_workdir(str(lf_run), num=1, steps=STEPS, prompt="The Congress shall", seed=7,
                                         print_fn=None)["samples"][0]["ids"]
  p = out.usage.prompt_tokens
  assert choice.token_ids == ref[p:p + 10]
  assert out.usage.completion_tokens == 10 and out.model == "lf"
  # unconditional: every position is generated
  body = client.post("/v1/completions", json={"seed": 3, "steps": 4}).json()
  assert len(body["choices"][0]["token_ids"]) == L and body["steps"] == 4 and body["seed"] == 3


def test_streamed_passes_end_with_the_answer(client):
  req = {"prompt": "The Congress shall", "max_tokens": 12, "seed": 9, "steps": STEPS, "stream_every": 3}
  with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events, done = sse_events(r.iter_lines())
  assert done
  *drafts, final = events
  assert [e["pass"] for e in drafts] == [3, 6] and final["final"] and final["pass"] == STEPS
  assert all(e["replace"] and e["choices"][0]["finish_reason"] is None for e in drafts)
  gammas = [e["gamma"] for e in events]
  assert gammas == sorted(gammas, reverse=True)
  plain = client.post("/v1/completions", json=req).json()
  assert final["choices"][0]["text"] == plain["choices"][0]["text"]
  assert final["choices"][0]["token_ids"] == plain["choices"][0]["token_ids"]
  # the openai client reads the same stream
  openai = pytest.importorskip("openai")
  api = openai.OpenAI(base_url=f"{str(client.base_url).rstrip('/')}/v1", api_key="none", max_retries=0)
  chunks = list(api.completions.create(model="lf", prompt="The Congress shall", max_tokens=12, seed=9, stream=True,
                                       extra_body={"steps": STEPS, "stream_every": 3}))
  assert chunks[-1].choices[0].text == plain["choices"][0]["text"] and len(chunks) == 3


def test_best_of_picks_the_lowest_score_as_sample_does(lf_run, client):
  body = client.post("/v1/completions", json={"prompt": "The Congress shall", "best_of": 3, "seed": 4,
                                              "steps": STEPS}).json()
  (choice,) = body["choices"]
  scores = body["candidate_scores"]
  assert len(scores) == 3 and choice["candidate"] == int(np.argmin(scores)) and choice["score"] == min(scores)
  ref = sample_app.generate_from_workdir(str(lf_run), num=1, steps=STEPS, prompt="The Congress shall", best_of=3,
                                         seed=4, print_fn=None)["samples"][0]
  p = body["usage"]["prompt_tokens"]
  assert choice["token_ids"] == ref["ids"][p:]
  assert choice["score"] == pytest.approx(ref["score"], abs=1e-4)
  # n of best_of: the two best, best first
  two = client.post("/v1/completions", json={"prompt": "The Congress shall", "n": 2, "best_of": 3, "seed": 4,
                                             "steps": STEPS}).json()
  assert [c["candidate"] for c in two["choices"]] == list(np.argsort(scores, kind="stable")[:2])


def test_infill_suffix_keeps_both_ends(client):
  body = client.post("/v1/completions", json={"prompt": "The Congress", "suffix": "of the people.",
                                              "max_tokens": 5, "seed": 1, "steps": 4}).json()
  assert len(body["choices"][0]["token_ids"]) == 5


@pytest.mark.parametrize("body, param", [
    (b"\xff\xfe{", None),                                   # not UTF-8
    (b'{"prompt": "x",', None),                             # not JSON
    (b"[1, 2]", None),                                      # not an object
    ({"prompt": "word " * 40}, "prompt"),                   # longer than the model
    ({"prompt": 5}, "prompt"),
    ({"prompt": "The", "max_tokens": 40}, "max_tokens"),    # beyond the length
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"n": 5}, "n"),                                        # above the 4 slots
    ({"best_of": 9}, "best_of"),
    ({"n": 2, "best_of": 1}, "best_of"),
    ({"best_of": 2, "stream": True}, "best_of"),
    ({"sampler": "eulr"}, "sampler"),
    ({"steps": 0}, "steps"),
    ({"steps": 65}, "steps"),                               # above --max-steps
    ({"steps": 2.5}, "steps"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"seed": -1}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"stream_every": 0}, "stream_every"),
    ({"score": "vibes", "best_of": 2}, "score"),
    ({"logprobs": 3}, "logprobs"),
    ({"stepz": 4}, "stepz"),
])
def test_bad_requests_name_the_field(client, body, param):
  kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
  r = client.post("/v1/completions", **kwargs)
  assert r.status_code == 400, r.text
  error = r.json()["error"]
  assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


class _NoEngine:
  num_slots = 4


class _WordTokenizer:
  bos_id = 1

  def encode(self, text):
    return [2 + len(word) for word in text.split()]

  def decode(self, ids):
    return " ".join("x" * (i - 2) for i in ids)


def test_serving_behaviour_is_asked_of_the_method_registry(monkeypatch):
  # A method registered with its own request field: a LangFlow server names it as another method's field,
  # the new method's server takes it, and its Job and stream are the ones its serving entry says.
  from langflow_jax import methods, serving

  class GuidedServing(serving.MDLMServing):
    name, fields, echoed, replaces = "guided", (*serving.MDLMServing.fields, "guidance"), (), False

    def job_fields(self, plan):
      return {"passes": 2 * plan.steps}

  class GuidedMethod(methods.MDLMMethod):
    name, serving = "guided", GuidedServing()

  def service(method):
    return serve.Service(_NoEngine(), _WordTokenizer(), serving=methods.get(method).serving, length=L,
                         model_name=method, defaults=serving.RequestDefaults(steps=4, max_steps=8))

  lf = service("langflow")
  with pytest.raises(serve.BadRequest, match="accepted fields: .*sampler") as unknown:
    lf.check({"guidance": 2.0})
  assert unknown.value.param == "guidance" and unknown.value.code == "unknown_field"
  monkeypatch.setitem(methods.METHODS, "guided", GuidedMethod())
  with pytest.raises(serve.BadRequest, match="runs the langflow model, which does not take it"):
    lf.check({"guidance": 2.0})
  guided = service("guided")
  plan = guided.check({"guidance": 2.0, "steps": 3, "prompt": "The Congress"})
  assert guided.kind == "guided" and guided.job(plan, None).passes == 6
  assert guided.extras(plan) == {"seed": plan.seed, "best_of": 1}
  assert not guided.serving.replaces and lf.serving.replaces
  with pytest.raises(serve.BadRequest, match="runs the guided model, which does not take it"):
    guided.check({"sampler": "euler"})


def test_health_and_metrics(client):
  health = client.get("/health").json()
  assert health["status"] == "ok" and health["slots"] == 4 and health["kind"] == "langflow"
  text = client.get("/metrics").text
  for name in ("langflow_serve_queue_depth", "langflow_serve_busy_slots", "langflow_serve_requests_total",
               "langflow_serve_request_latency_seconds_bucket", "langflow_serve_time_to_first_event_seconds_count",
               "langflow_serve_tokens_per_second", "langflow_serve_engine_ticks_total"):
    assert name in text, name
  assert 'status="400"' in text or 'status="200"' in text
  assert client.get("/v1/models").json()["data"][0]["id"] == "lf"


def test_full_queue_answers_429_and_the_rest_complete(lf_run):
  service = serve.service_from_workdir(str(lf_run), slots=1, steps=2, max_steps=16384, queue=1, warmup=False)
  server = ThreadServer(service)
  try:
    with httpx.Client(base_url=server.url, timeout=120) as c:
      # A holds the only slot (a very long request, cancelled below), B waits in the queue, C is refused.
      with c.stream("POST", "/v1/completions", json={"steps": 16384, "stream": True, "stream_every": 1,
                                                     "seed": 0}) as a:
        assert a.status_code == 200
        lines = a.iter_lines()  # kept: a dropped line iterator closes the connection (and cancels A)
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["pass"] == 1
        b_result = {}
        b = threading.Thread(target=lambda: b_result.update(r=httpx.post(f"{server.url}/v1/completions",
                                                                         json={"seed": 1}, timeout=120)))
        b.start()
        while service.engine.stats()["queue_depth"] < 1:
          assert b.is_alive(), b_result
          time.sleep(0.02)
        refused = c.post("/v1/completions", json={"seed": 2})
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
      # leaving A's stream cancels it; B gets the slot
      b.join(120)
      assert b_result["r"].status_code == 200
      assert service.engine.stats()["cancelled"] == 1  # A, when its client left
      assert 'status="429"' in c.get("/metrics").text
  finally:
    server.stop()


# --------------------------------------------------------------------------- the AR baseline


def test_ar_server_matches_generate_and_streams_tokens(tmp_path_factory):
  from langflow_jax import train
  from langflow_jax.baselines import ar
  from langflow_jax.data.tokenizer import load_tokenizer

  run = save_run(tmp_path_factory.mktemp("serve_ar") / "ar", objective="ar")
  service = serve.service_from_workdir(str(run), slots=4, warmup=False)
  server = ThreadServer(service)
  try:
    with httpx.Client(base_url=server.url, timeout=120) as c:
      req = {"prompt": "The Congress shall", "max_tokens": 6, "seed": 5, "temperature": 0.8}
      body = c.post("/v1/completions", json=req).json()
      tok = load_tokenizer("sotu-bpe8k")
      prompt = [tok.bos_id, *tok.encode("The Congress shall")]
      _, model = train.load_model(str(run))
      ref = np.asarray(ar.generate(model, jax.random.PRNGKey(5), len(prompt) + 6,
                                   prompt_BxP=jnp.asarray([prompt]), temperature=0.8))[0]
      assert body["choices"][0]["token_ids"] == ref[len(prompt):].tolist()
      with c.stream("POST", "/v1/completions", json={**req, "stream": True, "stream_every": 2}) as r:
        events, done = sse_events(r.iter_lines())
      assert done and not events[0]["replace"]
      assert "".join(e["choices"][0]["text"] for e in events) == body["choices"][0]["text"]
      assert c.post("/v1/completions", json={"steps": 4}).json()["error"]["param"] == "steps"
      best = c.post("/v1/completions", json={**req, "best_of": 3}).json()
      assert len(best["candidate_scores"]) == 3
  finally:
    server.stop()


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_finishes_requests_in_flight_then_exits(lf_run):
  port = free_port()
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.Popen([sys.executable, "-m", "langflow_jax.cli", "serve", "--workdir", str(lf_run), "--port",
                           str(port), "--slots", "2", "--steps", "4", "--max-steps", "400", "--no-warmup"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
      assert proc.poll() is None, proc.stdout.read()
      assert time.monotonic() < deadline, "the server did not come up"
      try:
        if httpx.get(f"{url}/health", timeout=5).status_code == 200:
          break
      except httpx.TransportError:
        time.sleep(0.2)
    with httpx.Client(base_url=url, timeout=240) as c:
      queued = {}
      with c.stream("POST", "/v1/completions", json={"steps": 400, "stream": True, "stream_every": 1,
                                                     "seed": 0}) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        # a second request in flight, not streamed
        t = threading.Thread(target=lambda: queued.update(r=httpx.post(f"{url}/v1/completions",
                                                                       json={"steps": 200}, timeout=240)))
        t.start()
        while not queued and c.get("/health").json()["busy_slots"] < 2:  # until it holds the other slot
          time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        events, done = sse_events([first, *lines])
      assert done and events[-1]["final"] and events[-1]["pass"] == 400
      t.join(240)
      assert queued["r"].status_code == 200
    assert proc.wait(120) == 0
    out = proc.stdout.read()
    assert "[serve] stopped on SIGTERM after 2 completed requests" in out
    with pytest.raises(httpx.TransportError):
      httpx.get(f"{url}/health", timeout=5)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
