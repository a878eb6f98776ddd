"""Measuring a trained model's likelihood: ``langflow-jax eval``.

    langflow-jax eval --workdir runs/demo [--data file:my.txt] [--split heldout] [--plot]
    langflow-jax eval --checkpoint runs/demo/checkpoints/600     # one checkpoint of a run
    langflow-jax eval --checkpoint DIR --config.data.tokenizer=gpt2 --data file:x.txt  # official release

Every run the trainer makes is measured by its own method
(:mod:`langflow_jax.methods`): a LangFlow run by the ODE likelihood bound in
its ``eval.mode``, an AR run by its exact NLL, an MDLM run by its NELBO.
A number without its protocol cannot be compared or reproduced, so every
result carries a *protocol card*: dataset, split, packing, sequence length,
the method and its settings (LangFlow: mode, solver, steps, grid, divergence
estimator and probes), weights, dtypes, seed.
The report is printed and written as JSON under ``eval/`` beside the
checkpoint (``RUN/eval/<name>.json``); ``--plot`` adds ``eval/<name>.png``:
the bound and each term against the number of steps, and the flow term's
integrand against gamma.

Totals are sums over sequences divided by the valid-token count (method §5.3);
in wrapped data the BOS/EOS separators are tokens and count.

:func:`denoising_curve` measures the denoiser's held-out cross-entropy at
fixed noise levels: the conditional-entropy curve the learned schedule fits;
:func:`denoiser_gap_curve` compares it, level by level, with an exact
posterior's and says where the model's ELBO loses its nats.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from langflow_jax import checkpoint as ckpt_lib
from langflow_jax import config as config_lib
from langflow_jax import convert, diffusion, parallel
from langflow_jax import likelihood as lk
from langflow_jax import methods, plots
from langflow_jax.data import pipeline
from langflow_jax.data.tokenizer import check_matches_model, load_tokenizer
from langflow_jax.errors import CheckpointError, ConfigError
from langflow_jax.model import LangFlow, count_params
from langflow_jax.objective import token_cross_entropy

Array = jax.Array

# The names the library gave these before they moved there (notebooks and scripts use them).
TERMS = lk.TERMS
run_bound = lk.run_bound
steps_sweep = lk.steps_sweep
context_free_reference = lk.context_free_reference
_Totals = lk.BoundTotals
_num_batches = lk.num_eval_batches

# How the report names each term of a likelihood (a term not listed is printed by its key).
TERM_LINES = {
    "reconst": ("reconstruction", "cross-entropy at gamma_min"),
    "flow": ("flow", "divergence integral along the ODE"),
    "prior": ("prior", "Gaussian prior at the noisy end"),
}


@dataclasses.dataclass
class EvalResult:
  """A method's likelihood on one dataset split (LangFlow: the bound and its terms) and its protocol card."""

  nats_per_token: float
  stderr: float                    # standard error of nats_per_token over the sequences
  terms: dict[str, float]          # nats per token; they sum to nats_per_token (LangFlow: reconst, flow, prior)
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
  method: str = "langflow"         # config.objective.name of the evaluated run
  measure: str = "bound"           # what the number is: bound | exact NLL | NELBO
  summary: str = ""                # the measure and its protocol in a few words, e.g. "ODE bound (heun 128)"
  upper_bound: bool = True         # an upper bound on the NLL (perplexity <=) or the NLL itself
  stderr_covers: str = "text, eps and probes"  # what the standard error covers

  @property
  def bits_per_token(self) -> float:
    return lk.nats_to_bits(self.nats_per_token)

  @property
  def perplexity(self) -> float:
    return math.exp(self.nats_per_token) if self.nats_per_token < 700 else math.inf

  def to_json(self) -> dict[str, Any]:
    return {
        "method": self.method,
        "measure": self.measure,
        "summary": self.summary,
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
        f"{self.measure} on {c['data']} ({c['split']}): {self.nats_per_token:.4f} nats/token = "
        f"{self.bits_per_token:.4f} bits/token, perplexity {'<=' if self.upper_bound else '='} {self.perplexity:.2f}",
        f"  standard error {self.stderr:9.4f} nats/token  (over the {self.num_sequences} sequences: "
        f"{self.stderr_covers})",
    ]
    if not math.isnan(self.nats_per_token_vr):
      lines.append(f"  variance-reduced {self.nats_per_token_vr:7.4f} +- {self.stderr_vr:.4f} nats/token  (sampled "
                   "entropy of q(z_a|x) in place of its mean; same expectation)")
    if self.reference:
      lines += [f"  context-free     {self.reference['ode']:7.4f} nats/token  (the same protocol on a denoiser that "
                f"ignores context: skip term + unigram prior; exactly {self.reference['analytic']:.4f}, so the "
                f"solver's bias here is {self.reference['solver_bias']:+.4f})",
                f"  learned from context {self.reference['ode'] - self.nats_per_token_vr:+.4f} nats/token "
                "(context-free reference minus the variance-reduced bound)"]
    if len(self.terms) > 1:
      for key, value in self.terms.items():
        label, note = TERM_LINES.get(key, (key, ""))
        lines.append(f"  {label:<14} {value:9.4f} nats/token" + (f"  ({note})" if note else ""))
    lines.append("protocol card:")
    lines += [f"  {k:<17} {v}" for k, v in c.items()]
    lines += [f"wrote {f}" for f in self.files]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the denoising curve


