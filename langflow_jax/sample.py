"""``langflow-jax sample``: a run directory -> the sampler -> printed samples (and a JSON file).

    langflow-jax sample --workdir runs/demo --num 8 --steps 128 [--prompt TEXT | --infill TEXT]
        [--best-of 4 --score denoise] [--show-steps] [--out samples.json] [--config.sample.x=y ...]

The flags are ``sample`` config keys, checked with the overrides before any
weights load; the sampler itself, its prompts, infill and best-of-n are the
library's (:mod:`langflow_jax.sampling`). The ``--out`` file is what
``langflow-jax genppl`` scores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from langflow_jax import checkpoint as ckpt_lib
from langflow_jax import config as config_lib
from langflow_jax import methods, parallel
from langflow_jax.distillation import describe_card
from langflow_jax.data.tokenizer import load_tokenizer
from langflow_jax.errors import ConfigError, UserError
from langflow_jax.model import LangFlow
from langflow_jax.sampling import (Conditioning, SamplerOptions, best_of_n, get_scorer, infill_conditioning,
                                   prompt_conditioning, sample, score_samples)


SAMPLES_FORMAT = "langflow-jax-samples/1"


def _check_sample_overrides(overrides: Sequence[str]) -> None:
  for item in overrides:
    if not item.lstrip("-").startswith(("config.sample.", "config.mesh.")):
      raise ConfigError(f"`sample` takes only --config.sample.* and --config.mesh.* overrides, got '{item}'.",
                        "the model is fixed by the checkpoint; change sampling (or mesh) keys only.")


def marked_text(tokenizer, ids: np.ndarray, fixed: np.ndarray | None) -> str:
  """Decoded text with the generated spans of a conditioned sample in [[...]]."""
  if fixed is None or not fixed.any():
    return tokenizer.decode(ids)
  parts, start = [], 0
  for i in range(1, len(ids) + 1):
    if i == len(ids) or fixed[i] != fixed[start]:
      text = tokenizer.decode(ids[start:i])
      parts.append(text if fixed[start] else f"[[{text}]]")
      start = i
  return "".join(parts)


def display(text: str) -> str:
  return " ".join(text.replace("<|endoftext|>", " ¶ ").split())


def snapshot_steps(nfe_rows: int) -> list[tuple[str, int]]:
  """(label, row) pairs of the trace shown by --show-steps: draft, refined, final."""
  n = nfe_rows
  rows = sorted({max(n // 4, 1) - 1, max(n // 2, 1) - 1, max(3 * n // 4, 1) - 1, n - 1})
  labels = ["draft"] + ["refined"] * (len(rows) - 2) + ["final"] if len(rows) > 1 else ["final"]
  return list(zip(labels, rows))


def check_out_file(out: str) -> None:
  """``--out`` must name a file that can be written: not a directory, in a directory that
  exists and is writable (or can be created). Creates nothing."""
  path = pathlib.Path(out).expanduser()
  fix = "choose a file in a directory you can write to, e.g. --out samples.json."
  if path.is_dir():
    raise UserError(f"--out {out} is a directory.", "give a file name, e.g. --out samples.json.")
  parent = path.parent
  while not parent.exists() and parent != parent.parent:
    parent = parent.parent  # the directories below it are created when the file is written
  if not parent.is_dir():
    raise UserError(f"cannot write --out {out} ({parent} is not a directory).", fix)
  try:
    if parent == path.parent:
      with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".probe"):
        pass
      if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(13, "Permission denied")
    elif not os.access(parent, os.W_OK | os.X_OK):
      raise PermissionError(13, "Permission denied")
  except OSError as e:
    raise UserError(f"cannot write --out {out}: no file can be created in {parent} ({e.strerror or e}).",
                    fix) from e


def set_sample_keys(config, **flags) -> None:
  """``config.sample.<key> = value`` for every flag given (not None), with the key's type checked."""
  for key, value in flags.items():
    if value is None:
      continue
    kind = type(config.sample[key])
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
      raise ConfigError(f"--{key.replace('_', '-')} {value!r}: expected {'an' if kind is int else 'a'} "
                        f"{kind.__name__}.", f"give a value like the default, {config.sample[key]!r}.")
    config.sample[key] = kind(value)


