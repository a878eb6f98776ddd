"""The autoregressive baseline: causal model, KV-cache decoder, scorer, training."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from langflow_jax import cli, methods, metrics, objective, parallel, train
from langflow_jax.baselines import ar
from langflow_jax.errors import ConfigError
from langflow_jax.model import create_model as create_langflow
from tests.conftest import (baseline_config, check_baseline_run, check_sample_baseline_cli, fresh_and_random_models,
                            small_config, trained_baseline)

V, L, B = 64, 16, 4  # one batch shape: each jitted function compiles once


def ar_config():
  return baseline_config("ar", V, L)


forward = nnx.jit(lambda model, ids: model(ids))


@pytest.fixture(scope="module")
def model() -> ar.ARTransformer:
  """Random weights everywhere (the zero-initialised head would make every logit 0)."""
  return fresh_and_random_models(ar_config())[1]


def test_objective_name_selects_the_causal_model():
  abstract = lambda cfg: nnx.eval_shape(lambda: methods.create_model(cfg))
  assert isinstance(abstract(ar_config()), ar.ARTransformer)
  assert not isinstance(abstract(small_config()), ar.ARTransformer)


@pytest.mark.parametrize("prompt_len", [0, 5])
def test_kv_cache_decode_matches_full_causal_forward(model, prompt_len):
  prompt = jax.random.randint(jax.random.PRNGKey(1), (B, prompt_len), 0, V)
  ids, logits = ar.generate(model, jax.random.PRNGKey(2), L, prompt_BxP=prompt, return_logits=True)
  assert ids.shape == (B, L) and logits.shape == (B, L, V)
  np.testing.assert_array_equal(np.asarray(ids[:, :prompt_len]), np.asarray(prompt))
  full = forward(model, ids)
  assert float(jnp.max(jnp.abs(full))) > 1.0  # non-trivial logits
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full), atol=2e-5, rtol=1e-5)


def test_greedy_decoding_is_deterministic_and_follows_the_argmax(model):
  prompt = jnp.asarray([[3, 7], [11, 2], [0, 0], [63, 5]], jnp.int32)
  a = ar.generate(model, jax.random.PRNGKey(0), L, prompt_BxP=prompt, greedy=True)
  b = ar.generate(model, jax.random.PRNGKey(9), L, prompt_BxP=prompt, greedy=True)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  argmax = np.asarray(jnp.argmax(forward(model, a), axis=-1))
  np.testing.assert_array_equal(np.asarray(a)[:, 2:], argmax[:, 2:])
  # a vanishing nucleus leaves only the most likely token: sampling becomes greedy
  c = ar.generate(model, jax.random.PRNGKey(5), L, prompt_BxP=prompt, top_p=1e-6)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_sampling_is_a_function_of_the_key(model):
  draw = lambda seed, **kw: np.asarray(ar.generate(model, jax.random.PRNGKey(seed), L, batch_size=B, **kw))
  np.testing.assert_array_equal(draw(3), draw(3))
  assert (draw(3) != draw(4)).any()
  np.testing.assert_array_equal(draw(3, top_p=0.8, temperature=0.7), draw(3, top_p=0.8, temperature=0.7))


def test_nucleus_filter_keeps_the_smallest_set_holding_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda p: np.isfinite(np.asarray(ar.nucleus_filter(logits, p)))[0].tolist()
  assert kept(0.5) == [True, False, False, False]
  assert kept(0.6) == [True, True, False, False]
  assert kept(0.9) == [True, True, True, False]
  assert kept(1.0) == [True, True, True, True]


def test_causality_later_tokens_do_not_change_earlier_logits(model):
  ids = jax.random.randint(jax.random.PRNGKey(4), (B, L), 0, V)
  changed = ids.at[:, 9].set((ids[:, 9] + 1) % V)
  a, b = np.asarray(forward(model, ids)), np.asarray(forward(model, changed))
  np.testing.assert_array_equal(a[:, :10], b[:, :10])  # logits[t] sees x_<t only
  assert np.abs(a[:, 10:] - b[:, 10:]).max() > 1e-3


def test_scorer_nll_equals_mean_cross_entropy_of_the_forward_pass(model):
  ids = jax.random.randint(jax.random.PRNGKey(6), (B, L), 0, V)
  mask = np.ones((B, L), bool)
  mask[2, 11:] = False  # a right-padded sequence of 11 tokens
  ce = np.asarray(objective.token_cross_entropy(forward(model, ids), ids))
  nll, count = ar.sequence_nll(model, ids, mask)
  np.testing.assert_array_equal(np.asarray(count), [L - 1, L - 1, 10, L - 1])
  expected = [ce[i, 1:mask[i].sum()].mean() for i in range(B)]
  np.testing.assert_allclose(np.asarray(nll) / np.asarray(count), expected, rtol=1e-5)
  nll_all, count_all = ar.sequence_nll(model, ids, score_first=True)
  np.testing.assert_allclose(np.asarray(nll_all) / np.asarray(count_all), ce.mean(-1), rtol=1e-5)
  # Gen. PPL: token-weighted over two batches with unequal token counts
  both, both_mask = np.concatenate([ids, ids[::-1]]), np.concatenate([mask, np.ones_like(mask)])
  rows = [row[:m.sum()] for row, m in zip(np.asarray(both), both_mask)]
  out = metrics.generative_perplexity(rows, ar.sequence_scorer(model, batch_size=B))
  total = 2 * sum(ce[i, 1:mask[i].sum()].sum() for i in range(B)) + ce[2, 11:].sum()
  assert out["scored_tokens"] == 2 * B * (L - 1) - 5
  np.testing.assert_allclose(out["gen_ppl"], np.exp(total / out["scored_tokens"]), rtol=1e-5)


def test_parameters_carry_logical_axes_the_sharding_rules_know(model):
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  for path, var in flat:
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == var[...].ndim, path
    assert all(a in parallel.LOGICAL_RULES for a in axes), (path, axes)
  names = {".".join(map(str, p)) for p, _ in flat}
  langflow = nnx.eval_shape(lambda: create_langflow(small_config(n_blocks=2)))
  langflow = {".".join(map(str, p)).removeprefix("backbone.")
              for p, _ in nnx.to_flat_state(nnx.state(langflow, nnx.Param))}
  shared = {n for n in langflow if "ada" not in n and "sigma_map" not in n and "schedule" not in n
            and "self_cond" not in n}
  assert shared <= names and names - shared == {"start_embedding"}


def test_ar_objective_scores_every_valid_token(model):
  ids = jax.random.randint(jax.random.PRNGKey(7), (B, L), 0, V)
  mask = jnp.ones((B, L), bool).at[1, 12:].set(False)
  out = jax.jit(lambda ids, mask: ar.objective(model, ids, mask, jax.random.PRNGKey(0),
                                                cfg=ar_config().objective))(ids, mask)
  ce = np.asarray(objective.token_cross_entropy(forward(model, ids), ids)) * np.asarray(mask)
  assert float(out.terms.num_tokens) == float(mask.sum()) and float(out.terms.num_seqs) == B
  np.testing.assert_allclose(float(out.terms.ce_sum), ce.sum(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out.ce_per_token_B), ce.sum(-1) / np.asarray(mask).sum(-1), rtol=1e-5)
  assert float(out.terms.schedule_fit_sum) == 0 and not np.asarray(out.gamma_B).any()


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
  return trained_baseline(tmp_path_factory, "ar", steps=25)


def test_train_and_evaluate_loss_falls_and_the_ar_model_loads(ar_run):
  cfg, summary, _ = ar_run
  ce = check_baseline_run(ar_run, 25, ar.ARTransformer)
  np.testing.assert_allclose(ce[0], np.log(cfg.model.vocab_size), rtol=1e-4)  # zero-init head: uniform
  assert ce[-1] < 0.5 * ce[0]
  assert not any(k.startswith("schedule/") for k in summary["train"])


def test_sample_baseline_cli_prints_ar_samples(ar_run, capsys):
  check_sample_baseline_cli(ar_run[2], capsys, "--config.sample.top_p=0.9")


def test_user_mistakes_are_config_errors(model):
  with pytest.raises(ConfigError, match="leaves nothing to generate"):
    ar.generate(model, jax.random.PRNGKey(0), 4, prompt_BxP=jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ConfigError, match="top_p"):
    ar.generate(model, jax.random.PRNGKey(0), 4, batch_size=1, top_p=0.0)
  with pytest.raises(ConfigError, match="max_length"):
    ar.generate(model, jax.random.PRNGKey(0), L + 1, batch_size=1)
  cfg = small_config()
  with pytest.raises(ConfigError, match="did not train the autoregressive baseline"):
    ar.sample_texts(nnx.eval_shape(lambda: create_langflow(cfg)), None, cfg.sample, 8)


def test_genppl_scores_samples_with_an_ar_run(ar_run, tmp_path, capsys):
  """``genppl --scorer ar:RUN_DIR``: the AR baseline's Gen. PPL, ids scored as they are."""
  from langflow_jax import config as config_lib
  from langflow_jax import genppl

  cfg, _, workdir = ar_run
  _, model = train.load_model(workdir)
  rng = np.random.default_rng(0)
  ids = [rng.integers(0, cfg.model.vocab_size, n).tolist() for n in (32, 20, 32)]  # one shorter sample
  samples = tmp_path / "samples.json"
  generator = small_config()  # a LangFlow run with the same tokenizer wrote them
  samples.write_text(json.dumps({"meta": {"config": config_lib.to_json(generator)},
                                 "samples": [{"ids": s} for s in ids]}))
  assert cli.main(["genppl", "--samples", str(samples), "--scorer", f"ar:{workdir}", "--no-reference", "--json"]) == 0
  printed = capsys.readouterr().out
  result = json.loads(printed[printed.index("{"):])
  assert result["scorer"].startswith(f"AR baseline from {workdir}")
  nll = sum(float(ar.sequence_nll(model, np.asarray([s]))[0][0]) for s in ids)
  assert result["samples"]["scored_tokens"] == 31 + 19 + 31
  np.testing.assert_allclose(result["samples"]["nll_per_token"], nll / 81, rtol=1e-5)
  assert "ar" in genppl.SCORER_LOADERS
  assert cli.main(["genppl", "--samples", str(samples), "--scorer", "ar"]) == 2
  assert "--scorer ar needs a run directory" in capsys.readouterr().err
