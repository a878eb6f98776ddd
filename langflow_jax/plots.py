"""Figures written into a run directory (PNG, matplotlib's Agg backend)."""

from __future__ import annotations

import pathlib

import numpy as np

from langflow_jax import reporting


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


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
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=120)
    plt.close(fig)
    written.append(str(out_dir / "loss.png"))

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
    fig.tight_layout()
    fig.savefig(out_dir / "schedule.png", dpi=120)
    plt.close(fig)
    written.append(str(out_dir / "schedule.png"))
  return written
