"""experiments/bench_likelihood.py: a quick run (no timing asserted)."""

import math
import re

from tests.conftest import experiment_fixture

bench = experiment_fixture("bench_likelihood")


def test_quick_run_prices_both_modes_and_converges_to_log_v(bench, capsys):
  bench.main(["--quick", "--config", "tiny", "--table-steps", "4,16"])  # two rows a solver: cheap
  out = capsys.readouterr().out
  rows = re.findall(r"^(ODE evaluation, [^\n]*?)\s+[\d.]+\s+([\d.]+)\s+[\d.]+\s+([\d.]+)$", out, re.M)
  costs = {name: float(t) for name, t, _ in rows}
  flops = {name: float(f) for name, _, f in rows}
  sc = "ODE evaluation, JVP, 1 probe, self-cond, sc_chain_rule mode"
  flow = "ODE evaluation, JVP, 1 probe, self-cond, flow mode"
  assert {sc, flow} <= set(costs)
  assert all(x > 0 for x in costs.values())
  # the work floor the table states: a JVP is at least two passes, so >= 4 / 3 / 2 forwards
  assert flops[sc] >= 3.9 and flops[flow] >= 2.9 and flops["ODE evaluation, JVP, 1 probe, no self-cond"] >= 1.9
  # fresh weights with the zero head: the exact posterior of uniform tokens, whose bound is log V
  log_v = float(re.search(r"log V = ([\d.]+)", out).group(1))
  heun = [float(b) for b in re.findall(r"^heun\s+\d+\s+\d+\s+([\d.]+)", out, re.M)]
  assert len(heun) == 2 and abs(heun[-1] - log_v) < abs(heun[0] - log_v) + 0.05
  assert math.isfinite(log_v)
