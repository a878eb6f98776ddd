"""The reproduction scripts (experiments/exp_*.py) end to end in --quick mode.

Each script runs as a user runs it (``python experiments/exp_x.py --quick
--out DIR --runs DIR``) in a subprocess. The subprocesses ask XLA for its
cheapest CPU compilation: a quick run is almost all compilation, and this
halves it without changing what runs. The three share one runs directory, as
they do by default: the LangFlow run the first trains is reused by the others,
and a second call of a script reuses every run and cached evaluation.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

import common
import exp_schedule
from tests.conftest import FAST_COMPILE

ROOT = pathlib.Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("experiments")


def run_script(name: str, root: pathlib.Path) -> tuple[dict, str]:
  """Runs experiments/exp_<name>.py --quick; returns its JSON results and its stderr."""
  env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, str(ROOT / "experiments" / f"exp_{name}.py"), "--quick",
                         "--out", str(root / "results"), "--runs", str(root / "runs")],
                        capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  table = root / "results" / f"{name}.md"
  assert table.read_text().strip() in proc.stdout  # the table is printed
  return json.loads((root / "results" / f"{name}.json").read_text()), proc.stderr


def _finite(tree) -> bool:
  if isinstance(tree, dict):
    return all(_finite(v) for v in tree.values())
  if isinstance(tree, (list, tuple)):
    return all(_finite(v) for v in tree)
  return not isinstance(tree, float) or math.isfinite(tree)


def _check_outputs(out: dict, name: str, root: pathlib.Path, rows: int) -> str:
  table = pathlib.Path(out["table"])
  assert table == root / "results" / f"{name}.md"
  text = table.read_text()
  lines = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("|---")]
  assert len(lines) == rows + 1, text  # header + rows
  assert "QUICK SMOKE RUN" in text and "load average" in text and "n/a" not in text
  assert out["quick"] and out["steps"] == common.QUICK_STEPS
  for figure in out["figures"]:
    path = pathlib.Path(figure)
    assert path.parent == root / "results" and path.read_bytes()[:8] == PNG_MAGIC
    assert f"]({path.name})" in text  # the table links its figure
  assert _finite(out["results"]), out["results"]
  return text


def test_exp_schedule(root):
  out, _ = run_script("schedule", root)
  _check_outputs(out, "schedule", root, rows=3)
  assert out["protocol"]["mode"] == common.EVAL["mode"]  # the docs name the bound's mode from here
  for name in ("langflow", "langflow-linear", "langflow-cosine"):
    r = out["results"][name]
    assert len(r["curve"]) == exp_schedule.QUICK_CURVE_POINTS and 0.0 <= r["tv"] <= 1.0
  # Each evaluation is cached beside its run with its protocol.
  run = root / "runs" / f"langflow-{common.QUICK_STEPS}"
  cached = {p.name: json.loads(p.read_text()) for p in (run / "experiments").glob("*.json")}
  assert {"bound-heun2-official.json", "bound-heun2-gamma.json",
          f"denoising-curve-{exp_schedule.QUICK_CURVE_POINTS}.json"} <= set(cached)
  assert cached["bound-heun2-gamma.json"]["protocol"]["eval"]["grid"] == "gamma"


def test_exp_selfcond(root):
  out, _ = run_script("selfcond", root)
  _check_outputs(out, "selfcond", root, rows=4)
  assert all(r["gen_ppl"] > 1.0 and r["entropy"] > 0.0 for r in out["results"].values())


def test_exp_baselines(root):
  out, _ = run_script("baselines", root)
  text = _check_outputs(out, "baselines", root, rows=5)
  assert out["protocol"]["mode"] == common.EVAL["mode"]  # the docs name the bound's mode from here
  for name in ("langflow", "ar", "mdlm", "mdlm-unigram-bias"):
    r = out["results"][name]
    assert r["params"] > 0 and r["nats_per_token"] > 0 and r["tokens_per_s"] > 0 and r["nfe"] >= 1
  assert out["results"]["ar"]["nfe"] == 32  # one evaluation per generated position
  assert "exact NLL" in text and "NELBO (mask_count" in text and "ODE bound" in text


def test_rerun_reuses_runs_and_results(root):
  """A second call trains nothing and recomputes no cached evaluation."""
  if not (root / "results" / "schedule.json").is_file():
    run_script("schedule", root)
  _, err = run_script("schedule", root)
  assert "training" not in err and "computing" not in err
  assert err.count("reusing") == 3 and err.count("cached") == 9


def test_foreign_run_directory_is_refused(root):
  """A run directory that holds another experiment is an error, not silently reused."""
  from langflow_jax.errors import ConfigError

  args = common.parse_args(exp_schedule.__doc__, ["--quick", "--runs", str(root / "runs")])
  if common.finished_step(common.run_dir(exp_schedule.VARIANTS[1], args)) is None:
    run_script("schedule", root)
  impostor = common.Variant("langflow-linear", "cosine", overrides=("config.schedule.name=cosine",))
  with pytest.raises(ConfigError, match="holds another experiment"):
    common.ensure_trained(impostor, args)


def test_a_preempted_training_run_stops_the_script_before_anything_is_measured(tmp_path, monkeypatch):
  """SIGTERM saves the run and returns from the trainer; the script must exit 143, not
  measure (and cache) the half-trained model."""
  args = common.parse_args(exp_schedule.__doc__, ["--quick", "--runs", str(tmp_path / "runs")])
  monkeypatch.setattr(common.train, "train_and_evaluate", lambda config, workdir: {"preempted": "SIGTERM",
                                                                                  "final_step": 1})
  with pytest.raises(SystemExit) as stopped:
    common.ensure_trained(exp_schedule.VARIANTS[0], args)
  assert stopped.value.code == 143


def test_known_entropy_quick(root):
  """The known-entropy study end to end: a corpus of exact entropy, the three methods, one ablation."""
  data, _ = run_script("known_entropy", root)
  (corpus, res), = data["results"].items()
  h = res["card"]["H"]
  assert 0 < h < math.log(res["card"]["vocab_size"])
  assert set(res["ladder"]) == {"langflow", "mdlm", "ar"}
  for per in res["ladder"].values():
    for r in per.values():
      assert math.isfinite(r["nats_per_token"]) and r["nats_per_token"] > 0
  lf = next(iter(res["ladder"]["langflow"].values()))
  assert lf["context_free_exact"] is not None and "sc_chain_rule" in lf["what"]
  assert set(res["ablations"]) == {"zeros-bias"}
  assert (root / "results" / "known_entropy.png").read_bytes()[:8] == PNG_MAGIC


def test_known_entropy_methods_none_trains_no_ladder_rung_and_a_typo_is_an_error():
  import exp_known_entropy as module

  assert module.ladder_methods(module.parse(["--methods", "none", "--ablations", "sc0.25"])) == []
  assert module.ladder_methods(module.parse([])) == ["langflow", "mdlm", "ar"]
  with pytest.raises(SystemExit, match="unknown method"):
    module.ladder_methods(module.parse(["--methods", "langflow,mdml"]))


def test_known_entropy_carry_over_names_the_shipped_recipe_rows_it_leaves_behind():
  import exp_known_entropy as module

  absolute = next(a.name for a in module.ABLATIONS if a.absolute)
  relative = next(a.name for a in module.ABLATIONS if not a.absolute)
  old = {"ladder": {"langflow": {"4800": {"nats_per_token": 0.8}}, "mdlm": {"4800": {"nats_per_token": 0.7}}},
         "ablations": {absolute: {"nats_per_token": 1.0}, f"{relative}@4800": {"nats_per_token": 0.9}}}
  res = {"ladder": {}, "ablations": {}}
  assert sorted(module.carry_over(res, old)) == sorted(["langflow@4800", f"{relative}@4800"])
  assert set(res["ladder"]) == {"mdlm"} and set(res["ablations"]) == {absolute}
  assert res["ladder"]["mdlm"]["4800"]["carried"]
  everything = {"ladder": {}, "ablations": {}}
  assert module.carry_over(everything, old, everything=True) == []
  assert set(everything["ladder"]) == {"langflow", "mdlm"} and len(everything["ablations"]) == 2
