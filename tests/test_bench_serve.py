"""The server benchmark (experiments/bench_serve.py): its statistics, and a quick run end to end
(real servers on 127.0.0.1, real clients; no timing asserted)."""

import json

import pytest

from langflow_jax import engine
from tests.conftest import experiment_fixture

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

bench = experiment_fixture("bench_serve")


def test_percentiles_and_the_crossover(bench):
  assert bench.percentile([3.0, 1.0, 2.0], 50) == 2.0
  assert bench.percentile([0.0, 10.0], 95) == pytest.approx(9.5)
  assert bench.percentile([], 50) is None
  lf = [{"concurrency": c, "p50_s": s} for c, s in ((1, 1.0), (4, 1.2), (16, 2.0))]
  ar = [{"concurrency": c, "p50_s": s} for c, s in ((1, 1.5), (4, 1.2), (16, 1.0))]
  assert bench.crossover_concurrency(lf, ar) == 4  # AR's p50 is at most LangFlow's from 4 clients on
  assert bench.crossover_concurrency(lf, [dict(r, p50_s=9.0) for r in ar]) is None
  s = bench.summarize([{"ok": True, "start": 0.0, "first": 0.5, "end": 1.0, "tokens": 8},
                       {"ok": False, "start": 0.0, "first": None, "end": 3.0, "tokens": 0}], window_s=2.0)
  assert s["ok"] == 1 and s["errors"] == 1 and s["p50_s"] == 1.0 and s["ttfe_p50_s"] == 0.5
  assert s["requests_per_s"] == 0.5 and s["tokens_per_s"] == 4.0


def test_quick_run_writes_table_json_and_plot(bench, tmp_path):
  out = tmp_path / "results"
  report = bench.main(["--quick", "--out", str(out), "--workdir", str(tmp_path / "runs"), "--steps", "2"])
  assert report == out / "serve.md"
  text = report.read_text()
  for needle in ("## Finding", "LangFlow at 2 steps", "Mixed step counts (mix 2,4) at concurrency 2",
                 "## Latency and throughput", "| langflow (static) | mix 2,4 | 2 |", "| ar (stationary) | - | 1 |",
                 "## Quality of what was served", "serve.png", "Machine:", "QUICK SMOKE RUN",
                 "## The engine without HTTP (concurrency 1)"):
    assert needle in text, needle
  assert (out / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  data = json.loads((out / "serve.json").read_text())
  points = sorted((r["method"], r["scheduler"], str(r["steps"]), r["concurrency"]) for r in data["rows"])
  assert points == sorted([("langflow", "stationary", "2", 1), ("langflow", "stationary", "2", 2),
                           ("langflow", "stationary", "[2, 4]", 2), ("langflow", "static", "[2, 4]", 2),
                           ("ar", "stationary", "None", 1), ("ar", "stationary", "None", 2)])
  assert all(r["errors"] == 0 and r["ok"] == r["requests"] > 0 for r in data["rows"])
  assert set(data["crossover"]) == {"2"} and set(data["library_s"]) == {"2"}
  # one pass a call and fused: 2 passes with an event every pass cannot fuse, so both take 2 calls
  engine_rows = {(r["fuse_passes"], r["steps"]): r for r in data["engine_in_process"]}
  assert set(engine_rows) == {(1, 2), (engine.FUSE_PASSES, 2)}
  assert all(r["calls_per_request"] == 2 and 0 < r["first_event_p50_s"] <= r["p50_s"] for r in engine_rows.values())
