"""The sampler: official parity, variants, conditioning, best-of-n, the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from langflow_jax import cli, convert, diffusion, sampling
from langflow_jax.errors import ConfigError, UserError
from langflow_jax.model import create_model
from tests.conftest import small_config


@pytest.fixture(scope="module")
def official(fixture_dir):
  return convert.load_official(fixture_dir)[1]


@pytest.fixture(scope="module")
def small_model():
  # A fresh model's blocks and head start at zero (each position only sees
  # itself through the skip term); random weights make positions interact.
  model = create_model(small_config(), seed=3)
  params = nnx.state(model.backbone, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(0)
  noisy = [np.asarray(p) + 0.2 * rng.standard_normal(p.shape, np.float32) for p in leaves]
  nnx.update(model.backbone, jax.tree.unflatten(treedef, noisy))
  return model


@pytest.fixture(scope="module")
def tokenizer():
  from langflow_jax.data.tokenizer import load_tokenizer

  return load_tokenizer("sotu-bpe8k")


def max_rel(ours, ref):
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def official_run(model, reference, update_dtype):
  options = sampling.SamplerOptions(steps=int(reference["sample_num_steps"]), update_dtype=update_dtype)
  return sampling.sample(model, jax.random.PRNGKey(0), options, init_noise=reference["init_noise"],
                         return_logits=True)


@pytest.mark.parametrize("update_dtype", ["float64", "float32"])
def test_matches_official_sampler(official, reference, update_dtype):
  # float64 is the official update; float32 must still give the same tokens.
  out = official_run(official, reference, update_dtype)
  np.testing.assert_array_equal(np.asarray(out.tokens_BxL), reference["samples"])
  assert max_rel(out.final_z_BxLxD, reference["sample_final_z"]) <= 1e-5
  assert max_rel(out.logits_BxLxV, reference["sample_final_logits"]) <= 1e-5
  np.testing.assert_allclose(np.asarray(out.gammas_N), reference["sample_gammas"], rtol=1e-6)


def test_matches_official_only_with_self_conditioning_fed_back(official, reference):
  # The fixture's weights make self-conditioning matter: without the feedback
  # the final state is far from the official one.
  assert max_rel(reference["logits"], reference["logits_nosc"]) > 1e-3
  options = sampling.SamplerOptions(steps=int(reference["sample_num_steps"]), self_condition=False)
  out = sampling.sample(official, jax.random.PRNGKey(0), options, init_noise=reference["init_noise"])
  assert max_rel(out.final_z_BxLxD, reference["sample_final_z"]) > 1e-3


@pytest.mark.parametrize("grid", sampling.GRIDS)
def test_step_grid_endpoints_and_the_two_step_sampler(official, grid):
  sched = official.schedule
  gammas = sampling.step_grid(sched, 5, grid)
  lo, hi = (float(g) for g in sched.endpoints())
  assert np.all(np.diff(gammas) < 0)
  if grid == "official":
    np.testing.assert_allclose(gammas[[0, -1]], np.asarray(sched.icdf(np.float32([1 - 1e-5, 1e-5]))), rtol=1e-6)
    assert lo < gammas[-1] < gammas[0] < hi
  else:
    np.testing.assert_allclose(gammas[[0, -1]], [hi, lo], rtol=1e-6)
  # Two steps by hand: predict at g0 (self-cond zeros), DDIM to g1, final pass
  # at g1 with the first prediction fed back.
  g2 = sampling.step_grid(sched, 2, grid)
  z0 = jax.random.normal(jax.random.PRNGKey(1), (2, 16, official.hidden_size))
  options = sampling.SamplerOptions(steps=2, grid=grid, update_dtype="float32")
  out = sampling.sample(official, jax.random.PRNGKey(0), options, init_noise=z0, return_logits=True)

  @nnx.jit
  def by_hand(model, z0):
    x0 = model.denoise(model(z0, jnp.full((2,), g2[0])))
    z1 = diffusion.ddim_step(z0, x0, g2[0], g2[1])
    return z1, model(z1, jnp.full((2,), g2[1]), x0)

  z1, expected = by_hand(official, z0)
  np.testing.assert_allclose(np.asarray(out.final_z_BxLxD), np.asarray(z1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out.logits_BxLxV), np.asarray(expected), rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(out.tokens_BxL), np.asarray(jnp.argmax(expected, -1)))


@pytest.mark.parametrize("name", sorted(sampling.SAMPLERS))
def test_shapes_and_determinism(official, name):
  options = sampling.SamplerOptions(sampler=name, steps=6, churn=20.0, trace=True)
  a = sampling.sample(official, jax.random.PRNGKey(7), options, num=2, seq_len=16)
  b = sampling.sample(official, jax.random.PRNGKey(7), options, num=2, seq_len=16)
  c = sampling.sample(official, jax.random.PRNGKey(8), options, num=2, seq_len=16)
  assert a.tokens_BxL.shape == (2, 16) and a.tokens_BxL.dtype == jnp.int32
  assert a.final_z_BxLxD.shape == (2, 16, official.hidden_size)
  assert a.token_logprob_BxL.shape == (2, 16) and bool(jnp.all(a.token_logprob_BxL <= 0))
  assert a.trace_NxBxL.shape == (6, 2, 16)
  np.testing.assert_array_equal(np.asarray(a.trace_NxBxL[-1]), np.asarray(a.tokens_BxL))
  np.testing.assert_array_equal(np.asarray(a.final_z_BxLxD), np.asarray(b.final_z_BxLxD))
  assert not np.array_equal(np.asarray(a.final_z_BxLxD), np.asarray(c.final_z_BxLxD))
  assert options.nfe == (11 if name == "heun" else 6)


def test_variants_differ_from_euler_and_churn_zero_is_euler(official):
  z0 = jax.random.normal(jax.random.PRNGKey(2), (2, 16, official.hidden_size))
  run = lambda **kw: np.asarray(sampling.sample(official, jax.random.PRNGKey(0), sampling.SamplerOptions(
      steps=6, trace=True, **kw), init_noise=z0).final_z_BxLxD)
  euler = run()
  np.testing.assert_array_equal(run(sampler="stochastic", churn=0.0), euler)
  for kw in ({"sampler": "stochastic", "churn": 20.0}, {"sampler": "heun"}, {"sampler": "multistep"},
             {"temperature": 0.5}, {"grid": "gamma"}):
    assert max_rel(run(**kw), euler) > 1e-4, kw


def test_prefix_and_infill_tokens_are_kept(small_model, tokenizer):
  seq_len = 32
  options = sampling.SamplerOptions(steps=5, trace=True)
  free = sampling.sample(small_model, jax.random.PRNGKey(0), options, num=2, seq_len=seq_len)
  conds = [
      sampling.prompt_conditioning(tokenizer, "The Congress shall", seq_len, num=2),
      sampling.infill_conditioning(tokenizer, "The ___ of the ___3 .", seq_len, num=2, gap_tokens=4),
      sampling.positions_conditioning(seq_len, {5: 17, 20: 400, 31: 9}, num=2),
  ]
  prompt_ids = [tokenizer.bos_id, *tokenizer.encode("The Congress shall")]
  np.testing.assert_array_equal(np.asarray(conds[0].ids_BxL[0, :len(prompt_ids)]), prompt_ids)
  assert int(conds[0].fixed_BxL[0].sum()) == len(prompt_ids)
  # infill: [BOS] "The" gap(4) " of the" gap(3) " ." then free positions
  layout = np.asarray(conds[1].fixed_BxL[0])
  n_of_the = len(tokenizer.encode(" of the"))
  expected = [True] * (1 + len(tokenizer.encode("The"))) + [False] * 4 + [True] * n_of_the + [False] * 3
  np.testing.assert_array_equal(layout[:len(expected)], expected)
  # euler on all three; heun and stochastic pin at extra points (the predictor, the churned state)
  for name, cond in [("euler", conds[0]), ("euler", conds[1]), ("euler", conds[2]), ("heun", conds[1]),
                     ("stochastic", conds[1])]:
    out = sampling.sample(small_model, jax.random.PRNGKey(0), sampling.SamplerOptions(
        sampler=name, steps=5, churn=5.0, trace=True), cond=cond)
    fixed = np.asarray(cond.fixed_BxL)
    got = np.asarray(out.tokens_BxL)
    np.testing.assert_array_equal(got[fixed], np.asarray(cond.ids_BxL)[fixed])
    for row in np.asarray(out.trace_NxBxL):
      np.testing.assert_array_equal(row[fixed], np.asarray(cond.ids_BxL)[fixed])
  # The given tokens reach the free positions through attention (same key).
  out = sampling.sample(small_model, jax.random.PRNGKey(0), options, cond=conds[2])
  free_pos = ~np.asarray(conds[2].fixed_BxL)
  assert max_rel(np.asarray(out.final_z_BxLxD)[free_pos], np.asarray(free.final_z_BxLxD)[free_pos]) > 1e-4


def test_conditioned_positions_carry_noised_clean_embeddings(official):
  # At the final level the given positions hold alpha E[x] + sigma eps, with
  # the same eps at both positions' levels (drawn once per run).
  cond = sampling.positions_conditioning(16, {0: 3, 7: 100}, num=2)
  out = sampling.sample(official, jax.random.PRNGKey(4), sampling.SamplerOptions(steps=4, trace=True), cond=cond)
  g = out.gammas_N[-1]
  a, s = diffusion.alpha_sigma(g)
  e = official.embed(cond.ids_BxL)
  eps = (out.final_z_BxLxD - a * e) / s
  fixed = np.asarray(cond.fixed_BxL)
  eps_fixed = np.asarray(eps)[fixed]
  assert abs(float(eps_fixed.std()) - 1.0) < 0.2  # a standard normal draw, not a model output
  out8 = sampling.sample(official, jax.random.PRNGKey(4), sampling.SamplerOptions(steps=8, trace=True), cond=cond)
  a8, s8 = diffusion.alpha_sigma(out8.gammas_N[-1])
  eps8 = (np.asarray(out8.final_z_BxLxD) - np.asarray(a8 * e)) / np.asarray(s8)
  np.testing.assert_allclose(eps8[fixed], eps_fixed, atol=1e-4)


def test_user_errors(tokenizer):
  with pytest.raises(UserError, match="empty"):
    sampling.prompt_conditioning(tokenizer, "  ", 32)
  with pytest.raises(UserError, match="tokens long"):
    sampling.prompt_conditioning(tokenizer, "word " * 40, 32)
  with pytest.raises(UserError, match="no gap"):
    sampling.infill_conditioning(tokenizer, "no gaps here", 32)
  with pytest.raises(UserError, match="needs"):
    sampling.infill_conditioning(tokenizer, "a ___40 b", 32)
  with pytest.raises(ConfigError, match="sample.sampler='ddpm' is unknown"):
    sampling.SamplerOptions(sampler="ddpm")
  with pytest.raises(ConfigError, match="unknown sample score"):
    sampling.get_scorer("perplexity")


def test_best_of_n_returns_the_best_candidate(small_model, tokenizer):
  cond = sampling.prompt_conditioning(tokenizer, "The Congress", 32, num=2)
  options = sampling.SamplerOptions(steps=4)
  for score in ("ce", "denoise"):
    res = sampling.best_of_n(small_model, jax.random.PRNGKey(5), 3, options, cond=cond, score=score)
    scores = np.asarray(res.scores_RxN)
    assert scores.shape == (2, 3) and len(set(scores.ravel().round(6))) > 1
    best = scores.argmin(axis=1)
    np.testing.assert_array_equal(np.asarray(res.best_R), best)
    np.testing.assert_allclose(np.asarray(res.score_R), scores.min(axis=1))
    candidates = np.asarray(res.candidates.tokens_BxL).reshape(2, 3, -1)
    np.testing.assert_array_equal(np.asarray(res.tokens_RxL), candidates[np.arange(2), best])
  # The ce score is the mean NLL of the chosen tokens over the generated positions.
  out = sampling.sample(small_model, jax.random.PRNGKey(6), options, cond=cond, return_logits=True)
  logp = jax.nn.log_softmax(out.logits_BxLxV, axis=-1)
  nll = -np.take_along_axis(np.asarray(logp), np.asarray(out.tokens_BxL)[..., None], -1)[..., 0]
  gen = ~np.asarray(cond.fixed_BxL)
  expected = (nll * gen).sum(1) / gen.sum(1)
  np.testing.assert_allclose(np.asarray(sampling.score_samples(small_model, out, "ce", cond=cond)), expected,
                             rtol=1e-5)


def test_bound_score_is_the_likelihood_bound_per_generated_token(small_model, tokenizer):
  from langflow_jax import likelihood as lk

  cond = sampling.prompt_conditioning(tokenizer, "The Congress", 16, num=2)
  key = jax.random.PRNGKey(5)
  res = sampling.best_of_n(small_model, key, 2, sampling.SamplerOptions(steps=3), cond=cond, score="bound")
  scores = np.asarray(res.scores_RxN)
  np.testing.assert_array_equal(np.asarray(res.best_R), scores.argmin(axis=1))
  # the same key the scorer derives: the whole sequence's bound over its generated tokens
  k_score = jax.random.fold_in(jax.random.split(key)[1], sampling.KEY_SALT + 1)
  terms, _ = lk.make_bound_fn(small_model, sampling.BOUND_SCORE)(res.candidates.tokens_BxL, None, k_score)
  generated = (~np.asarray(cond.tile(2).fixed_BxL)).sum(axis=1)
  np.testing.assert_allclose(scores.ravel(), np.asarray(terms.total_B) / generated, rtol=1e-5)
  assert sampling.BOUND_SCORE.solver == "euler" and sampling.BOUND_SCORE.steps == 16


def test_method_names_are_listed_once():
  from langflow_jax import config, likelihood as lk

  assert tuple(sampling.SAMPLERS) == config.SAMPLERS
  assert sampling.GRIDS == config.STEP_GRIDS and sampling.UPDATE_DTYPES == config.UPDATE_DTYPES
  assert lk.SOLVERS == config.EVAL_SOLVERS and set(lk.TABLEAUS) | {"adaptive"} == set(config.EVAL_SOLVERS)
  assert lk.GRIDS == config.EVAL_GRIDS and lk.ESTIMATORS == config.EVAL_ESTIMATORS
  # the options objects and the config groups apply the same rules, with the same message
  cfg = small_config()
  cfg.sample.update(sampler="ddpm")
  cfg.eval.update(grid="cdf")
  for check, build in ((lambda: config.validate_sample(cfg), lambda: sampling.SamplerOptions.from_config(cfg.sample)),
                       (lambda: config.validate_eval(cfg), lambda: lk.BoundOptions.from_config(cfg.eval))):
    with pytest.raises(ConfigError) as from_config:
      check()
    with pytest.raises(ConfigError) as from_options:
      build()
    assert str(from_config.value) == str(from_options.value)


def test_bound_scorer_plugs_in(small_model):
  calls = []

  def fake_bound(model, ids, mask, key):
    calls.append(ids.shape)
    return jnp.sum(ids, axis=-1).astype(jnp.float32)

  sampling.SCORERS["fake_bound"] = sampling.bound_scorer(fake_bound)
  try:
    res = sampling.best_of_n(small_model, jax.random.PRNGKey(0), 2, sampling.SamplerOptions(steps=3), num=2,
                             seq_len=16, score="fake_bound")
  finally:
    del sampling.SCORERS["fake_bound"]
  sums = np.asarray(res.candidates.tokens_BxL).sum(-1).reshape(2, 2) / 16
  np.testing.assert_allclose(np.asarray(res.scores_RxN), sums, rtol=1e-6)
  assert calls


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  from langflow_jax import train

  workdir = tmp_path_factory.mktemp("run")
  corpus = workdir / "corpus.txt"
  corpus.write_text("\n\n".join(f"The Congress shall meet on day {i} to debate the budget, the tariffs and "
                                  f"the state of the union, as the people expect." for i in range(80)))
  c = small_config()
  c.data.name = f"file:{corpus}"
  c.train.update(steps=2, eval_every=2, checkpoint_every=2)
  train.train_and_evaluate(c, workdir)
  return workdir


def test_cli_sample_and_genppl(trained_run, tmp_path, capsys):
  out = tmp_path / "s.json"
  code = cli.main(["sample", "--workdir", str(trained_run), "--num", "2", "--steps", "4", "--prompt",
                   "The Congress shall", "--best-of", "2", "--show-steps", "--out", str(out),
                   "--config.sample.batch_size=4"])
  printed = capsys.readouterr().out
  assert code == 0, printed
  saved = json.loads(out.read_text())
  assert len(saved["samples"]) == 2 and saved["meta"]["best_of"] == 2
  assert all(s["text"].startswith("<|endoftext|>The Congress shall") for s in saved["samples"])
  assert "draft" in printed and "final" in printed and "[[" in printed
  code = cli.main(["genppl", "--samples", str(out), "--json"])
  printed = capsys.readouterr().out
  assert code == 0
  result = json.loads(printed[printed.index("{"):])
  assert result["samples"]["num_samples"] == 2 and result["samples"]["gen_ppl"] > 1
  assert result["heldout_data"]["scored_tokens"] == 2 * 31


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "word " * 50], "tokens long"),
    (["--sampler", "ddpm"], "sample.sampler='ddpm' is unknown"),
    (["--infill", "no gap"], "has no gap"),
    (["--config.model.n_blocks=3"], "only --config.sample"),
])
def test_cli_sample_errors_are_one_line(trained_run, capsys, args, message):
  code = cli.main(["sample", "--workdir", str(trained_run), "--num", "1", "--steps", "2", *args])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and message in err[0], err
