"""LangFlow, MDLM and AR on text of known entropy: a compute ladder, and the recipe ablations.

  python experiments/exp_known_entropy.py [--quick] [--corpora tok32,words16] [--rungs 300,1200,4800]
                                          [--ablations all|none|NAME,...] [--methods langflow,mdlm,ar]

Why: on real text the entropy is unknown, so a likelihood says little about
how close a model is to the best possible. Here the corpora are Markov chains
(``langflow_jax.data.markov``) whose exact entropy per token goes into the
table beside every number:

* ``tok32``: a chain over 32 token ids (3 successors each, Dirichlet(1)
  weights, seed 0), rows of 64 tokens each started from the stationary
  distribution, so ``H`` is exactly the row entropy per token
  (H(pi) + 63 h) / 64; a word-level tokenizer of 33 tokens (the separator
  never occurs). Vocabulary small enough for fast rungs.
* ``words16``: a chain over 16 made-up words written as text (40 words per
  document), tokenized by the embedded 8k BPE and packed as usual
  ([BOS] chunk [EOS] rows of 64, every separator counted), the issue's
  setting. ``H`` is the stream's entropy per token, separators included:
  E[H(doc)] / E[tokens(doc) + 1]. Rows cut documents, so each row's first
  tokens lack context: the best achievable per-row figure is a little above
  ``H`` (about H + (H(pi) - h) / 64 + the row's two separators' share).

Every model is trained by the same trainer (``train.train_and_evaluate``) at
the ``tiny`` size (2 blocks of width 128, 32 x 64 tokens a step, AdamW with
cosine decay to the last step), and measured on the first 128 held-out rows:

* LangFlow: the ODE bound in ``sc_chain_rule`` mode (the divergence of the
  field that is integrated, self-conditioning included: a valid bound), Heun
  64 steps, one Gaussian probe, EMA weights, seed 1, the variance-reduced
  estimate (sampled entropy of q(z_a|x)); also the official ``flow`` mode,
  whose divergence skips the self-conditioning pre-pass, and the context-free
  reference (skip term + unigram prior) with its exact value;
* MDLM: its NELBO with every mask size once per row (t integrated out);
* AR: exact teacher-forced NLL.

The ablations change one thing of the LangFlow recipe at the 1,200-step rung
on ``tok32`` (and a few on ``words16``), and the learning-rate rows give MDLM
and AR the same tuning effort. Every row is reported, whether it helped or
not. Writes ``known_entropy.{md,json,png}`` (bound / H against steps, log-log).

Resumable and cached like the other scripts: runs live in
``--runs/known-entropy/<corpus>/<variant>-<steps>``, evaluations in JSON
beside them. Compute on an idle 2-core CPU: tok32 rungs take about 3 / 3 / 12
min per LangFlow run (300 / 1,200 / 4,800 steps, about 7 steps/s) and 1 min
per bound; words16 runs about 2.4 steps/s (the 8k head), 1 min per bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
from typing import Sequence

import numpy as np

import common
import harness
from exp_baselines import likelihood
from langflow_jax.data import markov
from langflow_jax.data.tokenizer import load_tokenizer

NAME = "known_entropy"
RUNGS, QUICK_RUNGS = (300, 1200, 4800), (3,)
METHODS = {"langflow": ("LangFlow", "tiny"), "mdlm": ("MDLM", "tiny_mdlm"), "ar": ("AR", "tiny_ar")}
ABLATION_STEPS = 1200


@dataclasses.dataclass(frozen=True)
class Corpus:
  name: str
  kind: str          # tokens | words
  states: int
  seed: int
  seq_len: int = 64
  train_rows: int = 60000   # tokens: rows; words: documents
  heldout_rows: int = 512


CORPORA = {
    "tok32": Corpus("tok32", "tokens", 32, seed=0),
    "words16": Corpus("words16", "words", 16, seed=2, train_rows=45000, heldout_rows=5000),
}
QUICK_CORPUS = Corpus("tok8-quick", "tokens", 8, seed=0, seq_len=32, train_rows=256, heldout_rows=16)


@dataclasses.dataclass(frozen=True)
class Ablation:
  name: str
  label: str
  overrides: tuple[str, ...]
  method: str = "langflow"
  corpora: tuple[str, ...] = ("tok32",)

  @property
  def absolute(self) -> bool:
    """Whether the row's experiment is fixed by its overrides alone, not by LangFlow's shipped
    recipe (a baseline's row, or a change of the previous recipe): such a row measured by an
    earlier invocation still stands after the recipe changes."""
    return self.method != "langflow" or self.name.startswith("v0")


# The tiny recipe before this study (self-conditioning p = 0.25 as in the paper, the schedule
# learning 5x faster than the network, H_inf starting at the config's 7.0, the official zero
# head): the screened rows change one thing of it, as they were run.
V0 = ("config.objective.self_cond_prob=0.25", "config.optimizer.schedule_lr_scale=5.0",
      "config.schedule.entropy_init=config", "config.model.logit_init_std=0.0")


def on_v0(name: str, label: str, *overrides: str) -> "Ablation":
  return Ablation(f"v0-{name}", f"previous recipe, {label}", (*V0, *overrides))


UNIGRAM_HEAD = "config.objective.output_bias_init=unigram"
ABLATIONS = (
    # Ordered by what they can tell: the run order of an interrupted study.
    Ablation("v0", "previous recipe (p_sc 0.25, schedule lr x5, H_inf from the config)", V0),
    Ablation("zero-head", "head kernel starts at zero (the official init; shipped: logits ~ N(0, 0.1^2))",
             ("config.model.logit_init_std=0.0",), corpora=("tok32", "words16")),
    Ablation("head-std1", "head kernel starts larger (logits ~ N(0, 1))", ("config.model.logit_init_std=1.0",)),
    Ablation("sc0.25", "self-conditioning p = 0.25 (the paper's; shipped: 1)", ("config.objective.self_cond_prob=0.25",)),
    Ablation("u-power2", "training draws at icdf(u^2): more at low noise, where the gap profile puts the excess",
             ("config.objective.quantile_power=2.0",), corpora=("tok32", "words16")),
    Ablation("u-power3", "training draws at icdf(u^3)", ("config.objective.quantile_power=3.0",)),
    Ablation("lr3e-3", "lr 3e-3 (shipped 2e-3)", ("config.optimizer.lr=3e-3",)),
    Ablation("lr1e-3", "lr 1e-3", ("config.optimizer.lr=1e-3",)),
    Ablation("mdlm0-lr4e-3", "MDLM lr 4e-3 (shipped 2e-3)", ("config.optimizer.lr=4e-3",), method="mdlm"),
    Ablation("mdlm0-lr1e-3", "MDLM lr 1e-3", ("config.optimizer.lr=1e-3",), method="mdlm"),
    Ablation("sc0.25-ema0.999", "self-conditioning p = 0.25, EMA decay 0.999 (shipped: 1, 0.99)",
             ("config.objective.self_cond_prob=0.25", "config.optimizer.ema_decay=0.999")),
    Ablation("mdlm-ema0.999", "MDLM, EMA decay 0.999 (shipped 0.99)", ("config.optimizer.ema_decay=0.999",),
             method="mdlm"),
    Ablation("mdlm-unigram-bias", "MDLM, head bias at the log unigram (its previous default; shipped: 0)",
             (UNIGRAM_HEAD,), method="mdlm", corpora=("tok32", "words16")),
    # Rows measured while MDLM's head started at the log unigram (the overrides say so, so they stand).
    Ablation("mdlm-lr4e-3", "MDLM, log-unigram head, lr 4e-3", ("config.optimizer.lr=4e-3", UNIGRAM_HEAD),
             method="mdlm"),
    Ablation("mdlm-lr1e-3", "MDLM, log-unigram head, lr 1e-3", ("config.optimizer.lr=1e-3", UNIGRAM_HEAD),
             method="mdlm"),
    Ablation("ar-lr4e-3", "AR lr 4e-3", ("config.optimizer.lr=4e-3",), method="ar"),
    Ablation("ar-lr1e-3", "AR lr 1e-3", ("config.optimizer.lr=1e-3",), method="ar"),
    Ablation("mdlm-depth4", "MDLM, log-unigram head, 4 blocks (2x the FLOPs)", ("config.model.n_blocks=4", UNIGRAM_HEAD),
             method="mdlm"),
    Ablation("depth4", "4 blocks (2x the FLOPs)", ("config.model.n_blocks=4",)),
    Ablation("no-self-cond", "no self-conditioning", ("config.model.self_conditioning=false",)),
    Ablation("fixed-schedule", "schedule not learned (Gumbel at its initial loc/scale)",
             ("config.optimizer.schedule_lr_scale=0.0",)),
    Ablation("ce+elbo", "CE + importance-weighted ELBO term", ("config.objective.elbo_weight=1.0",)),
    Ablation("elbo-only", "ELBO term only (no CE)", ("config.objective.elbo_weight=1.0",
                                                      "config.objective.ce_weight=0.0")),
    # The screen of the previous recipe at 300 steps (--ablation-steps 300), one change each.
    on_v0("sc0.5", "self-conditioning p = 0.5", "config.objective.self_cond_prob=0.5"),
    on_v0("sc1.0", "self-conditioning on every step (p = 1; the eval always self-conditions)",
          "config.objective.self_cond_prob=1.0"),
    on_v0("sc-per-seq", "self-conditioning coin per sequence (one per batch otherwise)",
          "config.objective.self_cond_mode=sample"),
    on_v0("sched-lr1", "schedule lr multiplier 1", "config.optimizer.schedule_lr_scale=1.0"),
    on_v0("entropy-unigram", "H_inf starts at the unigram entropy (2.9)", "config.schedule.entropy=2.9"),
    on_v0("depth4", "4 blocks (2x the FLOPs)", "config.model.n_blocks=4"),
    on_v0("lr4e-3", "lr 4e-3 (2e-3)", "config.optimizer.lr=4e-3"),
    on_v0("lr1e-3", "lr 1e-3", "config.optimizer.lr=1e-3"),
    on_v0("no-skip-ramp", "skip term at full weight from step 0 (a ramp over 100 steps otherwise)",
          "config.objective.skip_warmup_steps=0"),
    on_v0("loc2", "schedule starts at loc 2 (3)", "config.schedule.loc=2.0"),
    on_v0("loc4", "schedule starts at loc 4", "config.schedule.loc=4.0"),
    on_v0("scale1.5", "schedule starts at scale 1.5 (0.9)", "config.schedule.scale=1.5"),
    on_v0("warmup10", "lr warm-up 10 steps (50)", "config.optimizer.warmup_steps=10"),
    on_v0("emb-lr0.1", "token-embedding lr x 0.1", "config.optimizer.embedding_lr_scale=0.1"),
    on_v0("emb-frozen", "token embeddings frozen at their random init", "config.optimizer.embedding_lr_scale=0.0"),
    Ablation("emb-lr0.1", "token-embedding lr x 0.1", ("config.optimizer.embedding_lr_scale=0.1",)),
    # Plaid trains its embedding table at 1e-2 against the network's 1.4e-3 (x7), with Adam's b2 at 0.99.
    Ablation("emb-lr7", "token-embedding lr x 7 (Plaid's ratio)", ("config.optimizer.embedding_lr_scale=7.0",)),
    Ablation("sc0.25-emb-lr7", "self-conditioning p = 0.25, token-embedding lr x 7",
             ("config.objective.self_cond_prob=0.25", "config.optimizer.embedding_lr_scale=7.0")),
    Ablation("b2-0.99", "Adam b2 0.99 (Plaid's; shipped 0.999)", ("config.optimizer.b2=0.99",)),
    Ablation("posterior-input", "each position's own-z posterior mean as a network input (model.posterior_input)",
             ("config.model.posterior_input=true",)),
    Ablation("sc0.25-posterior-input", "self-conditioning p = 0.25, the own-z posterior mean as an input",
             ("config.objective.self_cond_prob=0.25", "config.model.posterior_input=true")),
    Ablation("sc0.25-depth4", "self-conditioning p = 0.25, 4 blocks (2x the FLOPs)",
             ("config.objective.self_cond_prob=0.25", "config.model.n_blocks=4")),
    Ablation("mdlm0-depth4", "MDLM, 4 blocks (2x the FLOPs)", ("config.model.n_blocks=4",), method="mdlm"),
    Ablation("sc0.25-posterior-emb-lr7", "self-conditioning p = 0.25, the own-z posterior mean as an input, "
             "token-embedding lr x 7", ("config.objective.self_cond_prob=0.25", "config.model.posterior_input=true",
                                         "config.optimizer.embedding_lr_scale=7.0")),
    Ablation("zeros-bias", "head bias starts at zero (the official init; the default is the log unigram)",
             ("config.objective.output_bias_init=zeros",), corpora=("tok32", "words16")),
)

# LangFlow's bound protocol (config.eval keys); the flow-mode and reference
# numbers come from the same rows, eps and probes.
EVAL = {"solver": "heun", "steps": 64, "grid": "official", "estimator": "hutchinson_gaussian", "probes": 1,
        "batch_size": 64, "num_batches": 2, "seed": 1, "mode": "sc_chain_rule"}
QUICK_EVAL = {"steps": 2, "batch_size": 4, "num_batches": 1}


def corpus_chain(corpus: Corpus) -> markov.MarkovChain:
  """The Markov chain that writes ``corpus`` (3 successors per state)."""
  return markov.random_chain(corpus.states, 3, seed=corpus.seed)


def build_corpus(corpus: Corpus, root: pathlib.Path) -> dict:
  """Writes the corpus (once) and returns its card: data overrides and exact entropies."""
  out = root / "corpora" / corpus.name
  card_path = out / "card.json"
  if card_path.is_file():
    return json.loads(card_path.read_text())
  chain = corpus_chain(corpus)
  if corpus.kind == "tokens":
    card = markov.token_corpus(out, chain, corpus.seq_len, corpus.train_rows, corpus.heldout_rows, seed=corpus.seed)
    data = {"name": card["data"]["name"], "tokenizer": card["data"]["tokenizer"], "seq_len": corpus.seq_len}
    card["model_vocab_size"] = card["vocab_size"]
  else:
    card = markov.word_corpus(out, chain, 40, corpus.train_rows, corpus.heldout_rows, load_tokenizer("sotu-bpe8k"),
                              seed=corpus.seed)
    data = {"name": card["data"]["name"], "tokenizer": "sotu-bpe8k", "seq_len": corpus.seq_len}
    card["model_vocab_size"] = 8192
  card["overrides"] = [f"config.data.{k}={v}" for k, v in data.items()] + [
      f"config.model.vocab_size={card['model_vocab_size']}", "config.data.holdout_every=10"]
  card["H"] = card["entropy_per_token"]
  card_path.write_text(json.dumps(card, indent=1))
  return card


def variant(method: str, corpus_card: dict, extra: Sequence[str] = (), suffix: str = "") -> common.Variant:
  label, cfg = METHODS[method]
  return common.Variant(f"{method}{suffix}", label, config=cfg, overrides=(*corpus_card["overrides"], *extra))


def measure(v: common.Variant, args: argparse.Namespace, steps: int, protocol: dict,
            chain: markov.MarkovChain | None = None) -> dict:
  """Train (or reuse) the variant at ``steps`` and measure its held-out nats/token (and, for
  LangFlow on a token chain, where it loses them: :func:`gap_profile`)."""
  rung = argparse.Namespace(**{**vars(args), "steps": steps})
  workdir, config = common.ensure_trained(v, rung)
  if config.objective.name != "langflow":
    r = likelihood(workdir, protocol)
    return {**r, "seconds_per_step": common.seconds_per_step(workdir)}
  sc = common.langflow_bound(workdir, protocol)
  # the official mode's reading is a side figure: --cached-only reports it only where it was measured
  flow = common.langflow_bound(workdir, {**protocol, "mode": "flow"}, compute=not args.cached_only) or {}
  ref = sc.get("context_free_reference") or {}
  return {"nats_per_token": sc["nats_per_token_vr"], "stderr": sc["nats_per_token_vr_stderr"],
          "what": f"ODE bound, sc_chain_rule, heun {protocol['steps']} (variance-reduced)",
          "flow_mode": flow.get("nats_per_token_vr"), "official_estimate": sc["nats_per_token"],
          "context_free": ref.get("ode"), "context_free_exact": ref.get("analytic"),
          "solver_bias": ref.get("solver_bias"), "seconds_per_step": common.seconds_per_step(workdir),
          **({"gap": gap_profile(workdir, chain, protocol)} if chain is not None else {})}


GAP_LEVELS = 97  # noise levels across the bound's gamma range
# Where the schedule puts its training draws, in quantiles u of its CDF: the gap profile reports the
# share of the excess whose noise levels fall in each band beside the share of draws (the band's width).
U_BANDS = (0.0, 0.1, 0.5, 0.9, 1.0)


def gap_profile(workdir, chain: markov.MarkovChain, protocol: dict) -> dict:
  """Where a LangFlow run's ELBO falls short of the exact posterior's, per noise level.

  The reference is the chain's exact posterior (forward-backward) over the run's own EMA
  embeddings, so the excess is the network's alone: ``evaluate.denoiser_gap_curve`` at
  GAP_LEVELS gammas across the bound's range, on the bound's rows and seed. Its integral plus the
  reconstruction CE's gap is the sde ELBO's excess over the exact posterior's (nats/token);
  ``bands`` splits it by the schedule's quantiles, beside the share of training draws there.
  """
  from langflow_jax import checkpoint as ckpt_lib
  from langflow_jax import evaluate, oracles

  def compute():
    config, model = ckpt_lib.load_model(workdir, use_ema=True)
    lo, hi = (float(x) for x in model.schedule.endpoints())
    gamma_G = np.linspace(lo, hi, GAP_LEVELS)
    exact = oracles.MarkovDenoiser(chain, model.embedding_matrix(), model.schedule, offset=1)
    curve = evaluate.denoiser_gap_curve(model, exact, common.heldout(config), gamma_G,
                                        batch_size=protocol["batch_size"], num_batches=protocol["num_batches"],
                                        seed=protocol["seed"])
    u_G = np.asarray(model.schedule.cdf(gamma_G))
    pieces = 0.5 * (curve["elbo_excess"][1:] + curve["elbo_excess"][:-1]) * np.diff(gamma_G)
    u_mid = 0.5 * (u_G[1:] + u_G[:-1])
    bands = [{"u": [u0, u1], "draws": u1 - u0, "excess": float(pieces[(u_mid >= u0) & (u_mid < u1)].sum())}
             for u0, u1 in zip(U_BANDS[:-1], U_BANDS[1:])]
    return {"gamma": gamma_G.tolist(), "u": u_G.tolist(), **{k: np.asarray(x).tolist() for k, x in curve.items()},
            "reconstruction_gap": float(curve["ce"][0] - curve["ce_reference"][0]),
            "excess_integral": float(pieces.sum()), "bands": bands}

  keys = {k: protocol[k] for k in ("batch_size", "num_batches", "seed")}
  return common.cached(workdir, "gap-profile", {**keys, "levels": GAP_LEVELS}, compute)


def ablation_budgets(args: argparse.Namespace) -> dict[str, list[int]]:
  """Ablation name -> the training budgets to run it at, from ``--ablations``."""
  if args.quick and args.ablations == "all":
    return {"zeros-bias": [args.ablation_steps]}  # a smoke run exercises one ablation, not the whole list
  if args.ablations == "none":
    return {}
  specs = [a.name for a in ABLATIONS] if args.ablations == "all" else args.ablations.split(",")
  known = {a.name for a in ABLATIONS}
  budgets: dict[str, list[int]] = {}
  for spec in specs:
    name, _, steps = spec.partition("@")
    if name not in known:
      raise SystemExit(f"exp_known_entropy: unknown ablation '{name}'; the ablations are {sorted(known)}")
    budgets.setdefault(name, []).append(int(steps) if steps else args.ablation_steps)
  return budgets


def ladder_methods(args: argparse.Namespace) -> list[str]:
  """The methods whose ladder rungs this invocation trains and measures (``none``: ablations only)."""
  methods = [] if args.methods == "none" else args.methods.split(",")
  unknown = set(methods) - set(METHODS)
  if unknown:
    raise SystemExit(f"exp_known_entropy: unknown method(s) {sorted(unknown)}; use {', '.join(METHODS)} or none")
  return methods


def trained(v: common.Variant, args: argparse.Namespace, steps: int) -> bool:
  rung = argparse.Namespace(**{**vars(args), "steps": steps})
  return common.finished_step(common.run_dir(v, rung)) == steps


def parse(argv):
  def extra(p: argparse.ArgumentParser):
    p.add_argument("--corpora", default="tok32,words16", help="comma-separated corpus names")
    p.add_argument("--rungs", default=None, help="comma-separated step counts (default 300,1200,4800)")
    p.add_argument("--methods", default="langflow,mdlm,ar", help="the ladder's methods (none: ablations only)")
    p.add_argument("--ablations", default="all",
                   help="all | none | comma-separated NAME or NAME@STEPS (e.g. v0@300,v0,v0@4800)")
    p.add_argument("--ablation-steps", type=int, default=ABLATION_STEPS,
                   help=f"training steps of an ablation named without @STEPS (default {ABLATION_STEPS}); "
                        "other budgets are reported as NAME@STEPS")
    p.add_argument("--cached-only", action="store_true",
                   help="train nothing: tabulate the runs already trained to their budget (and measure them)")
    p.add_argument("--carry-all", action="store_true",
                   help="also carry over LangFlow rows of the shipped recipe measured by an earlier invocation "
                        "(only when the recipe's defaults have not changed since; starred like the others)")
    p.add_argument("--no-carry", action="store_true",
                   help="tabulate only what this invocation measures (default: rows of experiments it does not "
                        "run, baselines and previous-recipe rows, are carried over from --out's known_entropy.json)")
    p.add_argument("--max-rung-words", type=int, default=1200,
                   help="largest ladder rung trained on words16 (its 8k head is slow on a CPU)")
  args = common.parse_args(__doc__, argv, extra)
  args.runs = args.runs / "known-entropy" if not args.quick else args.runs
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse(argv)
  protocol = {**EVAL, **(QUICK_EVAL if args.quick else {})}
  rungs = QUICK_RUNGS if args.quick else tuple(int(r) for r in (args.rungs or ",".join(map(str, RUNGS))).split(","))
  corpora = [QUICK_CORPUS] if args.quick else [CORPORA[c] for c in args.corpora.split(",")]
  methods = ladder_methods(args)
  wanted = ablation_budgets(args)
  base_runs = args.runs

  results: dict[str, dict] = {}
  previous = {} if args.quick or args.no_carry else previous_results(args.out / f"{NAME}.json")
  for corpus in corpora:
    card = build_corpus(corpus, base_runs)
    chain = corpus_chain(corpus) if corpus.kind == "tokens" else None
    args.runs = base_runs / corpus.name
    res = results.setdefault(corpus.name, {"card": {k: card[k] for k in card if k not in ("words",)},
                                           "ladder": {}, "ablations": {}})
    dropped = carry_over(res, previous.get(corpus.name), everything=args.carry_all)
    if dropped:
      # deliberate (a changed recipe must not carry old rows), but easy to trip over: say so before training
      harness.log(f"[{NAME}] {corpus.name}: {len(dropped)} rows of the shipped recipe in "
                  f"{args.out / (NAME + '.json')} are not carried over and leave the tables unless measured again "
                  f"({', '.join(sorted(dropped)[:6])}{', ...' if len(dropped) > 6 else ''}); pass --carry-all if "
                  "its defaults have not changed since.")
    top = rungs if corpus.kind == "tokens" or args.quick else tuple(r for r in rungs if r <= args.max_rung_words)
    for steps in top:
      for method in methods:
        v = variant(method, card)
        if args.cached_only and not trained(v, args, steps):
          continue
        res["ladder"].setdefault(method, {})[str(steps)] = measure(
            v, args, steps, protocol, chain if method == "langflow" else None)
        write(args, results, protocol)
    for ab in ABLATIONS:
      if corpus.name not in ab.corpora and not args.quick:
        continue
      for steps in wanted.get(ab.name, ()):
        steps = rungs[-1] if args.quick else steps
        v = variant(ab.method, card, ab.overrides, suffix=f"-{ab.name}")
        if args.cached_only and not trained(v, args, steps):
          continue
        key = ab.name if steps == ABLATION_STEPS or args.quick else f"{ab.name}@{steps}"
        res["ablations"][key] = {"label": ab.label, "method": ab.method, "steps": steps,
                                 **measure(v, args, steps, protocol, chain if ab.method == "langflow" else None)}
        write(args, results, protocol)
  args.runs = base_runs
  return write(args, results, protocol)


def previous_results(path: pathlib.Path) -> dict:
  return json.loads(path.read_text()).get("results", {}) if path.is_file() else {}


CARRIED_NOTE = ("\\* measured by an earlier invocation of this script (its run directories since removed): a "
                "baseline or a change of the previous recipe, fixed by its overrides, or (``--carry-all``) a row "
                "of the shipped recipe whose defaults have not changed since; its code is unchanged, so the row "
                "stands.")


def carry_over(res: dict, old: dict | None, everything: bool = False) -> list[str]:
  """Rows an earlier invocation measured whose experiment does not depend on LangFlow's shipped
  recipe: the baselines' ladder and the absolute ablation rows (``everything``: every row, for
  when the recipe is unchanged since). Marked ``carried`` (the tables star them); a row measured
  now replaces its carried copy. Returns the rows left behind (``langflow@STEPS``, ablation keys)."""
  if not old:
    return []
  absolute = {a.name for a in ABLATIONS if a.absolute}
  dropped = []
  for method, per in old.get("ladder", {}).items():
    if method != "langflow" or everything:
      res["ladder"][method] = {s: {**r, "carried": True} for s, r in per.items()}
    else:
      dropped += [f"{method}@{s}" for s in per]
  for key, r in old.get("ablations", {}).items():
    if key.partition("@")[0] in absolute or everything:
      res["ablations"][key] = {**r, "carried": True}
    else:
      dropped.append(key)
  return dropped


ratio, cell = harness.ratio_cell, harness.carried_cell


def excess_slope(per: dict, h: float) -> tuple[int, int, float, float] | None:
  """The power law through a method's last two rungs: ``(s1, s2, excess at s2, a)`` with the excess
  over H falling as ``steps^-a`` (None with fewer than two rungs or an excess <= 0)."""
  rungs = sorted(int(s) for s in per if per[s].get("nats_per_token") is not None)
  if len(rungs) < 2:
    return None
  s1, s2 = rungs[-2:]
  e1, e2 = (per[str(s)]["nats_per_token"] - h for s in (s1, s2))
  if e1 <= 0 or e2 <= 0:
    return None
  return s1, s2, e2, math.log(e1 / e2) / math.log(s2 / s1)


def crossing_budget(langflow: tuple | None, mdlm: tuple | None) -> str:
  """Where LangFlow's extrapolated excess meets MDLM's, both continued from their last rungs."""
  if not langflow or not mdlm or langflow[1] != mdlm[1]:
    return "n/a"
  (_, s2, e_lf, a_lf), (_, _, e_md, a_md) = langflow, mdlm
  if e_lf <= e_md:
    return f"already at {s2}"
  if a_lf <= a_md:
    return "never (LangFlow's excess does not fall faster)"
  return f"{s2 * (e_lf / e_md) ** (1 / (a_lf - a_md)):,.0f} steps"


SLOPES_NOTE = ("Slopes: the excess over H (nats/token) through each method's last two rungs, as a power law "
               "excess ~ steps^-a, and the budget where LangFlow's meets MDLM's if both laws held (an "
               "extrapolation from two points, each with the stderr of its row):")
GAP_NOTE = ("Where LangFlow loses its nats: the ELBO's excess over the exact posterior (the chain's, by "
            "forward-backward over the run's own embeddings, so the excess is the network's), integrated over the "
            "bound's gamma range (plus the reconstruction CE's excess at its clean end), and the integral's share "
            "in each band of the schedule's quantiles u, whose width is the share of training draws there:")


def slopes_table(res: dict, h: float) -> dict | None:
  """``{"headers", "rows"}`` of the slopes (None without two rungs of any method)."""
  fits = {m: excess_slope(per, h) for m, per in res["ladder"].items()}
  rows = [[METHODS[m][0], f"{f[0]} -> {f[1]}", f"{f[2]:.3f}", f"{f[3]:.2f}"] for m, f in fits.items() if f]
  if not rows:
    return None
  rows.append(["LangFlow meets MDLM at", "", "", crossing_budget(fits.get("langflow"), fits.get("mdlm"))])
  return {"headers": ["model", "rungs", "excess at the last", "a"], "rows": rows}


def gap_profiles(res: dict, short: bool = False) -> dict[str, dict]:
  """Row name -> gap profile, the ladder's LangFlow rungs then the LangFlow ablations (``short``:
  ablations by their key, for a legend)."""
  ladder = sorted(res["ladder"].get("langflow", {}).items(), key=lambda kv: int(kv[0]))
  gaps = {f"LangFlow, {st} steps": r["gap"] for st, r in ladder if r.get("gap")}
  gaps.update({(key.partition("@")[0] if short else r["label"]) + f", {r['steps']} steps": r["gap"]
               for key, r in res["ablations"].items() if r.get("gap")})
  return gaps


def gap_table(gaps: dict[str, dict]) -> dict | None:
  if not gaps:
    return None
  bands = next(iter(gaps.values()))["bands"]
  rows = [[name, f"{g['excess_integral'] + g['reconstruction_gap']:.3f}", f"{g['reconstruction_gap']:.3f}",
           *(f"{b['excess'] / max(g['excess_integral'], 1e-12):.0%}" for b in g["bands"])] for name, g in gaps.items()]
  return {"headers": ["model", "ELBO excess (nats/token)", "of which reconstruction"] +
                     [f"u {b['u'][0]:g}-{b['u'][1]:g} ({b['draws']:.0%} of draws)" for b in bands], "rows": rows}


def _stderr(r: dict) -> str:
  return f"{r['stderr']:.3f}" if r.get("stderr") is not None else ""


def write(args, results: dict, protocol: dict) -> dict:
  """The tables so far (called after every run, so a stopped study leaves its partial table)."""
  from langflow_jax import plots

  paragraphs = [f"# Text of known entropy: LangFlow vs MDLM vs AR{' (QUICK SMOKE RUN)' if args.quick else ''}"]
  series = {}
  for name, res in results.items():
    h = res["card"]["H"]
    rungs = sorted({int(s) for m in res["ladder"].values() for s in m})
    rows = []
    for method, per in res["ladder"].items():
      rows.append([METHODS[method][0]] + [cell(per.get(str(s)), "nats_per_token", h) for s in rungs])
      series[f"{name}: {METHODS[method][0]}"] = (
          [s for s in rungs if str(s) in per], [per[str(s)]["nats_per_token"] / h for s in rungs if str(s) in per])
    lf = res["ladder"].get("langflow", {})
    if lf:
      rows.append(["LangFlow, official flow mode"] + [ratio(lf.get(str(s), {}).get("flow_mode"), h) for s in rungs])
      rows.append(["context-free reference (exact)"] +
                  [ratio(lf.get(str(s), {}).get("context_free_exact"), h) for s in rungs])
    c = res["card"]
    paragraphs += [
        f"## {name}: {c['kind']}, {c['states']} states; H = {h:.4f} nats/token "
        f"(entropy rate {c.get('entropy_rate', c.get('entropy_rate_per_word')):.4f} per "
        f"{'token' if c['kind'] == 'token ids' else 'word'})",
        "Held-out nats/token (x H) at each training budget (steps of 32 x 64 tokens):",
        harness.markdown_table(["model"] + [f"{s} steps" for s in rungs], rows)]
    res["tables"] = {"slopes": slopes_table(res, h), "gap": gap_table(gap_profiles(res))}
    if res["tables"]["slopes"]:
      paragraphs += [SLOPES_NOTE, harness.markdown_table(**res["tables"]["slopes"])]
    if res["tables"]["gap"]:
      paragraphs += [GAP_NOTE, harness.markdown_table(**res["tables"]["gap"]), f"![gap profile]({NAME}_gap.png)"]
      plots.gap_profile_plot(args.out / f"{NAME}_gap.png", {f"{name}: {k}": g for k, g in gap_profiles(res, short=True).items()})
    if res["ablations"]:
      arows = []
      for ab_steps in sorted({r["steps"] for r in res["ablations"].values()}):
        # each group opens with the shipped recipe of every method at the same budget
        for method, per in res["ladder"].items():
          base = per.get(str(ab_steps))
          if base:
            arows.append([f"{METHODS[method][0]} as shipped", ab_steps, cell(base, "nats_per_token", h),
                          cell(base, "flow_mode", h), _stderr(base)])
        for r in res["ablations"].values():
          if r["steps"] == ab_steps:
            arows.append([r["label"], r["steps"], cell(r, "nats_per_token", h), cell(r, "flow_mode", h),
                          _stderr(r)])
      paragraphs += ["Ablations (one change each; every row kept, whether it helped or not):",
                     harness.markdown_table(["variant", "steps", "held-out nats/token (x H)", "flow mode (x H)",
                                            "stderr"], arows)]
  paragraphs.append(
      f"Protocol: the first {protocol['num_batches']} x {protocol['batch_size']} held-out rows. LangFlow: "
      f"{protocol['mode']} ODE bound, {protocol['solver']} {protocol['steps']}, one Gaussian probe, EMA weights, "
      f"seed {protocol['seed']}, variance-reduced estimate; 'flow mode' is the official evaluator's default on "
      "the same draws (its divergence skips the self-conditioning pre-pass, so it is not a bound of the field "
      "it integrates). MDLM: NELBO, every mask size once per row. AR: exact NLL.")
  if any(r.get("carried") for res in results.values() for per in [*res["ladder"].values(), res["ablations"]]
         for r in per.values()):
    paragraphs.append(CARRIED_NOTE)
  figure = args.out / f"{NAME}.png"
  if series:
    plots.loglog_lines(figure, series, xlabel="training steps (32 x 64 tokens each)",
                       ylabel="held-out nats/token / H", reference=1.0)
  return common.write_results(args, NAME, paragraphs, str(figure),
                              {"results": results, "protocol": protocol, "carried_note": CARRIED_NOTE,
                               "notes": {"slopes": SLOPES_NOTE, "gap": GAP_NOTE}})


if __name__ == "__main__":
  main()
