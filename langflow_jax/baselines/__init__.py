"""Baselines trained and evaluated by the same code as LangFlow."""

from __future__ import annotations


def sample_texts(model, tokenizer, sample_cfg, length: int, prompt: str = "") -> list[str]:
  """Decoded samples of a trained baseline, by its kind: AR (``ar``) or masked diffusion (``mdlm``)."""
  from langflow_jax.baselines import ar, mdlm
  from langflow_jax.errors import ConfigError

  for module, model_class in ((ar, ar.ARTransformer), (mdlm, mdlm.MaskedDiffusionLM)):
    if isinstance(model, model_class):
      return module.sample_texts(model, tokenizer, sample_cfg, length, prompt)
  raise ConfigError("this run did not train a baseline.",
                    "pass the --workdir of a run trained with --config.objective.name=ar or mdlm.")
