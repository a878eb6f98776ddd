"""The method registry: one interface for LangFlow, AR and MDLM; `eval` on every run the trainer makes."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from langflow_jax import cli, methods, train
from langflow_jax.baselines import ar, mdlm
from langflow_jax.data import pipeline
from langflow_jax.errors import ConfigError
from langflow_jax.model import LangFlow
from tests.conftest import small_config

EVAL_ARGS = ["--config.eval.batch_size=4", "--config.eval.num_batches=2", "--config.eval.nelbo_samples=4"]


def test_every_objective_name_is_a_method_with_its_model():
  assert set(methods.METHODS) == {"langflow", "ar", "mdlm", "distill"}
  for name, model_class in (("langflow", LangFlow), ("ar", ar.ARTransformer), ("mdlm", mdlm.MaskedDiffusionLM),
                            ("distill", LangFlow)):
    cfg = small_config()
    cfg.objective.name = name
    method = methods.for_config(cfg)
    assert method.name == name and method.model_class is model_class
    model = nnx.eval_shape(lambda: methods.create_model(cfg))
    assert isinstance(model, model_class)
    method.check_model(model)
    # what serve reports in /health and asks for its request fields (a student serves as LangFlow)
    assert method.serving.name == ("langflow" if name == "distill" else name)
  with pytest.raises(ConfigError, match="unknown objective 'arr'.*one of \\['ar', 'distill', 'langflow', 'mdlm'\\]"):
    methods.get("arr")
  with pytest.raises(ConfigError, match="trains a ARTransformer, but the model is a LangFlow"):
    methods.get("ar").check_model(nnx.eval_shape(lambda: methods.create_model(small_config())))


@pytest.fixture(scope="module", params=["ar", "mdlm"])
def baseline_run(request, tmp_path_factory):
  """A tiny run of a baseline, trained by the trainer for two steps."""
  cfg = small_config()
  cfg.objective.name = request.param
  cfg.train.update(steps=2, log_every=1, eval_every=2, checkpoint_every=2)
  workdir = tmp_path_factory.mktemp(request.param) / "run"
  train.train_and_evaluate(cfg, workdir)
  return request.param, workdir


def test_eval_cli_measures_a_baseline_run_by_its_own_method(baseline_run, capsys):
  name, workdir = baseline_run
  assert cli.main(["eval", "--workdir", str(workdir), "--plot", *EVAL_ARGS]) == 0
  out = capsys.readouterr().out
  measure, tag = {"ar": ("exact NLL", "nll"), "mdlm": ("NELBO", "nelbo-mask_count4")}[name]
  assert out.startswith(f"{measure} on sotu (heldout): ") and "protocol card" in out
  assert ("perplexity <=" in out) == (name == "mdlm")  # the NELBO bounds the NLL; the AR's is exact
  saved = json.loads((workdir / "eval" / f"sotu_heldout_{tag}.json").read_text())
  assert saved["method"] == name and saved["measure"] == measure
  assert np.isfinite(saved["nats_per_token"]) and 0 < saved["nats_per_token_stderr"] < saved["nats_per_token"]
  assert saved["terms_nats_per_token"] == {("nll" if name == "ar" else "nelbo"): saved["nats_per_token"]}
  card = saved["card"]
  assert card["method"] == name and card["batches"] == "2 x 4 sequences" and card["weights"] == "EMA"
  assert card["tokens"] == saved["num_tokens"] == 8 * 32  # wrapped rows: every position counts
  assert "solver" not in card and saved["sweep"] is None  # nothing of the ODE bound
  assert not (workdir / "eval" / f"sotu_heldout_{tag}.png").exists()  # nothing to plot


def test_baseline_likelihood_is_the_model_s_own_figure(baseline_run):
  """The registry's number is the baseline's library call on the same rows."""
  name, workdir = baseline_run
  config, model = train.load_model(workdir)
  for arg in EVAL_ARGS:
    key, _, value = arg[len("--config."):].partition("=")
    config.eval[key.split(".")[1]] = int(value)
  data = pipeline.load_split(config.data, "heldout")
  lik = methods.for_config(config).likelihood(model, data, config)
  rows = list(pipeline.eval_batches(data, 4, 2))
  ids, mask = np.concatenate([b["ids"] for b in rows]), np.concatenate([b["mask"] for b in rows])
  if name == "ar":
    nll, count = ar.sequence_nll(model, ids, mask, score_first=True)
    expected = float(np.sum(nll) / np.sum(count))
  else:
    expected = mdlm.nelbo(model, ids, mask, key=jax.random.PRNGKey(config.eval.seed), num_samples=4,
                          estimator="mask_count", batch_size=4)["nelbo"]
  np.testing.assert_allclose(lik.nats_per_token, expected, rtol=1e-6)
  assert lik.num_sequences == 8 and lik.num_batches == 2


def test_the_registry_samples_every_method(baseline_run):
  name, workdir = baseline_run
  config, model = train.load_model(workdir)
  method = methods.for_config(config)
  ids, nfe = method.generate(model, jax.random.PRNGKey(0), num=2, length=8, steps=4)
  assert np.asarray(ids).shape == (2, 8) and 1 <= int(nfe) <= 8


def test_sample_refuses_a_baseline_run_and_points_at_sample_baseline(baseline_run, capsys):
  name, workdir = baseline_run
  assert cli.main(["sample", "--workdir", str(workdir), "--num", "1"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and f"objective.name={name}" in err[0] and "sample-baseline" in err[0]


def test_langflow_samples_texts_through_the_registry():
  from langflow_jax.data.tokenizer import load_tokenizer

  cfg = small_config()
  cfg.sample.update(num=2, steps=2, seed=3)
  method = methods.for_config(cfg)
  model = method.create_model(cfg)
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  texts = method.sample_texts(model, tokenizer, cfg.sample, 16, prompt="The state")
  assert len(texts) == 2 and all(t.startswith("<|endoftext|>The state") for t in texts)


def test_baselines_do_not_count_langflow_only_keys_as_part_of_their_experiment():
  from langflow_jax import methods

  for name in ("ar", "mdlm"):
    m = methods.get(name)
    assert not m.uses_key("schedule.entropy_init") and not m.uses_key("objective.self_cond_prob")
    assert not m.uses_key("objective.quantile_power")
    assert m.uses_key("optimizer.lr") and m.uses_key("objective.output_bias_init") and m.uses_key("model.n_blocks")
  assert all(methods.get("langflow").uses_key(k) for k in ("schedule.loc", "objective.self_cond_prob"))


def test_auto_head_bias_is_each_methods_own_start_and_an_explicit_choice_wins():
  cfg = small_config()
  cfg.objective.output_bias_init = "auto"
  starts = {name: methods.get(name).head_bias_init(cfg) for name in ("langflow", "ar", "mdlm")}
  assert starts == {"langflow": "unigram", "ar": "unigram", "mdlm": "zeros"}
  for choice in ("zeros", "unigram"):
    cfg.objective.output_bias_init = choice
    assert {methods.get(n).head_bias_init(cfg) for n in ("langflow", "ar", "mdlm")} == {choice}


def test_a_fresh_mdlm_run_keeps_its_head_bias_at_zero_under_the_default(tmp_path):
  from langflow_jax import config as config_lib
  from langflow_jax import train

  cfg = small_config()
  cfg.objective.name = "mdlm"
  cfg.objective.output_bias_init = config_lib.base_config().objective.output_bias_init  # the shipped default
  cfg.train.update(steps=1, eval_every=1, checkpoint_every=1)
  cfg.optimizer.update(lr=1e-30, warmup_steps=0)  # one update that leaves the weights where they started
  train.train_and_evaluate(cfg, tmp_path / "run")
  _, _, state, _ = train.load_state(tmp_path / "run")
  bias = np.asarray(state.params["output_layer"]["linear"]["bias"][...])
  assert np.abs(bias).max() < 1e-20  # a log-unigram start would be several nats from 0
