"""experiments/bench_train.py: its FLOP count and a quick run (no timing asserted)."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from langflow_jax import config as config_lib
from langflow_jax.model import create_model
from tests.conftest import experiment_fixture


bench = experiment_fixture("bench_train")


def test_analytic_flops_match_xla_count_of_forward_and_gradient(bench):
  # Wide enough that matmuls dominate, small enough to compile fast.
  config = config_lib.load_config("tiny", ["--config.model.hidden_size=256", "--config.model.n_heads=4",
                                           "--config.model.vocab_size=2048"])
  train_flops, sc_flops = bench.model_flops_per_token(config)
  model = create_model(config)
  graphdef, state = nnx.split(model)
  b, L, d = 4, config.data.seq_len, config.model.hidden_size
  z = jnp.zeros((b, L, d))
  gamma = jnp.full((b,), 2.0)

  def loss(st, z, s):  # squared: a sum's cotangent is constant and XLA turns its matmuls into reductions
    return jnp.sum(jnp.square(nnx.merge(graphdef, st)(z, gamma, s)))

  def flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])

  forward = flops(loss, state, z, z)
  gradient = flops(jax.grad(loss, argnums=(0, 1)), state, z, z)
  tokens = b * L
  # XLA also counts the elementwise work, a few percent here: the analytic
  # count is the matmuls alone, so it sits just below XLA's.
  assert 0.85 * forward <= train_flops / 3 * tokens <= forward
  assert 0.85 * gradient <= train_flops * tokens <= 1.05 * gradient
  # the pre-pass: one forward plus the [V, D] product of x_hat
  assert sc_flops == pytest.approx(train_flops / 3 + 2 * d * config.model.vocab_size)


def test_quick_run_prints_throughput_against_both_peaks_and_the_bf16_ratio(bench, capsys):
  assert bench.main(["--config", "tiny", "--quick", "--dtype", "both"]) == 0
  out = capsys.readouterr().out
  fractions = [float(f) for f in re.findall(r"fraction of it: ([\d.]+)%", out)]
  assert len(fractions) == 4 and all(f > 0 for f in fractions)  # two steps against two peaks
  assert re.findall(r"dtype=(\w+)", out) == ["float32", "bfloat16"]
  assert re.search(r"pre-pass in (\d+)% of steps", out) is not None
  assert re.search(r"tokens/s:\s+[\d,]+", out)
  ratio = re.search(r"bf16 / float32:\s+step ([\d.]+)x the time \(([\d.]+)x the speed\)", out)
  assert ratio and float(ratio.group(1)) == pytest.approx(1 / float(ratio.group(2)), rel=0.02)


def test_breakdown_times_each_part_of_the_step_with_and_without_the_pre_pass(bench, capsys):
  assert bench.main(["--config", "tiny", "--quick", "--breakdown"]) == 0
  out = capsys.readouterr().out
  assert re.findall(r"p_sc = (\d)\b", out.splitlines()[1]) == ["0", "1"]
  parts = ("network forward (logits)", "objective value", "objective value and gradient",
           "train step (+ AdamW, EMA, metrics)")
  for part in parts:
    line = next(x for x in out.splitlines() if x.startswith(part + " "))
    cells = re.findall(r"([\d.]+) +([\d.]+)x +([\d.]+) +([\d.]+)%", line)
    assert len(cells) == 2, line  # one per self-conditioning probability
    assert all(float(ms) > 0 and float(gflop) > 0 for ms, _, gflop, _ in cells)
  forward = next(x for x in out.splitlines() if x.startswith(parts[0] + " "))
  assert re.findall(r" ([\d.]+)x", forward) == ["1.00", "1.00"]
  assert len(re.findall(r"the backward takes [\d.]+ network forwards", out)) == 2


def test_loss_curves_reuse_finished_runs_and_compare_the_bf16_gap_with_the_seed_gap(bench, capsys, tmp_path):
  # Finished runs (their metrics, as the trainer writes them) are reused, not retrained: the
  # comparison is tested without three trainings (the trainer has its own tests).
  import json

  ce = {("float32", 0): [4.0, 3.0, 2.0, 1.5], ("float32", 1): [4.1, 3.2, 2.1, 1.4], ("bfloat16", 0): [4.0, 3.01, 2.0, 1.5]}
  for (dtype, seed), curve in ce.items():
    run = tmp_path / f"tiny_{dtype}_seed{seed}_4"
    run.mkdir()
    rows = [{"step": i + 1, "train/ce": v} for i, v in enumerate(curve)] + [{"step": 4, "eval/ce": curve[-1] + 0.1}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert bench.main(["--quick", "--loss-curves", "--workdir", str(tmp_path)]) == 0
  captured = capsys.readouterr()
  out = captured.out
  assert "[bench_train] training" not in captured.err + out  # reused, not retrained
  rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", line)]
  assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
  gaps = re.search(r"bf16 - float32 \(seed 0\) ([\d.]+); float32 seed 1 - seed 0 \(run-to-run\) ([\d.]+)", out)
  assert float(gaps.group(1)) == pytest.approx(0.0025) and float(gaps.group(2)) == pytest.approx(0.125)
  assert "float32 seed 0 1.6000, float32 seed 1 1.5000, bfloat16 seed 0 1.6000" in out
