"""The demo's report pieces (``make demo`` itself runs in CI's clean-clone check)."""

import numpy as np

from langflow_jax import demo, methods
from langflow_jax.data import pipeline
from tests.conftest import small_config


def test_an_untrained_model_with_the_unigram_head_is_the_context_free_denoiser_at_every_gamma(tmp_path):
  cfg = small_config(logit_init_std=0.0)  # the official zero head
  cfg.eval.batch_size = 4
  model = methods.create_model(cfg, 0)
  train_split = pipeline.load_split(cfg.data, "train")
  log_prior_V = pipeline.unigram_log_prior(train_split, cfg.model.vocab_size)
  # zero-initialised network + this bias: the skip likelihood times the unigram prior
  model.backbone.output_layer.linear.bias[...] = log_prior_V - log_prior_V.mean()
  lines = []
  out = demo.denoising_comparison(model, cfg, train_split, tmp_path / "curve.png", print_fn=lines.append)
  model_G, ref_G = np.asarray(out["model_ce"]), np.asarray(out["context_free_ce"])
  assert len(model_G) == len(demo.DEMO_QUANTILES) and np.all(np.diff(out["gamma"]) > 0)
  np.testing.assert_allclose(model_G, ref_G, atol=2e-3)
  assert ref_G[-1] > ref_G[0]  # more noise, less known
  assert any("from context" in l for l in lines) and (tmp_path / "curve.png").is_file()
