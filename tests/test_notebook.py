"""langflow_jax.notebook: the budget, the setup line and the quickstart run the Colab notebooks share.

The notebooks themselves run top to bottom in tests/test_notebooks.py; here each helper is checked
alone, without training (the quickstart run is stubbed at the trainer).
"""

import dataclasses
import pathlib

from langflow_jax import notebook
from tests.conftest import ROOT


def test_the_quick_budget_needs_the_variable_set_to_one():
  assert notebook.budget({"LANGFLOW_NOTEBOOK_QUICK": "1"}) is notebook.QUICK_BUDGET
  for environ in ({}, {"LANGFLOW_NOTEBOOK_QUICK": "0"}, {"LANGFLOW_NOTEBOOK_QUICK": ""}):
    assert notebook.budget(environ) is notebook.FULL_BUDGET


def test_the_quick_budget_is_smaller_everywhere():
  quick, full = notebook.QUICK_BUDGET, notebook.FULL_BUDGET
  assert quick.quick and not full.quick
  for field in dataclasses.fields(notebook.Budget):
    if field.name != "quick":
      q, f = getattr(quick, field.name), getattr(full, field.name)
      assert (max(q) < max(f)) if isinstance(q, tuple) else (0 < q < f), field.name


def test_the_setup_line_names_this_checkout_and_the_devices():
  line = notebook.setup_line()
  assert str(ROOT / "langflow_jax") in line and "JAX" in line and "CPU device(s)" in line


def test_the_quickstart_run_is_the_tiny_config_with_the_budgets_steps():
  b = notebook.QUICK_BUDGET
  assert notebook.quickstart_workdir(b) == pathlib.Path("runs/colab_tiny_30")
  cfg = notebook.quickstart_config(b)
  assert cfg.train.steps == 30 and not cfg.train.progress and cfg.model.hidden_size == 128


def test_the_training_line_says_when_a_run_was_only_reloaded():
  done = {"num_params": 2.67e6, "start_step": 30, "final_step": 30, "train": {}, "eval": {}}
  assert notebook.training_line(done) == "2.67M parameters, step 30 (already trained: reloaded)"
  fresh = {**done, "start_step": 0, "train": {"ce": 5.1234}, "eval": {"eval/ce": 5.0}}
  assert notebook.training_line(fresh) == \
      "2.67M parameters, step 30: training CE 5.123, held-out CE 5.000 nats/token"


def test_the_quickstart_run_trains_then_loads_the_ema_model(monkeypatch, capsys):
  calls = []
  monkeypatch.setattr(notebook.train, "train_and_evaluate", lambda cfg, workdir: calls.append(
      (cfg.train.steps, workdir)) or {"num_params": 1e6, "start_step": 0, "final_step": 30, "train": {}, "eval": {}})
  monkeypatch.setattr(notebook.ckpt_lib, "load_model", lambda workdir: ("cfg", f"model of {workdir}"))
  workdir, cfg, model = notebook.quickstart_run(notebook.QUICK_BUDGET)
  assert calls == [(30, pathlib.Path("runs/colab_tiny_30"))]
  assert (workdir, cfg, model) == (pathlib.Path("runs/colab_tiny_30"), "cfg", "model of runs/colab_tiny_30")
  assert "1.00M parameters, step 30" in capsys.readouterr().out
