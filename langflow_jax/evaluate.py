"""Measuring a trained model with the likelihood bound: ``langflow-jax eval``.

    langflow-jax eval --workdir runs/demo [--data file:my.txt] [--split heldout] [--plot]
    langflow-jax eval --checkpoint runs/demo/checkpoints/600     # one checkpoint of a run
    langflow-jax eval --checkpoint DIR --config.data.tokenizer=gpt2 --data file:x.txt  # official release

A number without its protocol cannot be compared or reproduced, so every
result carries a *protocol card*: dataset, split, packing, sequence length,
solver, steps, grid, divergence estimator and probes, weights, dtypes, seed.
The report is printed and written as JSON under ``eval/`` beside the
checkpoint (``RUN/eval/<name>.json``); ``--plot`` adds ``eval/<name>.png``:
the bound and each term against the number of steps, and the flow term's
integrand against gamma.

Totals are sums over sequences divided by the valid-token count (method §5.3);
in wrapped data the BOS/EOS separators are tokens and count.

:func:`denoising_curve` measures the denoiser's held-out cross-entropy at
fixed noise levels: the conditional-entropy curve the learned schedule fits.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from langflow_jax import checkpoint as ckpt_lib
from langflow_jax import config as config_lib
from langflow_jax import convert, diffusion, parallel, train
from langflow_jax import likelihood as lk
from langflow_jax import oracles
from langflow_jax import reporting
from langflow_jax.data import pipeline
from langflow_jax.data.tokenizer import load_tokenizer
from langflow_jax.errors import CheckpointError, ConfigError
from langflow_jax.model import LangFlow, count_params
from langflow_jax.objective import token_cross_entropy

TERMS = ("reconst", "flow", "prior")


@dataclasses.dataclass
class EvalResult:
  """The bound on one dataset split, its terms and its protocol card."""

  nats_per_token: float
  stderr: float                    # standard error of nats_per_token over the sequences
  terms: dict[str, float]          # reconst, flow, prior in nats per token (they sum to the bound)
  num_tokens: int
  num_sequences: int
  card: dict[str, Any]
  seconds: float
  integrand: dict[str, list[float]] | None = None  # gamma -> d(flow)/d(gamma), nats/token
  nats_per_token_vr: float = math.nan  # the variance-reduced estimate (same expectation)
  stderr_vr: float = math.nan
  # The context-free reference on the same rows, eps and probes: its bound
  # ("ode", variance-reduced), its exact value ("analytic", the unigram NLL)
  # and their difference ("solver_bias", the integration error this protocol makes on it).
  reference: dict[str, float] | None = None
  sweep: list[dict[str, float]] | None = None      # the bound and terms for several step counts
  files: list[str] = dataclasses.field(default_factory=list)

  @property
  def bits_per_token(self) -> float:
    return lk.nats_to_bits(self.nats_per_token)

  @property
  def perplexity(self) -> float:
    return math.exp(self.nats_per_token) if self.nats_per_token < 700 else math.inf

  def to_json(self) -> dict[str, Any]:
    return {
        "nats_per_token": self.nats_per_token,
        "nats_per_token_stderr": self.stderr,
        "nats_per_token_vr": self.nats_per_token_vr,
        "nats_per_token_vr_stderr": self.stderr_vr,
        "context_free_reference": self.reference,
        "bits_per_token": self.bits_per_token,
        "perplexity": self.perplexity,
        "terms_nats_per_token": self.terms,
        "num_tokens": self.num_tokens,
        "num_sequences": self.num_sequences,
        "seconds": self.seconds,
        "card": self.card,
        "integrand": self.integrand,
        "sweep": self.sweep,
    }

  def report(self) -> str:
    c = self.card
    lines = [
        f"bound on {c['data']} ({c['split']}): {self.nats_per_token:.4f} nats/token = "
        f"{self.bits_per_token:.4f} bits/token, perplexity <= {self.perplexity:.2f}",
        f"  standard error {self.stderr:9.4f} nats/token  (over the {self.num_sequences} sequences: text, eps "
        "and probes)",
        f"  variance-reduced {self.nats_per_token_vr:7.4f} +- {self.stderr_vr:.4f} nats/token  (sampled entropy of "
        "q(z_a|x) in place of its mean; same expectation)",
        *([f"  context-free     {self.reference['ode']:7.4f} nats/token  (the same protocol on a denoiser that "
           f"ignores context: skip term + unigram prior; exactly {self.reference['analytic']:.4f}, so the solver's "
           f"bias here is {self.reference['solver_bias']:+.4f})",
           f"  learned from context {self.reference['ode'] - self.nats_per_token_vr:+.4f} nats/token "
           "(context-free reference minus the variance-reduced bound)"]
          if self.reference else []),
        f"  reconstruction {self.terms['reconst']:9.4f} nats/token  (cross-entropy at gamma_min)",
        f"  flow           {self.terms['flow']:9.4f} nats/token  (divergence integral along the ODE)",
        f"  prior          {self.terms['prior']:9.4f} nats/token  (Gaussian prior at the noisy end)",
        "protocol card:",
    ]
    lines += [f"  {k:<17} {v}" for k, v in c.items()]
    lines += [f"wrote {f}" for f in self.files]
    return "\n".join(lines)


# --------------------------------------------------------------------------- running the bound


@dataclasses.dataclass
class _Totals:
  """Host-side float64 sums over batches."""

  sums: dict[str, float] = dataclasses.field(default_factory=lambda: {t: 0.0 for t in TERMS})
  tokens: float = 0.0
  sequences: int = 0
  evals: int = 0
  steps: int = 0
  gamma_C: np.ndarray | None = None
  div_sum_C: np.ndarray | None = None
  seq_totals: list[float] = dataclasses.field(default_factory=list)
  seq_totals_vr: list[float] = dataclasses.field(default_factory=list)
  seq_tokens: list[float] = dataclasses.field(default_factory=list)

  def add(self, terms: lk.BoundTerms, info: lk.SolveInfo) -> None:
    terms, info = parallel.to_host((terms, info))  # every process gets every row
    for t in TERMS:
      self.sums[t] += float(np.sum(np.asarray(getattr(terms, f"{t}_B"), np.float64)))
    self.tokens += float(np.sum(terms.num_tokens_B))
    self.sequences += int(np.sum(terms.num_tokens_B > 0))
    valid = np.asarray(terms.num_tokens_B) > 0
    self.seq_totals += np.asarray(terms.total_B, np.float64)[valid].tolist()
    self.seq_totals_vr += np.asarray(terms.total_vr_B, np.float64)[valid].tolist()
    self.seq_tokens += np.asarray(terms.num_tokens_B, np.float64)[valid].tolist()
    self.evals = max(self.evals, int(info.num_evals))
    self.steps = max(self.steps, int(info.num_steps))
    if info.gamma_C.size:
      div = np.sum(np.asarray(info.div_CxB, np.float64), axis=1)
      self.gamma_C = np.asarray(info.gamma_C)
      self.div_sum_C = div if self.div_sum_C is None else self.div_sum_C + div

  def per_token(self) -> dict[str, float]:
    return {t: v / max(self.tokens, 1.0) for t, v in self.sums.items()}

  def variance_reduced(self) -> float:
    """The bound with the sampled entropy of q(z_a | x) (nats/token)."""
    return float(np.sum(self.seq_totals_vr) / max(self.tokens, 1.0))

  def stderr(self, variance_reduced: bool = False) -> float:
    """Standard error of sum(total) / sum(tokens) over sequences (delta method).

    It covers the text, eps and probe draws together; with one eps draw per
    sequence the official estimate of a single sequence scatters by
    ~sqrt(L D / 2) nats, most of which the variance-reduced one cancels.
    """
    t = np.asarray(self.seq_totals_vr if variance_reduced else self.seq_totals)
    n = np.asarray(self.seq_tokens)
    if len(t) < 2:
      return math.nan
    residual = t - n * (t.sum() / n.sum())
    return float(math.sqrt(len(t) / (len(t) - 1) * np.sum(residual**2)) / n.sum())

  def integrand(self) -> dict[str, list[float]] | None:
    if self.gamma_C is None:
      return None
    values = lk.flow_integrand(self.gamma_C, self.div_sum_C, self.tokens)
    return {"gamma": self.gamma_C.tolist(), "flow_nats_per_token_per_gamma": np.asarray(values).tolist()}


def context_free_reference(model: LangFlow, data: pipeline.PackedSplit, opts: lk.BoundOptions,
                           config: ml_collections.ConfigDict, num_batches: int,
                           mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """The bound of ``oracles.ContextFreeDenoiser`` (the model's embeddings and schedule, the
  training split's unigram prior) on the same rows with the same seed, and its exact value."""
  e = config.eval
  prior = pipeline.unigram_log_prior(pipeline.load_split(config.data, "train"), config.model.vocab_size)
  oracle = oracles.ContextFreeDenoiser(model.embedding_matrix(), model.schedule, prior)
  # No self-conditioning, so flow and sc_chain_rule coincide; sde keeps its own estimate.
  ref_opts = dataclasses.replace(opts, mode="sde" if opts.mode == "sde" else "flow", self_cond=False)
  s_N = None if opts.solver == "adaptive" else np.asarray(lk.s_grid(model, opts))
  totals = run_bound(oracle, data, ref_opts, batch_size=e.batch_size, num_batches=num_batches, seed=e.seed,
                     s_N=s_N, mesh=mesh)
  rows = list(pipeline.eval_batches(data, e.batch_size, num_batches))
  analytic = oracle.analytic_nll(np.concatenate([b["ids"] for b in rows]), np.concatenate([b["mask"] for b in rows]))
  ode = totals.variance_reduced()
  return {"ode": ode, "analytic": analytic, "solver_bias": ode - analytic,
          "stderr": totals.stderr(variance_reduced=True)}


def _num_batches(split: pipeline.PackedSplit, batch_size: int, num_batches: int) -> int:
  whole = -(-len(split) // batch_size)
  return whole if num_batches <= 0 else min(num_batches, whole)


def run_bound(model: LangFlow, split: pipeline.PackedSplit, opts: lk.BoundOptions, *, batch_size: int,
              num_batches: int, seed: int, s_N: np.ndarray | None = None, progress: bool = False,
              mesh: jax.sharding.Mesh | None = None) -> _Totals:
  """Sums of the bound's terms over the first ``num_batches`` batches of ``split``.

  Batch i uses key fold_in(PRNGKey(seed), i): the same seed and batching give
  the same number, on any mesh. With ``mesh`` the batches are sharded over
  data x fsdp and each process loads only its rows (as the trainer does).
  """
  fn = lk.make_bound_fn(model, opts, mesh)
  key = jax.random.PRNGKey(seed)
  totals = _Totals()
  n = _num_batches(split, batch_size, num_batches)
  index, count = (0, 1) if mesh is None else parallel.data_shard(mesh)
  bar = reporting.Progress(n, 0, progress)
  try:
    for i, local in enumerate(pipeline.eval_batches(split, batch_size, n, index, count)):
      batch = local if mesh is None else parallel.global_batch(local, mesh)
      terms, info = fn(batch["ids"], batch["mask"], jax.random.fold_in(key, i), s_N=s_N)
      if not bool(info.ok):
        raise ConfigError(
            f"the adaptive solver reached eval.max_steps={opts.max_steps} before the noisy end.",
            "raise --config.eval.max_steps or loosen --config.eval.rtol/atol.")
      totals.add(terms, info)
      bar.update(1, nats_per_token=f"{sum(totals.per_token().values()):.4f}")
  finally:
    bar.close()
  return totals


def steps_sweep(model: LangFlow, split: pipeline.PackedSplit, opts: lk.BoundOptions, steps: Sequence[int], *,
                batch_size: int, num_batches: int, seed: int,
                mesh: jax.sharding.Mesh | None = None) -> tuple[list[dict[str, float]], dict | None]:
  """The bound and its terms for several step counts (same data and seed), and
  the flow integrand of the longest run.

  All grids are padded to the longest, so one compilation serves the sweep.
  The adaptive solver is swept as Heun.
  """
  fixed = opts if opts.solver != "adaptive" else dataclasses.replace(opts, solver="heun")
  steps = sorted(steps)
  grids = lk.padded_s_grids(model, fixed, steps)
  rows = []
  for n, s_N in zip(steps, grids):
    totals = run_bound(model, split, fixed, batch_size=batch_size, num_batches=num_batches, seed=seed, s_N=s_N,
                       mesh=mesh)
    per = totals.per_token()
    rows.append({"steps": int(n), "solver": fixed.solver, "total": sum(per.values()), **per})
  return rows, totals.integrand()


@functools.partial(jax.jit, static_argnames=("graphdef", "self_cond"))
def _curve_sums(graphdef, state, ids_BxL, mask_BxL, key, gamma_G, *, self_cond: bool):
  """Summed held-out CE at each gamma for one batch: [G] nats (one eps draw reused for every gamma)."""
  model = nnx.merge(graphdef, state)
  m_BxL = mask_BxL.astype(jnp.float32)
  e_BxLxD = model.embed(ids_BxL)
  eps = jax.random.normal(key, e_BxLxD.shape, jnp.float32)

  def at(gamma):
    gamma_B = jnp.full(ids_BxL.shape[:1], gamma, jnp.float32)
    z = diffusion.add_noise(e_BxLxD, gamma_B, eps)
    x_sc = model.denoise(model(z, gamma_B, None)) if self_cond and model.self_conditioning else None
    return jnp.sum(token_cross_entropy(model(z, gamma_B, x_sc), ids_BxL) * m_BxL)

  return jax.lax.map(at, gamma_G)


def denoising_curve(model: LangFlow, split: pipeline.PackedSplit, gamma_G: Sequence[float] | np.ndarray, *,
                    batch_size: int, num_batches: int, seed: int, self_cond: bool = False) -> np.ndarray:
  """Held-out denoiser cross-entropy (nats/token, EMA weights as given) at fixed noise levels.

  This is the empirical conditional entropy curve H(gamma) that the learned
  Gumbel schedule fits during training (method §4.4), measured on held-out text
  at chosen gammas instead of at the schedule's own draws, so that models
  trained with different schedules are compared on the same levels. Every
  gamma sees the same sequences and the same eps (batch i: fold_in(PRNGKey(seed), i)),
  so differences between levels are not sampling noise. ``self_cond``
  adds the self-conditioning pre-pass (as the likelihood evaluation does);
  the default, a zero self-conditioning input, is what most training draws
  (and hence the schedule's fit) see.
  """
  gamma_G = jnp.asarray(np.asarray(gamma_G, np.float32))
  graphdef, state = nnx.split(model)
  key = jax.random.PRNGKey(seed)
  sums, tokens = np.zeros(gamma_G.shape, np.float64), 0.0
  n = _num_batches(split, batch_size, num_batches)
  for i, batch in enumerate(pipeline.eval_batches(split, batch_size, n)):
    sums += np.asarray(_curve_sums(graphdef, state, batch["ids"], batch["mask"], jax.random.fold_in(key, i),
                                   gamma_G, self_cond=bool(self_cond)), np.float64)
    tokens += float(batch["mask"].sum())
  return sums / max(tokens, 1.0)


# --------------------------------------------------------------------------- the protocol card


def protocol_card(config: ml_collections.ConfigDict, model: LangFlow, opts: lk.BoundOptions, *, split: str,
                  totals: _Totals, num_batches: int, source: dict[str, Any]) -> dict[str, Any]:
  """Everything that changes the number, in the order a reader needs it."""
  d, e = config.data, config.eval
  grid = np.asarray(lk.gamma_grid(model, opts))
  lo, hi = float(grid[0]), float(grid[-1])
  if opts.solver == "adaptive":
    solver = f"adaptive (diffrax Tsit5, rtol {opts.rtol:g}, atol {opts.atol:g}, max {opts.max_steps} steps)"
    steps = f"{totals.steps} accepted (largest batch), {totals.evals} evaluations"
  else:
    solver = {"heun": "heun (explicit trapezoid, official heun2)", "euler": "euler",
              "rk4": "rk4 (3/8 rule)"}[opts.solver]
    steps = f"{opts.steps} ({totals.evals} evaluations per batch)"
  estimator = opts.estimator if opts.estimator == "exact" else \
      f"{opts.estimator} (forward-mode JVP), {opts.probes} probe(s) per evaluation"
  mode = {"flow": "flow (official default): ODE bound, divergence past the self-conditioning pre-pass",
          "sc_chain_rule": "sc_chain_rule: ODE bound, divergence through the self-conditioning pre-pass",
          "sde": f"sde: Monte-Carlo ELBO, {opts.mc_samples} noise levels per sequence from the schedule"}[opts.mode]
  if opts.mode == "sde":
    solver = steps = estimator = "none (no ODE in sde mode)"
  return {
      "data": d.name,
      "split": split,
      "tokenizer": d.tokenizer,
      "seq_len": int(d.seq_len),
      "packing": "wrapped: [BOS] chunk [EOS] blocks, separators counted" if d.wrap
                 else "one document per row, padding masked",
      "sequences": totals.sequences,
      "tokens": int(totals.tokens),
      "batches": f"{num_batches} x {e.batch_size} sequences",
      "mode": mode,
      "solver": solver,
      "steps": steps,
      "grid": f"{opts.grid} (gamma {lo:.4f} -> {hi:.4f}; z_0 drawn at gamma_min)",
      "estimator": estimator,
      "self_cond": ("off" if not (opts.self_cond and model.self_conditioning) else
                    "pre-pass at every evaluation" + {"flow": ", excluded from the divergence",
                                                      "sc_chain_rule": ", inside the divergence"}.get(opts.mode, "")),
      "weights": source["weights"],
      "checkpoint": source["checkpoint"],
      "dtype": f"model matmuls {config.model.compute_dtype}; likelihood float32",
      "seed": f"{e.seed} (one eps draw per sequence; key folded with the batch index)",
      "parameters": count_params(model),
  }


# --------------------------------------------------------------------------- plots


def write_plot(path: pathlib.Path, result: EvalResult) -> str:
  """Bound and terms vs steps (left) and the flow integrand vs gamma (right)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  if result.sweep:
    steps = [r["steps"] for r in result.sweep]
    for key, label in (("total", "bound"), ("reconst", "reconstruction"), ("flow", "flow"), ("prior", "prior")):
      ax1.plot(steps, [r[key] for r in result.sweep], "o-", label=label)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel(f"steps ({result.sweep[0]['solver']})")
    ax1.set_ylabel("nats / token")
    ax1.set_title("bound and terms vs steps", fontsize=10)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
  if result.integrand:
    gamma = np.asarray(result.integrand["gamma"])
    values = np.asarray(result.integrand["flow_nats_per_token_per_gamma"])
    order = np.argsort(gamma, kind="stable")
    ax2.plot(gamma[order], values[order], ".-", ms=3)
    ax2.set_xlabel("gamma = log(sigma^2 / alpha^2)")
    ax2.set_ylabel("d flow / d gamma  (nats / token)")
    ax2.set_title("flow integrand (alpha/2) div x_hat", fontsize=10)
    ax2.grid(alpha=0.3)
  c = result.card
  fig.suptitle(f"{c['data']} ({c['split']}): {result.nats_per_token:.3f} nats/token", fontsize=10)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return str(path)


# --------------------------------------------------------------------------- entry points


def evaluate_model(config: ml_collections.ConfigDict, model: LangFlow, *, split: str | None = None,
                   source: dict[str, Any] | None = None, plot: bool = False,
                   progress: bool = False, mesh: jax.sharding.Mesh | None = None) -> EvalResult:
  """The bound of ``model`` on ``config.data`` (split ``split`` or ``config.eval.split``).

  It runs sharded on ``mesh`` (default: the mesh of ``config.mesh``); the
  model's weights are placed there by the sharding rules.
  """
  config_lib.validate_eval(config)
  e = config.eval
  split = split or e.split
  opts = lk.BoundOptions.from_config(e)
  mesh = parallel.make_mesh(config.mesh) if mesh is None else mesh
  parallel.check_batch(e.batch_size, mesh, what="eval.batch_size")
  parallel.shard_model(model, mesh)
  tokenizer = load_tokenizer(config.data.tokenizer)
  train.check_data_matches_model(config, tokenizer)
  data = pipeline.load_split(config.data, split, tokenizer)
  n = _num_batches(data, e.batch_size, e.num_batches)
  start = time.perf_counter()
  # The grid is passed in, so a sweep padded to the same length reuses the compilation.
  s_N = None if opts.solver == "adaptive" else np.asarray(lk.s_grid(model, opts))
  totals = run_bound(model, data, opts, batch_size=e.batch_size, num_batches=n, seed=e.seed, s_N=s_N,
                     progress=progress, mesh=mesh)
  seconds = time.perf_counter() - start
  per = totals.per_token()
  source = source or {"weights": "as given", "checkpoint": "(in memory)"}
  result = EvalResult(
      nats_per_token=sum(per.values()), stderr=totals.stderr(), terms=per, num_tokens=int(totals.tokens),
      num_sequences=totals.sequences,
      card=protocol_card(config, model, opts, split=split, totals=totals, num_batches=n, source=source),
      seconds=seconds, integrand=totals.integrand(), nats_per_token_vr=totals.variance_reduced(),
      stderr_vr=totals.stderr(variance_reduced=True))
  if e.get("reference", True) and isinstance(model, LangFlow):
    result.reference = context_free_reference(model, data, opts, config, n, mesh)
  if plot:
    steps = sorted(set(int(s) for s in e.plot_steps) | ({opts.steps} if opts.solver != "adaptive" else set()))
    result.sweep, integrand = steps_sweep(model, data, opts, steps, batch_size=e.batch_size,
                                          num_batches=min(e.plot_batches, n), seed=e.seed, mesh=mesh)
    result.integrand = result.integrand or integrand  # the adaptive solver keeps no trace
  return result


def load_for_eval(workdir: str | pathlib.Path | None, checkpoint: str | pathlib.Path | None,
                  overrides: Sequence[str] = ()) -> tuple[ml_collections.ConfigDict, LangFlow, dict, pathlib.Path]:
  """(config, model, source description, output directory) for a run or a checkpoint.

  ``checkpoint`` is a step directory of a run (``RUN/checkpoints/600``) or an
  official release directory (``config.json`` + ``model.safetensors``). The
  ``eval`` settings are checked after the overrides, before any weights load;
  a run's weights are restored onto the mesh of ``config.mesh``.
  """
  step = None
  if checkpoint is not None:
    path = pathlib.Path(checkpoint).expanduser()
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
      config, model = convert.load_official(path)
      config_lib.apply_overrides(config, overrides)
      config_lib.validate_eval(config)
      return config, model, {"weights": "official release, as stored", "checkpoint": str(path)}, path / "eval"
    if path.name.isdigit() and path.parent.name == ckpt_lib.CHECKPOINT_DIR:
      workdir, step = path.parent.parent, int(path.name)
    else:
      raise CheckpointError(f"{path} is neither a run's checkpoint step (RUN/checkpoints/<step>) nor an "
                            "official release directory (config.json + model.safetensors).",
                            "pass --workdir RUN, --checkpoint RUN/checkpoints/<step> or a release directory.")
  if workdir is None:
    raise ConfigError("nothing to evaluate.", "pass --workdir RUN or --checkpoint PATH.")
  config = ckpt_lib.saved_config(workdir)
  config_lib.apply_overrides(config, overrides)
  config_lib.validate_eval(config)
  mesh = parallel.make_mesh(config.mesh)
  if step is None:
    step = ckpt_lib.open_run(workdir)[0].latest_step()
  config, model = train.load_model(workdir, use_ema=config.eval.use_ema, config=config, step=step, mesh=mesh)
  weights = "EMA" if config.eval.use_ema else "raw (no EMA)"
  source = {"weights": weights, "checkpoint": str(ckpt_lib.checkpoint_dir(workdir) / str(step))}
  return config, model, source, pathlib.Path(workdir).expanduser() / "eval"


def default_name(config: ml_collections.ConfigDict, split: str) -> str:
  e = config.eval
  data = "".join(c if c.isalnum() else "-" for c in config.data.name.split("/")[-1]).strip("-")[:40]
  run = f"adaptive-rtol{e.rtol:g}" if e.solver == "adaptive" else f"{e.solver}{e.steps}"
  if e.get("mode", "flow") == "sde":
    run = f"sde{e.mc_samples}"
  elif e.get("mode", "flow") != "flow":
    run += f"-{e.mode}"
  return f"{data}_{split}_{run}"


def evaluate_workdir(workdir: str | pathlib.Path | None = None, overrides: Sequence[str] = (), *,
                     checkpoint: str | pathlib.Path | None = None, data: str | None = None,
                     split: str | None = None, name: str | None = None, plot: bool = False,
                     write: bool = True, progress: bool = False) -> EvalResult:
  """Loads a run (or checkpoint), computes the bound, writes JSON (and a PNG).

  ``data`` replaces ``data.name`` (e.g. ``file:my.txt``); a user's own data
  is measured whole (split ``all``) unless ``split`` says otherwise. With
  several processes, process 0 writes the files.
  """
  if data is not None:
    overrides = [*overrides, f"config.data.name={data}"]
  if split is not None or data is not None:
    overrides = [*overrides, f"config.eval.split={split or 'all'}"]
  config, model, source, out_dir = load_for_eval(workdir, checkpoint, overrides)
  split = config.eval.split
  result = evaluate_model(config, model, source=source, plot=plot, progress=progress)
  if write and jax.process_index() == 0:
    name = name or default_name(config, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    result.files.append(str(path))
    if plot:
      result.files.append(write_plot(out_dir / f"{name}.png", result))
  return result