def _logits_at_levels(model, ids_BxL, key, self_cond: bool):
  """gamma -> (gamma_B, z, logits) for one batch: one eps draw reused for every gamma, the
  self-conditioning pre-pass where asked (as the bound and the sampler run it)."""
  e_BxLxD = model.embed(ids_BxL)
  eps = jax.random.normal(key, e_BxLxD.shape, jnp.float32)

  def at(gamma):
    gamma_B = jnp.full(ids_BxL.shape[:1], gamma, jnp.float32)
    z = diffusion.add_noise(e_BxLxD, gamma_B, eps)
    x_sc = model.denoise(model(z, gamma_B, None)) if self_cond and model.self_conditioning else None
    return gamma_B, z, model(z, gamma_B, x_sc)

  return at


@functools.partial(jax.jit, static_argnames=("graphdef", "self_cond"))
def _curve_sums(graphdef, state, ids_BxL, mask_BxL, key, gamma_G, *, self_cond: bool):
  """Summed held-out CE at each gamma for one batch: [G] nats (one eps draw reused for every gamma)."""
  logits_at = _logits_at_levels(nnx.merge(graphdef, state), ids_BxL, key, self_cond)
  m_BxL = mask_BxL.astype(jnp.float32)

  def at(gamma):
    return jnp.sum(token_cross_entropy(logits_at(gamma)[2], ids_BxL) * m_BxL)

  return jax.lax.map(at, gamma_G)


def _per_gamma_means(sums_fn, split: pipeline.PackedSplit, batch_size: int, num_batches: int, seed: int):
  """Held-out per-token means of ``sums_fn(ids, mask, key) -> pytree of [G] sums`` over the batches;
  batch i draws its eps from fold_in(PRNGKey(seed), i), whatever is measured."""
  key = jax.random.PRNGKey(seed)
  sums, tokens = None, 0.0
  n = lk.num_eval_batches(split, batch_size, num_batches)
  for i, batch in enumerate(pipeline.eval_batches(split, batch_size, n)):
    part = jax.tree.map(lambda x: np.asarray(x, np.float64),
                        sums_fn(batch["ids"], batch["mask"], jax.random.fold_in(key, i)))
    sums = part if sums is None else jax.tree.map(np.add, sums, part)
    tokens += float(batch["mask"].sum())
  return jax.tree.map(lambda x: x / max(tokens, 1.0), sums)


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
  return _per_gamma_means(
      lambda ids, mask, key: _curve_sums(graphdef, state, ids, mask, key, gamma_G, self_cond=bool(self_cond)),
      split, batch_size, num_batches, seed)