def generate_from_workdir(workdir: str, *, num: int | None = None, steps: int | None = None,
                          prompt: str | None = None, infill: str | None = None, best_of: int | None = None,
                          show_steps: bool = False, sampler: str | None = None, temperature: float | None = None,
                          seed: int | None = None, out: str | None = None, score: str | None = None,
                          overrides: Sequence[str] = (),
                          print_fn: Callable[[str], None] | None = print) -> dict:
  """What ``langflow-jax sample`` runs: load the run, sample, print, optionally save.

  Returns ``{"meta": ..., "samples": [{"ids", "text", "score", "request"}...]}``,
  the content of the ``--out`` file. The flags are ``sample`` config keys:
  they are applied with the overrides and checked together
  (``config.validate_sample``) before the weights load. Sampling runs
  sharded on the mesh of ``config.mesh``; with several processes every
  process gets every sample, and process 0 prints and writes them.
  """
  if prompt is not None and infill is not None:
    raise UserError("--prompt and --infill cannot be combined.", "use one of them.")
  if out and jax.process_index() == 0:
    check_out_file(out)  # before any work, not after the samples are made
  _check_sample_overrides(overrides)
  config = ckpt_lib.saved_config(workdir)
  method = methods.for_config(config)
  if method.model_class is not LangFlow:
    raise ConfigError(f"`sample` runs LangFlow's sampler, but {workdir} trained the {method.label} baseline "
                      f"(objective.name={method.name}).",
                      f"sample it with `langflow-jax sample-baseline --workdir {workdir}`.")
  config_lib.apply_overrides(config, overrides)
  set_sample_keys(config, num=num, best_of=best_of, seed=seed, score=score, sampler=sampler, steps=steps,
                  temperature=temperature)
  config_lib.validate_sample(config)
  sc = config.sample
  num, best_of, seed = int(sc.num), int(sc.best_of), int(sc.seed)
  options = SamplerOptions.from_config(sc, trace=bool(show_steps))
  get_scorer(sc.score)
  tokenizer = load_tokenizer(config.data.tokenizer)
  seq_len = int(sc.seq_len or config.data.seq_len)
  cond_one = None
  if prompt is not None:
    cond_one = prompt_conditioning(tokenizer, prompt, seq_len)
  elif infill is not None:
    cond_one = infill_conditioning(tokenizer, infill, seq_len, gap_tokens=int(sc.gap_tokens))
  mesh = parallel.make_mesh(config.mesh)
  _, model = ckpt_lib.load_model(workdir, use_ema=sc.use_ema, config=config, mesh=mesh)
  per_call = max(1, int(sc.batch_size) // best_of)
  root = jax.random.PRNGKey(seed)
  records, traces = [], []
  for chunk, start in enumerate(range(0, num, per_call)):
    r = min(per_call, num - start)
    cond = None if cond_one is None else Conditioning(jnp.repeat(cond_one.ids_BxL, r, 0),
                                                      jnp.repeat(cond_one.fixed_BxL, r, 0))
    key = jax.random.fold_in(root, chunk)
    if best_of > 1:
      res = best_of_n(model, key, best_of, options, num=r, seq_len=seq_len, cond=cond, score=sc.score, mesh=mesh)
      tokens, scores, best, trace = parallel.to_host((res.tokens_RxL, res.score_R, res.best_R,
                                                      res.candidates.trace_NxBxL))
      trace = None if trace is None else trace[:, np.arange(r) * best_of + best]
    else:
      k_sample, k_score = jax.random.split(key)
      out_ = sample(model, k_sample, options, num=r, seq_len=seq_len, cond=cond, mesh=mesh)
      scores = score_samples(model, out_, sc.score, cond=cond, key=k_score, mesh=mesh)
      tokens, scores, trace = parallel.to_host((out_.tokens_BxL, scores, out_.trace_NxBxL))
    for i in range(r):
      records.append({"request": start + i, "ids": tokens[i].tolist(), "text": tokenizer.decode(tokens[i]),
                      "score": float(scores[i])})
      if trace is not None:
        traces.append(trace[:, i])

  fixed = None if cond_one is None else np.asarray(cond_one.fixed_BxL[0])
  meta = {"format": SAMPLES_FORMAT, "workdir": str(workdir), "num": num, "seq_len": seq_len,
          "best_of": best_of, "score": sc.score, "seed": seed, "prompt": prompt, "infill": infill,
          "options": dataclasses.asdict(options), "nfe": options.nfe, "tokenizer": config.data.tokenizer,
          "config": config_lib.to_json(config)}
  card = method.card(config)
  if card:
    meta["card"] = card  # a student: of which teacher, by which method, for how many steps
  if jax.process_index() != 0:
    print_fn, out = None, None
  if print_fn is not None:
    print_fn(f"[sample] {num} x {seq_len} tokens, sampler {options.sampler}, {options.steps} steps "
             f"({options.nfe} network evaluations per candidate), grid {options.grid}, "
             f"temperature {options.temperature:g}, best of {best_of} by score '{sc.score}' "
             f"(nats/generated token, lower is better), seed {seed}")
    if card:
      print_fn(f"[sample] {describe_card(card)}")
    for rec, i in zip(records, range(len(records))):
      text = marked_text(tokenizer, np.asarray(rec["ids"]), fixed)
      print_fn(f"--- sample {i}  score {rec['score']:.3f}")
      if traces:
        for label, row in snapshot_steps(traces[i].shape[0]):
          step_text = marked_text(tokenizer, traces[i][row], fixed)
          print_fn(f"  [{label:7s} step {row + 1:>4d}/{traces[i].shape[0]}] {display(step_text)}")
      else:
        print_fn(display(text))
  result = {"meta": meta, "samples": records}
  if out:
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    if print_fn is not None:
      print_fn(f"[sample] wrote {path}")
  return result
