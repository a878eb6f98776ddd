"""tiny_ar: the autoregressive baseline at the size of ``tiny``, on the same data.

  langflow-jax train --config tiny_ar --workdir runs/tiny_ar
  langflow-jax sample-baseline --workdir runs/tiny_ar --prompt "The Congress" --config.sample.top_p=0.9

The ``tiny`` config with ``objective.name=ar``: the same width, heads, MLP,
tokenizer, sequence length, optimizer and step budget, a causal backbone
without noise conditioning (langflow_jax/baselines/ar.py). Any config becomes
its AR twin the same way: ``--config.objective.name=ar``.
"""

from langflow_jax.config import load_config


def get_config():
  c = load_config("tiny")
  c.objective.name = "ar"
  return c
