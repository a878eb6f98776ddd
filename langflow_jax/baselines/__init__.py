"""Baselines trained and evaluated by the same code as LangFlow: the autoregressive
Transformer (:mod:`.ar`) and masked diffusion (:mod:`.mdlm`). :mod:`langflow_jax.methods`
registers them next to LangFlow."""
