"""Tokenizers, corpora and the input pipeline."""
