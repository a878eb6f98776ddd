"""langflow_jax: LangFlow (continuous diffusion in token-embedding space) in JAX/Flax NNX."""

__version__ = "0.1.0"
