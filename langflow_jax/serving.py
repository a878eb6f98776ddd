"""How each method is served: the per-method side of ``langflow-jax serve``.

The method registry (:mod:`langflow_jax.methods`) hands out one :class:`Serving`
per method (``Method.serving``). It says

* which request fields the method takes beyond the common ones
  (:attr:`Serving.fields`) and how it checks them (:meth:`Serving.check`);
* how a checked request (a :class:`Plan`) becomes an engine :class:`~langflow_jax.engine.Job`
  (:meth:`Serving.job`);
* how its stream reads: each event replaces the whole output (the diffusion
  models refine every position) or appends the new tokens (AR);
* which slot engine runs it (:meth:`Serving.slots`).

The HTTP layer (:mod:`langflow_jax.serve`) asks these and never branches on
the method's name. This module is library: it knows requests as dicts and
raises :class:`BadRequest`, which the HTTP layer turns into a 400.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from langflow_jax import engine, sampling


class BadRequest(Exception):
  """A 400: ``param`` names the field (None for the body as a whole)."""

  def __init__(self, param: str | None, message: str, code: str = "invalid_value"):
    super().__init__(message)
    self.param, self.message, self.code = param, message, code

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param,
                      "code": self.code}}


@dataclasses.dataclass
class Plan:
  """A checked request."""

  n: int
  best_of: int
  max_tokens: int
  temperature: float
  seed: int
  stream: bool
  stream_every: int
  steps: int
  sampler: str
  score: str | None
  top_p: float
  cond_ids: np.ndarray | None
  cond_fixed: np.ndarray | None
  span: tuple[int, int]      # positions of the returned completion
  prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class RequestDefaults:
  """What a request gets for a field it leaves out: the run's sample config and the serve flags."""

  steps: int = 32
  max_steps: int = 32          # the most a request may ask for (--max-steps)
  sampler: str = "euler"
  score: str = "denoise"
  temperature: float = 1.0
  top_p: float = 1.0


def is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class RequestReader:
  """Typed reads of one request body's fields; a wrong value is a :class:`BadRequest` naming the field."""

  def __init__(self, req: dict):
    self.req = req

  def get(self, key: str, default, is_valid: Callable[[Any], bool], what: str):
    v = self.req.get(key)
    if v is None:
      return default
    if not is_valid(v):
      raise BadRequest(key, f"'{key}' must be {what}, got {json.dumps(v)[:40]}.", "invalid_type")
    return v

  def int_in(self, key: str, default, lo: int, hi: int, why_hi: str = "") -> int:
    v = self.get(key, default, is_int, "an integer")
    if not lo <= v <= hi:
      raise BadRequest(key, f"'{key}'={v} must lie in [{lo}, {hi}]{why_hi}.")
    return v

  def steps(self, defaults: RequestDefaults) -> int:
    return self.int_in("steps", defaults.steps, 1, defaults.max_steps, " (the server's --max-steps)")


