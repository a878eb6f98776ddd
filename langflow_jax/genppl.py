"""``langflow-jax genppl``: generative perplexity and entropy of a ``sample --out`` file.

    langflow-jax genppl --samples samples.json [--scorer bigram | gpt2:DIR | ar:RUN_DIR] [--no-reference] [--json]

The scorers come from the sample file's own run config: ``bigram`` is the
Kneser-Ney bigram of its training split, ``gpt2:DIR`` GPT-2 from a local
Hugging Face directory (samples decoded and re-tokenized), ``ar:RUN_DIR`` a
trained AR baseline run. The statistics are the library's
(:mod:`langflow_jax.metrics`, method §6.2).
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable

from langflow_jax import checkpoint as ckpt_lib
from langflow_jax import config as config_lib
from langflow_jax import metrics
from langflow_jax.baselines import ar
from langflow_jax.data import pipeline
from langflow_jax.data.tokenizer import fingerprint, load_tokenizer
from langflow_jax.errors import ConfigError, DataError


def _bigram_scorer(arg: str, config) -> tuple[metrics.SequenceScorer, str]:
  """The bigram LM of the generating run's training split (same tokenizer)."""
  del arg
  split = pipeline.load_split(config.data, "train")
  return metrics.BigramLM(split.ids, config.model.vocab_size, mask=split.mask), \
      f"Kneser-Ney bigram on the '{config.data.name}' train split"


def _gpt2_scorer(arg: str, config) -> tuple[metrics.SequenceScorer, str]:
  """GPT-2 from a local Hugging Face directory; samples are decoded and re-tokenized."""
  from flax import nnx

  from langflow_jax import gpt2

  if not arg:
    raise ConfigError("--scorer gpt2 needs a directory.", "write --scorer gpt2:/path/to/gpt2-large.")
  model, gpt2_tok = gpt2.load_gpt2(arg)
  graphdef, state = nnx.split(model)
  max_len = model.config.n_positions
  scorer = metrics.causal_lm_scorer(lambda st, ids: nnx.merge(graphdef, st)(ids), state, max_len=max_len)
  generator_tok = load_tokenizer(config.data.tokenizer)
  scorer.retokenize = lambda ids: gpt2_tok.encode(generator_tok.decode(ids)).ids[:max_len]
  return scorer, f"GPT-2 from {arg} ({model.config.n_layer} layers, width {model.config.n_embd})"


def _ar_scorer(arg: str, config) -> tuple[metrics.SequenceScorer, str]:
  """The AR baseline of a training run (``--config.objective.name=ar``), EMA weights.

  With the generator's tokenizer the ids are scored as they are; otherwise
  samples are decoded and re-tokenized with the AR run's tokenizer.
  """
  if not arg:
    raise ConfigError("--scorer ar needs a run directory.", "write --scorer ar:RUN_DIR (a run trained with "
                      "--config.objective.name=ar).")
  ar_config, model = ckpt_lib.load_model(arg)
  if not isinstance(model, ar.ARTransformer):
    raise ConfigError(f"{arg} is not a run of the autoregressive baseline.",
                      "pass --scorer ar:RUN_DIR of a run trained with --config.objective.name=ar.")
  scorer = ar.sequence_scorer(model)
  ar_tok, generator_tok = load_tokenizer(ar_config.data.tokenizer), load_tokenizer(config.data.tokenizer)
  if fingerprint(ar_tok) != fingerprint(generator_tok):
    scorer.retokenize = lambda ids: ar_tok.encode(generator_tok.decode(ids))[:model.max_length]
  m = ar_config.model
  return scorer, (f"AR baseline from {arg} ({m.n_blocks} blocks, width {m.hidden_size}, "
                  f"tokenizer {ar_config.data.tokenizer})")


