"""Figures written into a run directory (PNG, matplotlib's Agg backend)."""

from __future__ import annotations

import pathlib

import numpy as np

from langflow_jax import reporting


def _pyplot():
  """pyplot; the Agg backend unless pyplot is already in use (a notebook's inline
  backend is kept: figures the functions here close are not shown twice)."""
  import sys

  import matplotlib

  if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig, path: str | pathlib.Path) -> str:
  """Lays out, writes (creating the folder) and closes a figure; returns its path."""
  plt = _pyplot()
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return str(path)


def training_plots(workdir: str | pathlib.Path, schedule=None) -> list[str]:
  """``plots/loss.png`` (train and held-out CE) and ``plots/schedule.png``."""
  plt = _pyplot()
  workdir = pathlib.Path(workdir)
  out_dir = workdir / "plots"
  out_dir.mkdir(parents=True, exist_ok=True)
  rows = reporting.read_metrics(workdir)
  written = []

  train = [(r["step"], r["train/ce"]) for r in rows if isinstance(r.get("train/ce"), float)]
  held = [(r["step"], r["eval/ce"]) for r in rows if isinstance(r.get("eval/ce"), float)]
  if train:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train CE (noisy embeddings)")
    if held:
      ax.plot(*zip(*held), "o-", label="held-out CE (EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(save_figure(fig, out_dir / "loss.png"))

  samples = workdir / "last_gamma_ce.npz"
  if schedule is not None:
    lo, hi = (float(x) for x in schedule.endpoints())
    grid = np.linspace(lo - 1.0, hi + 1.0, 400, dtype=np.float32)
    fig, ax1 = plt.subplots(figsize=(6, 4))
    density = np.exp(np.asarray(schedule.log_density(grid)))
    ax1.plot(grid, density, color="C0", label="schedule density")
    ax1.axvline(lo, color="k", ls=":", lw=1)
    ax1.axvline(hi, color="k", ls=":", lw=1)
    ax1.set_xlabel("gamma = log(sigma^2 / alpha^2)")
    ax1.set_ylabel("density", color="C0")
    ax2 = ax1.twinx()
    curve = schedule.entropy_curve(grid)
    if curve is not None:
      ax2.plot(grid, np.asarray(curve), color="C1", label="fitted H(gamma)")
    if samples.is_file():
      with np.load(samples) as f:
        ax2.scatter(f["gamma"], f["ce"], s=6, color="C2", alpha=0.6, label="CE of last batch")
    ax2.set_ylabel("nats / token", color="C1")
    fig.legend(loc="upper left", fontsize=8)
    written.append(save_figure(fig, out_dir / "schedule.png"))
  return written


def information_rate(gamma_G: np.ndarray, ce_G: np.ndarray) -> np.ndarray:
  """dCE/dgamma of a measured curve, clipped at 0 and scaled to unit area: the
  density the information-uniform principle asks the schedule to match (method §4.4)."""
  gamma_G, ce_G = np.asarray(gamma_G, np.float64), np.asarray(ce_G, np.float64)
  rate = np.clip(np.gradient(ce_G, gamma_G), 0.0, None)
  area = float(np.sum(0.5 * (rate[1:] + rate[:-1]) * np.diff(gamma_G)))
  return rate / area if area > 0 else rate


def denoising_curve_plot(path: str | pathlib.Path, gamma_G: np.ndarray, curves: dict[str, np.ndarray],
                         schedules: dict[str, object], train_points: dict[str, tuple] | None = None,
                         title: str = "") -> str:
  """Per-gamma loss against the schedules that were fitted to it (two panels).

  Left: the held-out CE at each gamma of every model (``curves``), the fitted
  entropy curve H(gamma) = H_inf * CDF of each learnable schedule, and the
  (gamma, CE) training draws of a run (``train_points``: name -> (gamma, ce)).
  Right: each schedule's density over gamma (solid) and each model's measured
  information rate dCE/dgamma scaled to unit area (dashed).
  """
  plt = _pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
  grid = np.linspace(float(np.min(gamma_G)), float(np.max(gamma_G)), 400, dtype=np.float32)
  for i, (name, ce_G) in enumerate(curves.items()):
    color = f"C{i}"
    ax1.plot(gamma_G, ce_G, "o-", ms=3, color=color, label=f"{name}: held-out CE")
    if train_points and name in train_points:
      g, c = train_points[name]
      ax1.scatter(g, c, s=6, alpha=0.4, color=color, label=f"{name}: last training batch")
    schedule = schedules.get(name)
    if schedule is not None:
      curve = schedule.entropy_curve(grid)
      if curve is not None:
        ax1.plot(grid, np.asarray(curve), "--", color="k", lw=1.2, label=f"{name}: fitted H_inf * CDF")
      ax2.plot(grid, np.exp(np.asarray(schedule.log_density(grid))), color=color, label=f"{name} schedule density")
    ax2.plot(gamma_G, information_rate(gamma_G, ce_G), "--", color=color, alpha=0.8,
             label=f"{name}: dCE/dgamma (unit area)")
  ax1.set_xlabel("gamma = log(sigma^2 / alpha^2)")
  ax1.set_ylabel("cross-entropy (nats / token)")
  ax1.set_title("denoising loss per noise level", fontsize=10)
  ax1.grid(alpha=0.3)
  ax1.legend(fontsize=7)
  ax2.set_xlabel("gamma")
  ax2.set_ylabel("density")
  ax2.set_title("schedule densities vs measured information rate", fontsize=10)
  ax2.grid(alpha=0.3)
  ax2.legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  return save_figure(fig, path)


def bar_panels(path: str | pathlib.Path, labels: list[str], panels: dict[str, list[float | None]],
               references: dict[str, float] | None = None, log_panels: tuple[str, ...] = ()) -> str:
  """One bar panel per metric (title -> one value per label, None for none);
  ``references`` adds a dashed line (e.g. held-out text) to the panel of that title."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
  for ax, (title, values) in zip(axes[0], panels.items()):
    ax.bar(range(len(labels)), [np.nan if v is None else v for v in values],
           color=[f"C{i}" for i in range(len(labels))])
    ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
    if references and title in references:
      ax.axhline(references[title], ls="--", color="k", lw=1, label="held-out text")
      ax.legend(fontsize=7)
    if title in log_panels:
      ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
  return save_figure(fig, path)


def loglog_lines(path: str | pathlib.Path, series: dict[str, tuple[list[float], list[float]]], *, xlabel: str,
                 ylabel: str, reference: float | None = None) -> str:
  """One line per series on log-log axes (e.g. bound / entropy against training steps)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for label, (x, y) in series.items():
    if x:
      ax.plot(x, y, "o-", label=label)
  if reference is not None:
    ax.axhline(reference, color="k", lw=0.8, ls="--", label="exact entropy")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  return save_figure(fig, path)


def gap_profile_plot(path: str | pathlib.Path, profiles: dict[str, dict]) -> str:
  """Where models lose their likelihood: each profile's ELBO excess over the exact posterior per
  unit gamma (left; ``evaluate.denoiser_gap_curve``) and, against the same gammas, its CE and the
  exact posterior's (right). A profile holds lists ``gamma``, ``elbo_excess``, ``ce``, ``ce_reference``."""
  plt = _pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
  for i, (name, prof) in enumerate(profiles.items()):
    color = f"C{i}"
    ax1.plot(prof["gamma"], prof["elbo_excess"], "-", color=color, label=name)
    ax2.plot(prof["gamma"], prof["ce"], "-", color=color, label=f"{name}: model")
    if i == len(profiles) - 1:
      ax2.plot(prof["gamma"], prof["ce_reference"], "--", color="k", label="exact posterior")
  ax1.set_xlabel("gamma = log(sigma^2 / alpha^2)")
  ax1.set_ylabel("ELBO excess (nats / token / unit gamma)")
  ax1.set_title("what the network adds to the ELBO over the exact posterior", fontsize=10)
  ax2.set_xlabel("gamma")
  ax2.set_ylabel("cross-entropy (nats / token)")
  ax2.set_title("held-out CE per noise level", fontsize=10)
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return save_figure(fig, path)


def bound_plot(path: str | pathlib.Path, sweep: list[dict[str, float]] | None,
               integrand: dict[str, list[float]] | None, *, title: str) -> str:
  """``eval --plot``: the bound and its terms against the step count (left; the rows of
  ``likelihood.steps_sweep``) and the flow integrand against gamma (right)."""
  plt = _pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  if sweep:
    steps = [r["steps"] for r in sweep]
    for key, label in (("total", "bound"), ("reconst", "reconstruction"), ("flow", "flow"), ("prior", "prior")):
      ax1.plot(steps, [r[key] for r in sweep], "o-", label=label)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel(f"steps ({sweep[0]['solver']})")
    ax1.set_ylabel("nats / token")
    ax1.set_title("bound and terms vs steps", fontsize=10)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
  if integrand:
    gamma = np.asarray(integrand["gamma"])
    values = np.asarray(integrand["flow_nats_per_token_per_gamma"])
    order = np.argsort(gamma, kind="stable")
    ax2.plot(gamma[order], values[order], ".-", ms=3)
    ax2.set_xlabel("gamma = log(sigma^2 / alpha^2)")
    ax2.set_ylabel("d flow / d gamma  (nats / token)")
    ax2.set_title("flow integrand (alpha/2) div x_hat", fontsize=10)
    ax2.grid(alpha=0.3)
  fig.suptitle(title, fontsize=10)
  return save_figure(fig, path)