def elbo_excess_density(x_hat_BxLxD: Array, mean_BxLxD: Array, gamma: Array) -> Array:
  """0.5 e^-gamma ||E[e | z] - x_hat||^2 per token [B, L]: what a denoiser ``x_hat`` adds to the
  diffusion ELBO's integrand (nats per unit gamma) over the exact posterior mean's.

  The ELBO's integrand is 0.5 e^-gamma E||e - x_hat(z)||^2 (the ``sde`` mode, method §11);
  splitting e - x_hat = (e - E[e|z]) + (E[e|z] - x_hat), the cross term has mean zero given z, so
  the first part is the exact posterior's integrand and the second is this excess. Integrated over
  the bound's gamma range, plus the reconstruction CE's excess at gamma_min, it is exactly how far
  the model's ELBO lies above the exact posterior's (the data's NLL up to the prior's mismatch).
  """
  return 0.5 * jnp.exp(-gamma) * jnp.sum(jnp.square(mean_BxLxD - x_hat_BxLxD), axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "ref_graphdef"))
def _gap_sums(graphdef, state, ref_graphdef, ref_state, ids_BxL, mask_BxL, key, gamma_G):
  """Per gamma, summed over one batch's valid tokens: the model's CE (self-conditioning pre-pass, as
  the bound and the sampler run it), the reference's CE and the ELBO excess density."""
  model, ref = nnx.merge(graphdef, state), nnx.merge(ref_graphdef, ref_state)
  logits_at = _logits_at_levels(model, ids_BxL, key, self_cond=True)
  m_BxL = mask_BxL.astype(jnp.float32)

  def at(gamma):
    gamma_B, z, logits = logits_at(gamma)
    ref_logits = ref(z, gamma_B)
    excess = elbo_excess_density(model.denoise(logits), ref.denoise(ref_logits), gamma)
    return {"ce": jnp.sum(token_cross_entropy(logits, ids_BxL) * m_BxL),
            "ce_reference": jnp.sum(token_cross_entropy(ref_logits, ids_BxL) * m_BxL),
            "elbo_excess": jnp.sum(excess * m_BxL)}

  return jax.lax.map(at, gamma_G)


def denoiser_gap_curve(model: LangFlow, reference: nnx.Module, split: pipeline.PackedSplit,
                       gamma_G: Sequence[float] | np.ndarray, *, batch_size: int, num_batches: int,
                       seed: int) -> dict[str, np.ndarray]:
  """Where a model's likelihood falls short of an exact posterior's, per noise level.

  ``reference`` is an exact denoiser over the model's own embeddings (an
  :mod:`langflow_jax.oracles` posterior, e.g. the Markov chain that made the
  data). Returns per-token held-out means at each gamma: the model's CE, the
  reference's CE (the conditional entropy H(x | z_gamma)) and
  :func:`elbo_excess_density`, all on the same sequences and eps.
  """
  gamma_G = jnp.asarray(np.asarray(gamma_G, np.float32))
  graphdef, state = nnx.split(model)
  ref_graphdef, ref_state = nnx.split(reference)
  return _per_gamma_means(
      lambda ids, mask, key: _gap_sums(graphdef, state, ref_graphdef, ref_state, ids, mask, key, gamma_G),
      split, batch_size, num_batches, seed)


# --------------------------------------------------------------------------- the protocol card


def protocol_card(config: ml_collections.ConfigDict, model: nnx.Module, lik: methods.Likelihood, *, split: str,
                  source: dict[str, Any]) -> dict[str, Any]:
  """Everything that changes the number, in the order a reader needs it: the data, then the
  method's own rows (LangFlow: mode, solver, steps, grid, estimator, self-conditioning), then
  the weights, dtypes and seed."""
  d, e = config.data, config.eval
  method_rows = {k: v for k, v in lik.card.items() if k != "seed"}
  return {
      "data": d.name,
      "split": split,
      "tokenizer": d.tokenizer,
      "seq_len": int(d.seq_len),
      "packing": "wrapped: [BOS] chunk [EOS] blocks, separators counted" if d.wrap
                 else "one document per row, padding masked",
      "sequences": lik.num_sequences,
      "tokens": int(lik.num_tokens),
      "batches": f"{lik.num_batches} x {e.batch_size} sequences",
      "method": config.objective.name,
      **method_rows,
      "weights": source["weights"],
      "checkpoint": source["checkpoint"],
      "dtype": f"model matmuls {config.model.compute_dtype}; likelihood float32",
      "seed": lik.card.get("seed", str(e.seed)),
      "parameters": count_params(model),
  }


