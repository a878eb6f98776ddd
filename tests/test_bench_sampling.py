"""experiments/bench_sampling.py: a quick step-cost run (no timing asserted)."""

import re

import pytest

from tests.conftest import experiment_fixture


bench = experiment_fixture("bench_sampling")


def test_quick_step_cost_prints_both_ratios_and_the_flop_floor(bench, capsys, monkeypatch):
  timed, repeats = bench.harness.timed, []
  monkeypatch.setattr(bench.harness, "timed", lambda fn, n: (repeats.append(n), timed(fn, n))[1])
  bench.main(["--quick", "--skip-quality", "--skip-latency", "--samplers", "euler", "--repeats", "2"])
  out = capsys.readouterr().out
  assert repeats == [2] * 4  # forward, denoiser, and the two step counts of the euler row
  # bench config, quick sizes: V = 8192 and D = 512 against the forward's matmuls
  floor = float(re.search(r"over those of a forward: ([\d.]+)", out).group(1))
  assert floor == pytest.approx(1.149, abs=2e-3)
  row = re.search(r"\| euler \(float64 update, official\) \| 1 \| ([\d.]+) \| ([\d.]+)x \| ([\d.]+)x \|", out)
  assert row is not None and float(row.group(1)) > 0
  assert "Latency" not in out
