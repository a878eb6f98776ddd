"""Baselines trained and evaluated by the same code as LangFlow."""