class Serving:
  """How one method is served (see the module docstring)."""

  name: str = ""                          # the method, as /health and the metrics labels call it
  label: str = ""                         # how error messages call it
  fields: tuple[str, ...] = ()            # request fields it takes beyond the common ones
  echoed: tuple[str, ...] = ()            # Plan fields the response reports back
  replaces: bool = True                   # a streamed event replaces the whole output (False: appends tokens)
  continues_prefix: bool = False          # decodes left to right after a prefix: from [BOS] at least, no infill
  shards_slots: bool = False              # its slots shard over the mesh's data axes on more than one device

  def check(self, read: RequestReader, defaults: RequestDefaults) -> dict[str, Any]:
    """The method's sampling fields of a request: ``temperature``, ``steps``, ``sampler``, ``score``, ``top_p``."""
    raise NotImplementedError

  def job_fields(self, plan: Plan) -> dict[str, Any]:
    """The :class:`~langflow_jax.engine.Job` fields whose meaning depends on the method."""
    return {"passes": plan.steps}

  def job(self, plan: Plan, on_event) -> engine.Job:
    return engine.Job(rows=plan.best_of, seed=plan.seed, temperature=plan.temperature, top_p=plan.top_p,
                      cond_ids=plan.cond_ids, cond_fixed=plan.cond_fixed,
                      stream_every=plan.stream_every if plan.stream else 0, score=plan.score, on_event=on_event,
                      **self.job_fields(plan))

  def slots(self, model: nnx.Module, *, slots: int, length: int, max_steps: int,
            sample_cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
    """The slot engine (backend of :class:`~langflow_jax.engine.Engine`) that runs this method's jobs."""
    raise NotImplementedError


class LangFlowServing(Serving):
  name, label = "langflow", "LangFlow"
  fields = ("steps", "sampler", "score", "top_p")
  echoed = ("steps", "sampler")
  shards_slots = True

  def check(self, read, defaults):
    temperature = read.get("temperature", defaults.temperature, is_number, "a number")
    if not temperature > 0:
      raise BadRequest("temperature", f"'temperature'={temperature} must be positive (it divides the logits "
                                      "inside the predicted embedding; the sampler is deterministic per seed).")
    steps = read.steps(defaults)
    sampler = read.get("sampler", defaults.sampler, lambda v: isinstance(v, str), "a string")
    if sampler not in engine.SAMPLER_IDS:
      raise BadRequest("sampler", f"unknown sampler '{sampler}'; use one of {', '.join(engine.SAMPLER_IDS)}.")
    score = read.get("score", defaults.score, lambda v: isinstance(v, str), "a string")
    if score not in sampling.SCORERS:
      raise BadRequest("score", f"unknown score '{score}'; use one of {', '.join(sorted(sampling.SCORERS))}.")
    # Taken, but only at 1 (the value that changes nothing), so that a client sending the OpenAI default works.
    top_p = read.get("top_p", 1.0, is_number, "a number")
    if top_p != 1:
      raise BadRequest("top_p", "'top_p' must be 1 for LangFlow (its sampler has no nucleus).")
    return dict(temperature=temperature, steps=steps, sampler=sampler, score=score, top_p=top_p)

  def job_fields(self, plan):
    return {"passes": plan.steps, "sampler": plan.sampler}

  def slots(self, model, *, slots, length, max_steps, sample_cfg, mesh=None):
    sampling.get_scorer(sample_cfg.score)  # a bad default scorer fails at start, not on the first best-of request
    return engine.LangFlowSlots(model, slots=slots, length=length, max_steps=max_steps, grid=sample_cfg.grid,
                                churn=float(sample_cfg.churn), update_dtype=sample_cfg.update_dtype, mesh=mesh)


class _TokenDrawingServing(Serving):
  """The baselines draw tokens (AR one per position, MDLM by unmasking): a temperature that may be 0
  (greedy), a nucleus, and their own log-probability as the best-of score."""

  def check(self, read, defaults):
    temperature = read.get("temperature", defaults.temperature, is_number, "a number")
    if not 0 <= temperature <= 100:
      raise BadRequest("temperature", f"'temperature'={temperature} must lie in [0, 100] (0: greedy).")
    top_p = read.get("top_p", defaults.top_p, is_number, "a number")
    if not 0 < top_p <= 1:
      raise BadRequest("top_p", f"'top_p'={top_p} must lie in (0, 1].")
    steps = read.steps(defaults) if "steps" in self.fields else 0
    return dict(temperature=temperature, steps=steps, sampler=self.name, score="logprob", top_p=top_p)


class ARServing(_TokenDrawingServing):
  name, label = "ar", "AR baseline"
  fields = ("top_p",)
  replaces = False
  continues_prefix = True

  def job_fields(self, plan):
    return {"passes": plan.max_tokens}  # one network pass per token

  def slots(self, model, *, slots, length, max_steps, sample_cfg, mesh=None):
    return engine.ARSlots(model, slots=slots, length=length)


class MDLMServing(_TokenDrawingServing):
  name, label = "mdlm", "MDLM baseline"
  fields = ("steps", "top_p")
  echoed = ("steps",)

  def slots(self, model, *, slots, length, max_steps, sample_cfg, mesh=None):
    return engine.MDLMSlots(model, slots=slots, length=length)
