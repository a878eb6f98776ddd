"""experiments/bench_likelihood.py: a quick run (no timing asserted)."""

import math
import re

from tests.conftest import experiment_fixture

bench = experiment_fixture("bench_likelihood")


def test_quick_run_prices_both_modes_and_converges_to_log_v(bench, capsys):
  bench.main(["--quick", "--config", "tiny", "--table-steps", "4,16"])  # two rows a solver: cheap
  out = capsys.readouterr().out
  costs = dict(re.findall(r"^(ODE evaluation, [^\n]*?)\s+[\d.]+\s+([\d.]+)$", out, re.M))
  assert {"ODE evaluation, JVP, 1 probe, self-cond, sc_chain_rule mode",
          "ODE evaluation, JVP, 1 probe, self-cond, flow mode"} <= set(costs)
  assert all(float(x) > 0 for x in costs.values())
  # fresh weights with the zero head: the exact posterior of uniform tokens, whose bound is log V
  log_v = float(re.search(r"log V = ([\d.]+)", out).group(1))
  heun = [float(b) for b in re.findall(r"^heun\s+\d+\s+\d+\s+([\d.]+)", out, re.M)]
  assert len(heun) == 2 and abs(heun[-1] - log_v) < abs(heun[0] - log_v) + 0.05
  assert math.isfinite(log_v)
