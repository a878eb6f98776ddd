"""Run outputs: metrics as JSON lines and TensorBoard events, timers, progress.

``metrics.jsonl`` in the workdir has one object per logged step (``step``
plus scalars); the same scalars go to TensorBoard event files under
``tensorboard/``. Only process 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import sys
import time
from collections import defaultdict
from typing import Iterator

import jax

from langflow_jax.files import write_atomic


class MetricWriter:
  """Appends scalars to ``metrics.jsonl`` and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter

          self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))
        except ImportError:  # TensorBoard events are optional
          self._tb = None

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else str(v))
             for k, v in scalars.items()}
    with self.path.open("a") as f:
      f.write(json.dumps({"step": int(step), **clean}) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, float):
          self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def drop_rows_after(workdir: str | pathlib.Path, step: int) -> None:
  """Removes ``metrics.jsonl`` rows past ``step``: a resumed run recomputes the
  steps a killed run had logged after its last checkpoint (process 0 only)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if jax.process_index() != 0 or not path.is_file():
    return
  lines = path.read_text().splitlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] > step:
        continue
    except (ValueError, KeyError, TypeError):
      continue  # a line cut short by a kill
    keep.append(line)
  if len(keep) != len(lines):
    write_atomic(path, "".join(line + "\n" for line in keep))


class PhaseTimer:
  """Wall time per named phase (data, step, eval, checkpoint) since the last reset."""

  def __init__(self):
    self.totals: dict[str, float] = defaultdict(float)

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self.totals[name] += time.perf_counter() - start

  def pop(self) -> dict[str, float]:
    out = {f"time/{k}": v for k, v in self.totals.items()}
    self.totals.clear()
    return out


class Progress:
  """A progress bar with tokens/s and ETA on stderr (a no-op when disabled)."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self.bar = None
    if enabled and jax.process_index() == 0:
      from tqdm import tqdm

      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                      smoothing=0.1)

  def update(self, n: int, **postfix) -> None:
    if self.bar is not None:
      self.bar.update(n)
      if postfix:
        self.bar.set_postfix(postfix, refresh=False)

  def write(self, text: str) -> None:
    if self.bar is not None:
      self.bar.write(text)
    elif jax.process_index() == 0:
      print(text, file=sys.stderr)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