# name -> loader(arg after ':', generating config) -> (scorer, description). A
# scorer in another vocabulary carries ``scorer.retokenize`` (generator ids ->
# its ids: decode, then its tokenizer).
SCORER_LOADERS: dict[str, Callable] = {"bigram": _bigram_scorer, "gpt2": _gpt2_scorer, "ar": _ar_scorer}


def _json_kind(value) -> str:
  """The JSON name of a parsed value's type (object, list, string, number, ...)."""
  for kind, name in ((dict, "object"), (list, "list"), (str, "string"), (bool, "boolean"), ((int, float), "number")):
    if isinstance(value, kind):
      return name
  return "null"


def gen_ppl_report(samples_path: str, scorer: str = "bigram", *, reference: bool = True,
                   print_fn: Callable[[str], None] | None = print) -> dict:
  """What ``langflow-jax genppl`` runs: Gen. PPL and entropy of a ``sample --out`` file.

  With ``reference``, the same numbers for as many held-out chunks of the
  training data, for scale.
  """
  path = pathlib.Path(samples_path)
  if not path.is_file():
    raise DataError(f"sample file {path} does not exist.", "write one with `langflow-jax sample --out FILE`.")
  expected = ("expected the JSON that `langflow-jax sample --out FILE` writes: {\"meta\": {\"config\": ...}, "
              "\"samples\": [{\"ids\": [...]}, ...]}")
  fix = "pass a file written by `langflow-jax sample --out FILE` (or write one with it)."
  try:
    saved = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise DataError(f"{path} is not JSON ({e}); {expected}.", fix) from e

  def require(node, key: str, kind: type, where: str):
    if not isinstance(node, dict):
      raise DataError(f"{path} is not a sample file: {where} is a {_json_kind(node)}, not an object with the "
                      f"key '{key}'; {expected}.", fix)
    if key not in node:
      has = f"its keys: {', '.join(map(repr, sorted(node)[:6]))}" if node else "it is empty"
      raise DataError(f"{path} is not a sample file: {where} has no key '{key}' ({has}); {expected}.", fix)
    if not isinstance(node[key], kind):
      raise DataError(f"{path} is not a sample file: '{key}' in {where} is a {_json_kind(node[key])}, not a "
                      f"{_json_kind(kind())}; {expected}.", fix)
    return node[key]

  meta = require(saved, "meta", dict, "the top level")
  samples = require(saved, "samples", list, "the top level")
  try:
    config = config_lib.from_json(require(meta, "config", str, "meta"))
  except (ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path} is not a sample file: meta['config'] is not a langflow-jax config ({e}); "
                    f"{expected}.", fix) from e
  for i, s in enumerate(samples):
    require(s, "ids", list, f"samples[{i}]")
  if not samples:
    raise DataError(f"{path} holds no samples.", "sample with --num 1 or more.")
  name, _, arg = scorer.partition(":")
  if name not in SCORER_LOADERS:
    raise ConfigError(f"unknown scorer '{scorer}'.", f"use one of {sorted(SCORER_LOADERS)}.")
  lm, description = SCORER_LOADERS[name](arg, config)
  retokenize = getattr(lm, "retokenize", None)
  ids = [s["ids"] for s in samples]
  result = {"scorer": description, "samples": metrics.generative_perplexity(ids, lm, retokenize=retokenize)}
  if reference:
    held = pipeline.load_split(config.data, "heldout")
    rows = [row[:len(ids[0])] for row in held.ids[:len(ids)]]
    result["heldout_data"] = metrics.generative_perplexity(rows, lm, retokenize=retokenize)
  if print_fn is not None:
    for label, r in (("samples", result["samples"]), ("held-out data", result.get("heldout_data"))):
      if r is not None:
        print_fn(f"[genppl] {label:13s}: Gen PPL {r['gen_ppl']:8.2f}  entropy {r['entropy']:.3f} nats  "
                 f"({r['num_samples']} sequences, {r['scored_tokens']} scored tokens)")
    print_fn(f"[genppl] scorer: {description}")
  return result