# --------------------------------------------------------------------------- entry points


def evaluate_model(config: ml_collections.ConfigDict, model: nnx.Module, *, split: str | None = None,
                   source: dict[str, Any] | None = None, plot: bool = False,
                   progress: bool = False, mesh: jax.sharding.Mesh | None = None) -> EvalResult:
  """The likelihood of ``model`` on ``config.data`` (split ``split`` or ``config.eval.split``) by
  its method (``config.objective.name``): LangFlow's bound, the AR baseline's exact NLL or MDLM's NELBO.

  It runs sharded on ``mesh`` (default: the mesh of ``config.mesh``); the
  model's weights are placed there by the sharding rules.
  """
  config_lib.validate_eval(config)
  method = methods.for_config(config)
  method.check_model(model)
  e = config.eval
  split = split or e.split
  mesh = parallel.make_mesh(config.mesh) if mesh is None else mesh
  parallel.check_batch(e.batch_size, mesh, what="eval.batch_size")
  parallel.shard_model(model, mesh)
  tokenizer = load_tokenizer(config.data.tokenizer)
  check_matches_model(config, tokenizer)
  data = pipeline.load_split(config.data, split, tokenizer)
  lik = method.likelihood(model, data, config, mesh=mesh, progress=progress, sweep=plot)
  source = source or {"weights": "as given", "checkpoint": "(in memory)"}
  x = lik.extra
  return EvalResult(
      nats_per_token=lik.nats_per_token, stderr=lik.stderr, terms=lik.terms, num_tokens=lik.num_tokens,
      num_sequences=lik.num_sequences, card=protocol_card(config, model, lik, split=split, source=source),
      seconds=lik.seconds, integrand=x.get("integrand"), nats_per_token_vr=x.get("nats_per_token_vr", math.nan),
      stderr_vr=x.get("stderr_vr", math.nan), reference=x.get("reference"), sweep=x.get("sweep"),
      method=method.name, measure=lik.measure, summary=lik.summary, upper_bound=lik.upper_bound,
      stderr_covers=lik.stderr_covers)


def load_for_eval(workdir: str | pathlib.Path | None, checkpoint: str | pathlib.Path | None,
                  overrides: Sequence[str] = ()) -> tuple[ml_collections.ConfigDict, nnx.Module, dict, pathlib.Path]:
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
  # Without a step the newest readable checkpoint is used (a damaged newest one is skipped with a warning).
  config, model, step = ckpt_lib.load_model_and_step(workdir, use_ema=config.eval.use_ema, config=config,
                                                     step=step, mesh=mesh)
  weights = "EMA" if config.eval.use_ema else "raw (no EMA)"
  source = {"weights": weights, "checkpoint": str(ckpt_lib.checkpoint_dir(workdir) / str(step))}
  return config, model, source, pathlib.Path(workdir).expanduser() / "eval"


def default_name(config: ml_collections.ConfigDict, split: str) -> str:
  data = "".join(c if c.isalnum() else "-" for c in config.data.name.split("/")[-1]).strip("-")[:40]
  return f"{data}_{split}_{methods.for_config(config).likelihood_tag(config)}"


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
    if plot and (result.sweep or result.integrand):
      c = result.card
      result.files.append(plots.bound_plot(
          out_dir / f"{name}.png", result.sweep, result.integrand,
          title=f"{c['data']} ({c['split']}): {result.nats_per_token:.3f} nats/token"))
  return result
