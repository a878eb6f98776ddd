"""The method registry: LangFlow and its two baselines behind one small interface.

A method is what ``config.objective.name`` names. Each one owns

* its model: :meth:`Method.create_model` (the class a checkpoint restores into);
* its training objective: :meth:`Method.objective`, the summed loss terms of
  :mod:`langflow_jax.objective` that the trainer differentiates;
* its likelihood on a dataset split: :meth:`Method.likelihood`. LangFlow: the
  ODE bound of :mod:`langflow_jax.likelihood` in its ``eval.mode`` (method §5);
  AR: the exact teacher-forced NLL; MDLM: the NELBO (both upper bounds for the
  diffusion models). One :class:`Likelihood` comes back, with the method's rows
  of the protocol card;
* its sampler: :meth:`Method.generate` (token ids, for benchmarks) and
  :meth:`Method.sample_texts` (decoded samples of ``config.sample``);
* how it is served: :attr:`Method.serving`, a :class:`langflow_jax.serving.Serving`
  (its request fields, engine job, stream and slot engine);
* what the trainer needs beyond the objective: :meth:`Method.training_objective`
  (the objective with what it reads bound, e.g. a student's frozen teacher),
  :meth:`Method.start_weights` (which weights of ``train.restore_from`` start
  the run) and :meth:`Method.card` (what a run says about itself).

``distill`` is LangFlow trained as a few-step student of a frozen LangFlow
teacher (:mod:`langflow_jax.distillation`); it samples and serves as LangFlow.

The trainer, ``eval``, ``sample-baseline``, ``serve`` and the experiments ask
:func:`get` (or :func:`for_config`) and never branch on the name. A new
method is a subclass registered in :data:`METHODS`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from langflow_jax import distillation
from langflow_jax import likelihood as lk
from langflow_jax import model as model_lib
from langflow_jax import objective as objective_lib
from langflow_jax import reporting, sampling
from langflow_jax import serving as serving_lib
from langflow_jax.baselines import ar, mdlm
from langflow_jax.data import pipeline
from langflow_jax.data.prepare import PackedSplit
from langflow_jax.errors import ConfigError

Array = jax.Array


@dataclasses.dataclass
class Likelihood:
  """A method's likelihood figure on a dataset split, in nats per valid token."""

  measure: str                  # what the number is: "bound", "exact NLL", "NELBO"
  summary: str                  # the measure and its protocol in a few words, for tables: "ODE bound (heun 32)"
  upper_bound: bool             # an upper bound on the NLL (perplexity <=), or the NLL itself
  nats_per_token: float
  stderr: float                 # over the sequences: the text and the method's own draws
  stderr_covers: str            # what the standard error covers, e.g. "text, eps and probes"
  terms: dict[str, float]       # nats/token; they sum to nats_per_token
  num_tokens: int
  num_sequences: int
  num_batches: int
  seconds: float                # the main figure's computation (no reference, no sweep)
  card: dict[str, Any]          # the method's rows of the protocol card ("seed" among them)
  # Method-specific figures for the report and JSON. LangFlow: nats_per_token_vr, stderr_vr,
  # integrand, reference (the context-free denoiser's bound) and sweep (eval --plot).
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class Method:
  """One method's model, objective, likelihood and sampler (see the module docstring)."""

  name: str = ""                # config.objective.name
  label: str = ""               # how tables and reports call it
  model_class: type = nnx.Module
  serving: serving_lib.Serving = serving_lib.Serving()
  # Config keys (or "group." prefixes) this method's training never reads: two runs
  # that differ only there are the same experiment.
  unused_keys: tuple[str, ...] = ("distill.",)
  # Where a fresh run's head bias starts under ``objective.output_bias_init=auto``: "unigram" (the
  # training split's log frequencies) or "zeros".
  output_bias_init: str = "unigram"

  def uses_key(self, key: str) -> bool:
    return not any(key == k or (k.endswith(".") and key.startswith(k)) for k in self.unused_keys)

  def create_model(self, config: ml_collections.ConfigDict, seed: int = 0) -> nnx.Module:
    raise NotImplementedError

  def objective(self, model: nnx.Module, ids_BxL: Array, mask_BxL: Array, key: Array, *,
                cfg: ml_collections.ConfigDict, skip_scale: Array | float = 1.0,
                train: bool = True) -> objective_lib.ObjectiveOutput:
    raise NotImplementedError

  def training_objective(self, config: ml_collections.ConfigDict, load_run: Callable | None = None
                         ) -> Callable[..., objective_lib.ObjectiveOutput]:
    """What the trainer differentiates: ``(model, ids_BxL, mask_BxL, key, *, skip_scale, train)``,
    :meth:`objective` with ``config.objective`` bound. ``load_run(path, use_ema=True)`` gives
    ``(config, model)`` of another run (the trainer passes ``checkpoint.load_model``): what a
    student reads its teacher with."""
    del load_run
    return functools.partial(self.objective, cfg=config.objective)

  def head_bias_init(self, config: ml_collections.ConfigDict) -> str:
    """``objective.output_bias_init`` with ``auto`` resolved to this method's own start."""
    choice = config.objective.output_bias_init
    return self.output_bias_init if choice == "auto" else choice

  def start_weights(self, weights: dict[str, Any]) -> dict[str, Any]:
    """The ``params``, ``ema_params`` and ``buffers`` a ``train.restore_from`` run starts from
    (fine-tuning: the other run's own)."""
    return weights

  def card(self, config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """What a run of this method says about itself beyond its config (None: nothing)."""
    del config
    return None

  def likelihood(self, model: nnx.Module, data: PackedSplit, config: ml_collections.ConfigDict, *,
                 mesh: jax.sharding.Mesh | None = None, progress: bool = False,
                 sweep: bool = False) -> Likelihood:
    """The figure on the first ``eval.num_batches`` x ``eval.batch_size`` rows of ``data``.

    ``sweep`` (``eval --plot``) adds what the method can plot (LangFlow: the
    bound against the step count and the flow integrand).
    """
    raise NotImplementedError

  def likelihood_tag(self, config: ml_collections.ConfigDict) -> str:
    """A short name of the likelihood protocol, for result file names (``heun128``, ``nll``)."""
    raise NotImplementedError

  def generate(self, model: nnx.Module, key: Array, *, num: int, length: int, steps: int) -> tuple[Array, Any]:
    """``num`` unconditional samples of ``length`` tokens and the network evaluations spent."""
    raise NotImplementedError

  def sample_texts(self, model: nnx.Module, tokenizer, sample_cfg: ml_collections.ConfigDict, length: int,
                   prompt: str = "") -> list[str]:
    """``sample.num`` decoded samples by the ``sample`` config group, after ``prompt`` if given."""
    raise NotImplementedError

  def check_model(self, model: nnx.Module) -> None:
    if not isinstance(model, self.model_class):
      raise ConfigError(f"objective.name={self.name} trains a {self.model_class.__name__}, but the model is a "
                        f"{type(model).__name__}.", "load the model together with its own config.")


def _per_sequence(measure: str, summary: str, upper_bound: bool, term: str, totals_N: np.ndarray,
                  tokens_N: np.ndarray, num_batches: int, seconds: float, card: dict[str, Any],
                  covers: str) -> Likelihood:
  """A :class:`Likelihood` from each valid sequence's total (nats) and token count."""
  valid = tokens_N > 0
  totals_N, tokens_N = totals_N[valid], tokens_N[valid]
  tokens = float(tokens_N.sum())
  value = float(totals_N.sum() / max(tokens, 1.0))
  return Likelihood(measure=measure, summary=summary, upper_bound=upper_bound, nats_per_token=value,
                    stderr=lk.ratio_stderr(totals_N, tokens_N), stderr_covers=covers, terms={term: value},
                    num_tokens=int(tokens),
                    num_sequences=int(valid.sum()), num_batches=num_batches, seconds=seconds, card=card)


class LangFlowMethod(Method):
  name, label, model_class = "langflow", "LangFlow", model_lib.LangFlow
  serving = serving_lib.LangFlowServing()

  def create_model(self, config, seed=0):
    return model_lib.create_model(config, seed)

  def objective(self, model, ids_BxL, mask_BxL, key, *, cfg, skip_scale=1.0, train=True):
    return objective_lib.langflow_objective(model, ids_BxL, mask_BxL, key, cfg=cfg, skip_scale=skip_scale,
                                            train=train)

  def likelihood(self, model, data, config, *, mesh=None, progress=False, sweep=False):
    e = config.eval
    opts = lk.BoundOptions.from_config(e)
    n = lk.num_eval_batches(data, e.batch_size, e.num_batches)
    start = time.perf_counter()
    # The grid is passed in, so a sweep padded to the same length reuses the compilation.
    s_N = None if opts.solver == "adaptive" else np.asarray(lk.s_grid(model, opts))
    totals = lk.run_bound(model, data, opts, batch_size=e.batch_size, num_batches=n, seed=e.seed, s_N=s_N,
                          progress=progress, mesh=mesh)
    seconds = time.perf_counter() - start
    per = totals.per_token()
    extra = {"nats_per_token_vr": totals.variance_reduced(), "stderr_vr": totals.stderr(variance_reduced=True),
             "integrand": totals.integrand(), "reference": None, "sweep": None}
    if e.get("reference", True):
      extra["reference"] = lk.context_free_reference(model, data, opts, config, n, mesh)
    if sweep:
      steps = sorted(set(int(s) for s in e.plot_steps) | ({opts.steps} if opts.solver != "adaptive" else set()))
      extra["sweep"], integrand = lk.steps_sweep(model, data, opts, steps, batch_size=e.batch_size,
                                                 num_batches=min(e.plot_batches, n), seed=e.seed, mesh=mesh)
      extra["integrand"] = extra["integrand"] or integrand  # the adaptive solver keeps no trace
    card = {"measure": "LangFlow's likelihood bound (an upper bound on the NLL, method §5)",
            **lk.bound_card(model, opts, totals),
            "seed": f"{e.seed} (one eps draw per sequence; key folded with the batch index)"}
    if opts.mode == "sde":
      summary = f"Monte-Carlo ELBO ({opts.mc_samples} noise levels)"
    else:
      run = f"adaptive, rtol {opts.rtol:g}" if opts.solver == "adaptive" else f"{opts.solver} {opts.steps}"
      summary = f"ODE bound ({run}{'' if opts.mode == 'flow' else ', ' + opts.mode})"
    return Likelihood(measure="bound", summary=summary, upper_bound=True, nats_per_token=sum(per.values()),
                      stderr=totals.stderr(), stderr_covers="text, eps and probes", terms=per,
                      num_tokens=int(totals.tokens), num_sequences=totals.sequences, num_batches=n,
                      seconds=seconds, card=card, extra=extra)

  def likelihood_tag(self, config):
    e = config.eval
    mode = e.get("mode", "sc_chain_rule")
    if mode == "sde":
      return f"sde{e.mc_samples}"
    tag = f"adaptive-rtol{e.rtol:g}" if e.solver == "adaptive" else f"{e.solver}{e.steps}"
    return tag if mode == "sc_chain_rule" else f"{tag}-{mode}"  # the default mode is not named

  def generate(self, model, key, *, num, length, steps):
    options = sampling.SamplerOptions(steps=steps)
    return sampling.sample(model, key, options, num=num, seq_len=length).tokens_BxL, options.nfe

  def sample_texts(self, model, tokenizer, sample_cfg, length, prompt=""):
    num = int(sample_cfg.num)
    cond = sampling.prompt_conditioning(tokenizer, prompt, length, num) if prompt else None
    options = sampling.SamplerOptions.from_config(sample_cfg)
    out = sampling.sample(model, jax.random.PRNGKey(int(sample_cfg.seed)), options, num=num, seq_len=length,
                          cond=cond)
    return [tokenizer.decode(row) for row in np.asarray(out.tokens_BxL)]


class _Baseline(Method):
  """A baseline whose module (``baselines.ar``, ``baselines.mdlm``) has ``create_model``,
  ``objective`` and ``sample_texts`` under those names."""

  module: Any = None
  # LangFlow's noise schedule, self-conditioning and skip ramp
  unused_keys = ("distill.", "schedule.", "objective.self_cond_prob", "objective.self_cond_mode",
                 "objective.skip_warmup_steps",
                 "objective.schedule_loss_weight", "objective.elbo_weight", "objective.quantile_power",
                 "optimizer.schedule_lr_scale",
                 "model.logit_init_std", "model.use_skip", "model.self_conditioning")

  def create_model(self, config, seed=0):
    return self.module.create_model(config, seed)

  def objective(self, model, ids_BxL, mask_BxL, key, *, cfg, skip_scale=1.0, train=True):
    return self.module.objective(model, ids_BxL, mask_BxL, key, cfg=cfg, skip_scale=skip_scale, train=train)

  def sample_texts(self, model, tokenizer, sample_cfg, length, prompt=""):
    return self.module.sample_texts(model, tokenizer, sample_cfg, length, prompt)


class ARMethod(_Baseline):
  name, label, model_class, module = "ar", "AR Transformer", ar.ARTransformer, ar
  serving = serving_lib.ARServing()

  def likelihood(self, model, data, config, *, mesh=None, progress=False, sweep=False):
    """The exact NLL: teacher forcing, every valid token scored (the first from the start vector)."""
    del mesh, sweep  # the weights are where they are; nothing to sweep
    e = config.eval
    n = lk.num_eval_batches(data, e.batch_size, e.num_batches)
    start = time.perf_counter()
    nll, count = [], []
    bar = reporting.Progress(n, 0, progress)
    try:
      for batch in pipeline.eval_batches(data, e.batch_size, n):
        nll_B, count_B = ar.sequence_nll(model, batch["ids"], batch["mask"], score_first=True)
        nll.append(np.asarray(nll_B, np.float64))
        count.append(np.asarray(count_B, np.float64))
        bar.update(1)
    finally:
      bar.close()
    card = {"measure": "exact NLL: teacher-forced -log p(x_t | x_<t), every valid token scored "
                       "(the first from the start vector)",
            "seed": "none (exact: no random draws)"}
    return _per_sequence("exact NLL", "exact NLL", False, "nll", np.concatenate(nll), np.concatenate(count), n,
                         time.perf_counter() - start, card, "text")

  def likelihood_tag(self, config):
    return "nll"

  def generate(self, model, key, *, num, length, steps):
    del steps  # one evaluation of one position per token
    return ar.generate(model, key, length, batch_size=num), length


class MDLMMethod(_Baseline):
  name, label, model_class, module = "mdlm", "MDLM", mdlm.MaskedDiffusionLM, mdlm
  serving = serving_lib.MDLMServing()
  # The unigram start, which gives LangFlow the context-free posterior for free, does not help the
  # absorbing-state model on real text: 6.474 against 6.183 nats/token from zeros on the embedded
  # corpus at 800 steps (experiments/results/baselines.md; on tok32, 33 tokens, the two are within
  # 0.01-0.04 of each other, known_entropy.md).
  output_bias_init = "zeros"

  @staticmethod
  def _samples(config, data: PackedSplit) -> int:
    return int(config.eval.get("nelbo_samples", 0)) or int(data.seq_len)

  def likelihood(self, model, data, config, *, mesh=None, progress=False, sweep=False):
    """The NELBO by :func:`mdlm.nelbo` (``eval.nelbo_estimator``, ``eval.nelbo_samples`` draws)."""
    del mesh, progress, sweep
    e = config.eval
    estimator = e.get("nelbo_estimator", "mask_count")
    samples = self._samples(config, data)
    n = lk.num_eval_batches(data, e.batch_size, e.num_batches)
    rows = list(pipeline.eval_batches(data, e.batch_size, n))
    ids = np.concatenate([b["ids"] for b in rows])
    mask = np.concatenate([b["mask"] for b in rows])
    start = time.perf_counter()
    r = mdlm.nelbo(model, ids, mask, key=jax.random.PRNGKey(e.seed), num_samples=samples, estimator=estimator,
                   eps=float(config.objective.mask_eps), batch_size=e.batch_size)
    count_N = mask.sum(axis=-1).astype(np.float64)
    how = ("mask_count: k ~ U{1..L} masked positions weighed by L / k (t integrated out exactly)"
           if estimator == "mask_count" else
           f"time: t ~ U({config.objective.mask_eps:g}, 1), masks of rate t weighed by 1 / t (the training loss)")
    card = {"measure": "MDLM's NELBO (an upper bound on the NLL) of the absorbing-state process",
            "estimator": f"{how}; {samples} stratified draws per sequence",
            "seed": f"{e.seed} (masks; key folded with the batch index)"}
    return _per_sequence("NELBO", f"NELBO ({estimator}, {samples} draws)", True, "nelbo",
                         r["nelbo_per_token_N"] * count_N, count_N, n, time.perf_counter() - start, card,
                         "text and masks")

  def likelihood_tag(self, config):
    e = config.eval
    samples = int(e.get("nelbo_samples", 0))
    return f"nelbo-{e.get('nelbo_estimator', 'mask_count')}" + (f"{samples}" if samples else "")

  def generate(self, model, key, *, num, length, steps):
    return mdlm.generate(model, key, length, steps=steps, batch_size=num, return_nfe=True)


class DistillMethod(LangFlowMethod):
  """A LangFlow trained as a few-step student of a frozen LangFlow teacher (``config.distill``).

  It samples, serves and is evaluated as LangFlow; only its training differs:
  the objective is :func:`distillation.distill_objective` against the teacher
  read from ``distill.teacher`` (a progressive round's: ``distill.round_teacher``),
  and the run starts from that teacher's EMA weights.
  """

  name, label = "distill", "LangFlow student"
  unused_keys = ()

  def objective(self, model, ids_BxL, mask_BxL, key, *, cfg, skip_scale=1.0, train=True):
    raise ConfigError("objective.name=distill trains against a teacher, which config.objective does not name.",
                      "train students with `langflow-jax distill --teacher RUN --workdir RUN2`.")

  def training_objective(self, config, load_run=None):
    if load_run is None:
      raise ConfigError("objective.name=distill needs its teacher read from a run directory.",
                        "train students with `langflow-jax distill --teacher RUN --workdir RUN2`.")
    path = config.distill.round_teacher or config.distill.teacher
    _, teacher = load_run(path, use_ema=True)
    if not isinstance(teacher, model_lib.LangFlow):
      raise ConfigError(f"the teacher {path} is a {type(teacher).__name__}, not a LangFlow.",
                        "pass --teacher the --workdir of a LangFlow training run.")
    grids = distillation.jump_grids(config.distill)

    def objective(model, ids_BxL, mask_BxL, key, *, skip_scale=1.0, train=True):
      return distillation.distill_objective(model, teacher, ids_BxL, mask_BxL, key, grids=grids,
                                            skip_scale=skip_scale, train=train)
    return objective

  def start_weights(self, weights):
    """Both copies from the teacher's EMA weights: the teacher samples with those."""
    return {**weights, "params": jax.tree.map(jax.numpy.copy, weights["ema_params"])}  # two buffers: both donated

  def card(self, config):
    return distillation.student_card(config.distill)


METHODS: dict[str, Method] = {m.name: m for m in (LangFlowMethod(), ARMethod(), MDLMMethod(), DistillMethod())}


def get(name: str) -> Method:
  """The method ``objective.name`` names (a clear error for an unknown one)."""
  if name not in METHODS:
    raise ConfigError(f"unknown objective '{name}'.", f"set --config.objective.name to one of {sorted(METHODS)}.")
  return METHODS[name]


def for_config(config: ml_collections.ConfigDict) -> Method:
  return get(config.objective.name)


def create_model(config: ml_collections.ConfigDict, seed: int = 0) -> nnx.Module:
  """A fresh model of the kind ``config.objective.name`` trains."""
  return for_config(config).create_model(config, seed)
