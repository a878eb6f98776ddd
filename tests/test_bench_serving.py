"""The serving benchmark (experiments/bench_serving.py): end to end on tiny sizes, no timing asserted."""

import json

import pytest

from tests.conftest import experiment_fixture


bench = experiment_fixture("bench_serving")


def test_line_fit_and_break_even_steps(bench):
  a, b = bench.fit_line({2: 0.5 + 2 * 0.25, 4: 0.5 + 4 * 0.25, 8: 0.5 + 8 * 0.25})
  assert a == pytest.approx(0.5) and b == pytest.approx(0.25)
  # AR takes 1.5 s: LangFlow's 0.5 + 0.25 N equals it at N = 4 and is faster below
  assert bench.crossover_steps(1.5, (a, b)) == pytest.approx(4.0)
  # timing noise that makes the slope non-positive falls back to a proportional fit
  assert bench.fit_line({2: 1.0, 4: 0.9}) == (0.0, pytest.approx(0.5))


def test_quick_run_writes_table_json_and_plots(bench, tmp_path):
  out = tmp_path / "results"
  report = bench.main(["--quick", "--out", str(out), "--workdir", str(tmp_path / "runs")])
  assert report == out / "serving.md"
  text = report.read_text()
  for needle in ("## Finding", "**Length 32.**", "## Device and config", "| 32 | AR (KV cache) | 32 |",
                 "| 32 | LangFlow | 4 |", "## Break-even steps", "## Quality", "| 32 | held-out text |",
                 "LangFlow bound", "## Best-of-n", "serving_latency.png", "serving_pareto.png", "load average"):
    assert needle in text, needle
  for name in ("serving_latency.png", "serving_pareto.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  data = json.loads((out / "serving.json").read_text())
  (result,) = data["results"]
  # every (method, batch, steps) point of the grid has a time, a throughput and, once measured, a compile time
  rows = result["rows"]
  assert sorted((r["method"], r["batch"], r["steps"] or 0) for r in rows) == sorted(
      [("ar", b, 0) for b in (1, 2)] + [("langflow", b, s) for b in (1, 2) for s in (2, 4)])
  assert all(r["seconds"] > 0 and r["tokens_per_s"] > 0 and r["compile_s"] is not None for r in rows)
  assert {(q["method"], q["steps"]) for q in result["quality"]["samples"]} == {("ar", None), ("langflow", 2),
                                                                               ("langflow", 4)}
  assert result["models"]["ar"]["params"]["total"] < result["models"]["langflow"]["params"]["total"]
  assert set(result["crossover_steps"]) == {"1", "2"}
  assert not (tmp_path / "runs").exists()  # fresh weights: nothing trained, nothing written there
