"""`langflow-jax eval`: a user's own text file end to end, the card, JSON and plot."""

import json

import jax
import numpy as np
import pytest

from langflow_jax import checkpoint as ckpt_lib
from langflow_jax import cli, evaluate, methods, train
from langflow_jax import likelihood as lk
from tests.conftest import small_config

EVAL_ARGS = ["--config.eval.steps=4", "--config.eval.batch_size=4", "--config.eval.num_batches=2",
             "--config.eval.plot_steps=(2, 4)", "--config.eval.plot_batches=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A run directory as the trainer writes it, and a user's text file to measure.

  The checkpoint (step 2) holds a fresh state whose raw weights are nudged away
  from the EMA ones; training itself is tested elsewhere and is not needed to
  exercise the evaluation path.
  """
  root = tmp_path_factory.mktemp("eval")
  mine = root / "my_notes.txt"
  mine.write_text("Notes on the harbour: ships, tides, cargo and the price of grain.\n\n" * 30)
  c = small_config()
  tx = train.make_optimizer(c.optimizer, c.train.steps)
  state = jax.jit(lambda: train.fresh_train_state(c, tx))()
  state = state.replace(params=jax.tree.map(lambda p: p * 1.01 + 0.01, state.params))
  ckpt_lib.save_state(root / "run", 2, state, c)
  return root / "run", mine


def test_user_text_file_through_the_cli(run, capsys):
  workdir, mine = run
  code = cli.main(["eval", "--workdir", str(workdir), "--data", f"file:{mine}", "--plot", *EVAL_ARGS])
  out = capsys.readouterr().out
  assert code == 0
  for text in ("nats/token", "bits/token", "perplexity", "standard error", "reconstruction", "flow", "prior",
               "protocol card",
               "solver", "estimator", "weights", "EMA", "seed"):
    assert text in out, text
  path = workdir / "eval" / "my-notes-txt_all_heun4.json"
  saved = json.loads(path.read_text())
  terms = saved["terms_nats_per_token"]
  assert saved["nats_per_token"] == pytest.approx(sum(terms.values()), rel=1e-9)
  assert saved["bits_per_token"] == pytest.approx(saved["nats_per_token"] / np.log(2))
  assert saved["perplexity"] == pytest.approx(np.exp(saved["nats_per_token"]))
  assert 0 < saved["nats_per_token_stderr"] < 0.5 * saved["nats_per_token"]
  card = saved["card"]
  assert card["data"] == f"file:{mine}" and card["split"] == "all" and card["seq_len"] == 32
  assert card["tokens"] == saved["num_tokens"] == 32 * saved["num_sequences"]  # wrapped: every position
  assert card["batches"] == "2 x 4 sequences" and card["estimator"].startswith("hutchinson_gaussian")
  assert [r["steps"] for r in saved["sweep"]] == [2, 4]
  assert saved["sweep"][-1]["total"] == pytest.approx(saved["nats_per_token"], rel=1e-6)  # same data, seed, grid
  assert len(saved["integrand"]["gamma"]) == 8  # 4 Heun steps, 2 evaluations each
  assert (workdir / "eval" / "my-notes-txt_all_heun4.png").stat().st_size > 10_000


def test_checkpoint_path_and_seed_reproduce_the_number(run):
  workdir, mine = run
  overrides = [a[2:] for a in EVAL_ARGS]
  a = evaluate.evaluate_workdir(workdir, overrides, data=f"file:{mine}", write=False)
  b = evaluate.evaluate_workdir(None, overrides, checkpoint=workdir / "checkpoints" / "2",
                                data=f"file:{mine}", write=False)
  c = evaluate.evaluate_workdir(workdir, [*overrides, "config.eval.seed=2"], data=f"file:{mine}", write=False)
  assert a.nats_per_token == b.nats_per_token and a.card["checkpoint"] == b.card["checkpoint"]
  assert c.nats_per_token != a.nats_per_token  # another eps/probe draw
  raw = evaluate.evaluate_workdir(workdir, [*overrides, "config.eval.use_ema=false"], data=f"file:{mine}",
                                  write=False)
  assert raw.card["weights"].startswith("raw") and raw.nats_per_token != a.nats_per_token


@pytest.mark.parametrize("args, message", [
    (["eval"], "nothing to evaluate"),
    (["eval", "--checkpoint", "/nonexistent/dir"], "neither a run's checkpoint step"),
    (["eval", "--workdir", "/nonexistent/run"], "/nonexistent/run does not exist"),
])
def test_eval_mistakes_are_one_line(capsys, args, message):
  assert cli.main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and message in err[0]


def test_card_and_name_for_the_adaptive_solver(run):
  workdir, _ = run
  config, model, source, out_dir = evaluate.load_for_eval(workdir, None, ["config.eval.solver=adaptive"])
  opts = lk.BoundOptions.from_config(config.eval)
  totals = lk.BoundTotals(tokens=64.0, sequences=2, evals=45, steps=7)
  lik = methods.Likelihood(measure="bound", summary="", upper_bound=True, nats_per_token=1.0, stderr=0.1, stderr_covers="",
                           terms={}, num_tokens=64, num_sequences=2, num_batches=1, seconds=0.0,
                           card=lk.bound_card(model, opts, totals))
  card = evaluate.protocol_card(config, model, lik, split="heldout", source=source)
  assert card["solver"].startswith("adaptive (diffrax Tsit5, rtol 0.001")
  assert card["steps"] == "7 accepted (largest batch), 45 evaluations"
  assert card["weights"] == "EMA" and card["checkpoint"].endswith("checkpoints/2")
  assert evaluate.default_name(config, "heldout") == "sotu_heldout_adaptive-rtol0.001"
  assert out_dir == workdir / "eval"


def test_official_release_directory_loads(fixture_dir):
  config, model, source, out_dir = evaluate.load_for_eval(None, fixture_dir, ["config.eval.steps=8"])
  assert source["weights"] == "official release, as stored" and out_dir == fixture_dir / "eval"
  assert config.model.vocab_size == 307 and config.eval.steps == 8 and model.hidden_size == 96


def test_gap_curve_splits_the_elbo_difference_of_two_exact_posteriors_over_gamma():
  """The context-free posterior against the Markov chain's on chain rows: the per-gamma ELBO excess
  integrated over gamma (plus the reconstruction CE's gap at the clean end) is the difference of
  the two models' NLLs of the rows; a denoiser against itself has no excess anywhere."""
  from langflow_jax import oracles
  from langflow_jax import schedule as schedule_lib
  from langflow_jax.data import markov
  from langflow_jax.data.prepare import PackedSplit
  from langflow_jax.model import normalized_rows

  chain = markov.random_chain(8, 3, seed=1)
  ids = (chain.sample(np.random.default_rng(3), 256, 16) + 1).astype(np.int32)
  mask = np.ones_like(ids, bool)
  log_p = np.log(chain.stationary[ids[:, 0] - 1]) + np.log(chain.transition[ids[:, :-1] - 1, ids[:, 1:] - 1]).sum(1)
  e = normalized_rows(jax.random.normal(jax.random.PRNGKey(0), (chain.num_states + 1, 16)))
  schedule = schedule_lib.GumbelSchedule(1.5, 1.2, 2.0)
  exact = oracles.MarkovDenoiser(chain, e, schedule, offset=1)
  counts = np.bincount(ids.ravel(), minlength=chain.num_states + 1) + 1e-6
  unigram = oracles.ContextFreeDenoiser(e, schedule, np.log(counts / counts.sum()))
  gamma_G = np.linspace(-6.0, 14.0, 201)  # clean (tokens certain) to pure noise for D = 16
  split, kw = PackedSplit(ids, mask), dict(batch_size=128, num_batches=0, seed=1)

  same = evaluate.denoiser_gap_curve(exact, exact, split, gamma_G, **kw)
  np.testing.assert_allclose(same["elbo_excess"], 0.0, atol=1e-7)
  np.testing.assert_allclose(same["ce"], same["ce_reference"], atol=1e-6)

  gap = evaluate.denoiser_gap_curve(unigram, exact, split, gamma_G, **kw)
  assert np.all(gap["elbo_excess"] >= 0) and gap["elbo_excess"].max() > 0.1
  total = np.trapezoid(gap["elbo_excess"], gamma_G) + (gap["ce"][0] - gap["ce_reference"][0])
  nll_gap = unigram.analytic_nll(ids, mask) - float(np.mean(-log_p / 16))
  assert nll_gap > 1.0 and abs(total - nll_gap) < 0.05, (total, nll_gap)
