"""The MDLM baseline through the same server (serve.py, engine.MDLMSlots): a real server on a free
127.0.0.1 port and a real client; no timing asserted."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from langflow_jax import serve  # noqa: E402
from tests.conftest import small_config  # noqa: E402
from tests.test_serve import ThreadServer, perturbed, sse_events  # noqa: E402


@pytest.fixture(scope="module")
def mdlm_run(tmp_path_factory):
  from langflow_jax import checkpoint as ckpt_lib
  from langflow_jax import train
  from langflow_jax.baselines import mdlm

  path = tmp_path_factory.mktemp("serve_mdlm") / "mdlm"
  c = small_config()
  c.objective.name = "mdlm"
  c.sample.update(steps=8, batch_size=4)
  model = perturbed(mdlm.create_model(c, seed=3))
  tx = train.make_optimizer(c.optimizer, c.train.steps)
  return ckpt_lib.save_state(path, 1, train.state_from_model(model, tx, c.train.seed), c)


def test_mdlm_server_matches_generate_streams_and_ranks(mdlm_run):
  from langflow_jax import train
  from langflow_jax.baselines import mdlm
  from langflow_jax.data.tokenizer import load_tokenizer

  service = serve.service_from_workdir(str(mdlm_run), slots=4, warmup=False)
  server = ThreadServer(service)
  try:
    with httpx.Client(base_url=server.url, timeout=120) as c:
      req = {"prompt": "The Congress shall", "max_tokens": 10, "seed": 5, "temperature": 0.8, "steps": 8}
      body = c.post("/v1/completions", json=req).json()
      tok = load_tokenizer("sotu-bpe8k")
      prompt = [tok.bos_id, *tok.encode("The Congress shall")]
      _, model = train.load_model(str(mdlm_run))
      ref = np.asarray(mdlm.generate(model, jax.random.PRNGKey(5), 32, steps=8, prompt_BxP=jnp.asarray([prompt]),
                                     temperature=0.8))[0]
      p = len(prompt)
      assert body["choices"][0]["token_ids"] == ref[p:p + 10].tolist() and body["steps"] == 8
      with c.stream("POST", "/v1/completions", json={**req, "stream": True, "stream_every": 2}) as r:
        events, done = sse_events(r.iter_lines())
      assert done and [e["pass"] for e in events] == [2, 4, 6, 8] and events[0]["replace"]
      assert events[-1]["choices"][0]["text"] == body["choices"][0]["text"]
      best = c.post("/v1/completions", json={**req, "best_of": 3}).json()
      assert len(best["candidate_scores"]) == 3 and best["choices"][0]["score"] == min(best["candidate_scores"])
      infill = c.post("/v1/completions", json={"prompt": "The", "suffix": "of the people.", "max_tokens": 4,
                                               "seed": 1}).json()
      assert len(infill["choices"][0]["token_ids"]) == 4
      bad = c.post("/v1/completions", json={"sampler": "euler"}).json()
      assert bad["error"]["param"] == "sampler"
  finally:
    server.stop()
