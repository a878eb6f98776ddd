"""Noise schedule: the learned Gumbel schedule against fixed linear and cosine log-SNR schedules.

  python experiments/exp_schedule.py [--quick] [--out DIR] [--runs DIR] [--steps N]

Claim (paper, method §4.4 and §7.4): the denoising loss rises with the noise
level gamma along a right-skewed curve whose derivative a Gumbel density fits;
drawing the training noise levels from that learned, information-uniform
density trains a better model than a fixed schedule in the same steps.

Config: ``configs/tiny.py`` three times, changing only ``schedule.name``:
``gumbel`` (learned; loc, scale, H_inf start at 3.0, 0.9, 7.0), ``linear``
(uniform in gamma) and ``cosine`` (alpha = cos(pi t / 2)); the fixed two on
the Gumbel's initial endpoints [0.80, 13.36]. Each trains 800 steps of
32 x 64 tokens with self-conditioning, same seed and data order.

Measured, the same for every model:

* the likelihood bound on held-out text (``common.EVAL``: sc_chain_rule, Heun
  128 steps on the schedule's own quantile grid, 32 held-out sequences, the
  self-conditioning pre-pass, EMA weights, seed 1), and again on a grid
  uniform in gamma, so that what training did is told apart from how well the
  ODE grid suits the model;
* the held-out denoising cross-entropy at 32 fixed gammas spanning every
  model's range (``evaluate.denoising_curve``: zero self-conditioning input as
  in most training draws, 128 sequences, one eps per sequence shared by all
  levels), and the total-variation distance between each schedule's density
  and the measured information rate dCE/dgamma (scaled to unit area): the
  information-uniform principle says they should agree.

Writes ``schedule.md`` and ``schedule_loss.png`` (left: held-out CE per gamma
of the three models, the Gumbel run's fitted H_inf x CDF and its last training
batch; right: schedule densities against the measured rates).

Compute (measured on an idle 2-core CPU): 3 trainings of about 8 min each
(0.6 s/step), 6 bounds of about 2 min each and 3 curves (seconds): about
35 min, less when ``exp_selfcond`` or ``exp_baselines`` already trained the
Gumbel run. ``--quick`` runs the same code on a one-block model in seconds
(plus compilation) for the tests.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

import common
import harness
from langflow_jax import evaluate, plots, train

NAME = "schedule"
VARIANTS = (
    common.Variant("langflow", "learned Gumbel"),
    common.Variant("langflow-linear", "linear", overrides=("config.schedule.name=linear",)),
    common.Variant("langflow-cosine", "cosine", overrides=("config.schedule.name=cosine",)),
)
CURVE_POINTS, QUICK_CURVE_POINTS = 32, 6


def total_variation(gamma_G: np.ndarray, p_G: np.ndarray, q_G: np.ndarray) -> float:
  """0.5 * integral |p - q| dgamma by the trapezoid rule."""
  d = np.abs(np.asarray(p_G, np.float64) - np.asarray(q_G, np.float64))
  return float(0.5 * np.sum(0.5 * (d[1:] + d[:-1]) * np.diff(gamma_G)))


def main(argv: Sequence[str] | None = None) -> dict:
  args = common.parse_args(__doc__, argv)
  protocol = common.eval_protocol(args)
  uniform = common.eval_protocol(args, grid="gamma")
  runs = {}
  for v in VARIANTS:
    workdir, config = common.ensure_trained(v, args)
    _, model = train.load_model(workdir)
    runs[v.name] = (v, workdir, config, model)

  # One gamma grid for all curves: the union of the final schedules' ranges.
  ends = np.array([[float(g) for g in model.schedule.endpoints()] for _, _, _, model in runs.values()])
  points = QUICK_CURVE_POINTS if args.quick else CURVE_POINTS
  gamma_G = np.linspace(ends[:, 0].min(), ends[:, 1].max(), points).astype(np.float32)
  curve_protocol = {"gamma": gamma_G.tolist(), "batch_size": protocol["batch_size"],
                    "num_batches": protocol["num_batches"], "seed": protocol["seed"], "self_cond": False}

  rows, curves, schedules, train_points, results = [], {}, {}, {}, {}
  for name, (v, workdir, config, model) in runs.items():
    own = common.langflow_bound(workdir, protocol)
    flat = common.langflow_bound(workdir, uniform)
    split = common.heldout(config)
    ce_G = np.asarray(common.cached(
        workdir, f"denoising-curve-{points}", curve_protocol,
        lambda: evaluate.denoising_curve(model, split, gamma_G, batch_size=curve_protocol["batch_size"],
                                         num_batches=curve_protocol["num_batches"], seed=curve_protocol["seed"])
        .tolist()))
    density_G = np.exp(np.asarray(model.schedule.log_density(gamma_G), np.float64))
    tv = total_variation(gamma_G, density_G, plots.information_rate(gamma_G, ce_G))
    curves[v.label], schedules[v.label] = ce_G, model.schedule
    samples = workdir / "last_gamma_ce.npz"
    if samples.is_file() and model.schedule.learnable:
      with np.load(samples) as f:
        train_points[v.label] = (f["gamma"], f["ce"])
    s = model.schedule.summary()
    lo, hi = s["gamma_min"], s["gamma_max"]
    learned = (f"loc {s['gumbel_loc']:.2f}, scale {s['gumbel_scale']:.2f}, H_inf {s['gumbel_entropy']:.2f}; "
               if "gumbel_loc" in s else "")
    t = own["terms_nats_per_token"]
    rows.append([v.label, f"{learned}gamma {lo:.2f} .. {hi:.2f}",
                 f"{harness.fmt(own['nats_per_token'])} ± {harness.fmt(own['nats_per_token_stderr'])}",
                 harness.fmt(own["perplexity"], 1), harness.fmt(flat["nats_per_token"]),
                 f"{harness.fmt(t['reconst'])} / {harness.fmt(t['flow'])} / {harness.fmt(t['prior'])}",
                 harness.fmt(tv, 2)])
    results[name] = {"own_grid": own["nats_per_token"], "gamma_grid": flat["nats_per_token"], "tv": tv,
                     "curve": ce_G.tolist()}

  figure = plots.denoising_curve_plot(
      args.out / "schedule_loss.png", gamma_G, curves, schedules, train_points,
      title=f"held-out denoising CE per noise level after {args.steps} steps (tiny config)")
  config = runs["langflow"][2]
  card = own["card"]
  return common.write_results(args, NAME, [
      f"# Noise schedule: learned Gumbel vs fixed linear and cosine ({args.steps} steps each)",
      f"Budget: {common.budget_note(args, config)}. Same seed and data order for all three.",
      harness.markdown_table(
          ["schedule", "schedule after training", "bound, own grid (nats/token ± s.e.)", "PPL ≤",
           "bound, uniform-gamma grid", "reconst / flow / prior", "TV(density, dCE/dgamma)"], rows),
      f"Bound protocol (both columns): {card['solver']}, {protocol['steps']} steps; {card['sequences']} held-out "
      f"sequences ({card['tokens']} tokens, {card['packing']}); {card['estimator']}; self-conditioning "
      f"{card['self_cond']}; {card['weights']} weights; seed {protocol['seed']} (the same eps and probes for "
      "every model, so differences between rows are more precise than the standard errors). 'own grid': "
      "steps uniform in the model's schedule CDF (the official protocol); 'uniform-gamma grid': steps uniform in "
      "gamma between the model's endpoints.",
      f"Denoising curve: held-out CE at {points} gammas from {gamma_G[0]:.2f} to {gamma_G[-1]:.2f} "
      f"({curve_protocol['num_batches']} x {curve_protocol['batch_size']} sequences, zero self-conditioning "
      "input). TV: total-variation distance (0 = identical, 1 = disjoint) between the schedule's density and "
      "the model's measured dCE/dgamma scaled to unit area; the information-uniform principle asks for 0.",
  ], figure, {"results": results, "protocol": protocol})


if __name__ == "__main__":
  main()
