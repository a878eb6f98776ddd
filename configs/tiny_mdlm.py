"""tiny_mdlm: the masked diffusion (MDLM) baseline at the size of ``tiny``, on the same data.

  langflow-jax train --config tiny_mdlm --workdir runs/tiny_mdlm
  langflow-jax sample-baseline --workdir runs/tiny_mdlm --config.sample.steps=64

The ``tiny`` config with ``objective.name=mdlm``: the same width, heads, MLP,
tokenizer, sequence length, optimizer and step budget, a bidirectional
backbone without noise conditioning over the vocabulary plus [MASK]
(langflow_jax/baselines/mdlm.py), trained on MDLM's absorbing-state NELBO
(the CE the trainer prints is that bound, nats/token). Any config becomes its
MDLM twin the same way: ``--config.objective.name=mdlm``.
"""

from langflow_jax.config import load_config


def get_config():
  c = load_config("tiny")
  c.objective.name = "mdlm"
  return c
