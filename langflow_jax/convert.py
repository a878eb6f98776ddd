"""Official LangFlow checkpoints (``config.json`` + ``model.safetensors``) <-> ours.

The official state dict and our parameter tree differ only in names and in the
transposition of Linear weights (torch ``[out, in]``, NNX ``[in, out]``), so
the mapping is one table. Nothing is dropped silently: an unmapped, missing or
mis-shaped tensor is a :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from langflow_jax import config as config_lib
from langflow_jax.errors import CheckpointError
from langflow_jax.model import LangFlow, rotary_inv_freq

# (official name pattern, our path template, transpose). {i} is the block index.
_LINEAR = [
    ("backbone.sigma_map.mlp.0", "backbone.sigma_map.linear_1"),
    ("backbone.sigma_map.mlp.2", "backbone.sigma_map.linear_2"),
    ("backbone.blocks.{i}.attn_qkv", "backbone.blocks.{i}.attn_qkv"),
    ("backbone.blocks.{i}.attn_out", "backbone.blocks.{i}.attn_out"),
    ("backbone.blocks.{i}.mlp.0", "backbone.blocks.{i}.mlp_1"),
    ("backbone.blocks.{i}.mlp.2", "backbone.blocks.{i}.mlp_2"),
    ("backbone.blocks.{i}.adaLN_modulation", "backbone.blocks.{i}.ada"),
    ("backbone.output_layer.adaLN_modulation", "backbone.output_layer.ada"),
    ("backbone.output_layer.linear", "backbone.output_layer.linear"),
    ("backbone.self_cond_proj", "backbone.self_cond_proj"),
]
_DIRECT = [
    ("backbone.vocab_embed.embedding", "backbone.vocab_embed.embedding"),
    ("backbone.blocks.{i}.norm1.weight", "backbone.blocks.{i}.norm1.scale"),
    ("backbone.blocks.{i}.norm2.weight", "backbone.blocks.{i}.norm2.scale"),
    ("backbone.output_layer.norm_final.weight", "backbone.output_layer.norm_final.scale"),
    ("proposal.loc", "schedule.loc"),
    ("proposal.scale", "schedule.scale"),
    ("proposal.entropy", "schedule.entropy"),
]
INV_FREQ_KEY = "backbone.rotary_emb.inv_freq"


def _rules() -> list[tuple[re.Pattern, str, bool]]:
  rules = []
  for official, ours in _LINEAR:
    for suffix, target, transpose in ((".weight", ".kernel", True), (".bias", ".bias", False)):
      rules.append((official + suffix, ours + target, transpose))
  rules += [(official, ours, False) for official, ours in _DIRECT]
  compiled = []
  for official, ours, transpose in rules:
    pattern = re.escape(official).replace(re.escape("{i}"), r"(?P<i>\d+)")
    compiled.append((re.compile(pattern + "$"), ours, transpose))
  return compiled


def official_to_ours(name: str) -> tuple[str, bool]:
  """Our dotted path for an official key, and whether to transpose it."""
  for pattern, ours, transpose in _rules():
    match = pattern.match(name)
    if match:
      return ours.replace("{i}", match.groupdict().get("i") or ""), transpose
  raise CheckpointError(f"official tensor '{name}' has no counterpart in langflow_jax.",
                        "check that the checkpoint is a LangFlow release; report the key if it is.")


def config_from_official(official: dict) -> ml_collections.ConfigDict:
  """Our config for an official ``config.json`` (model and schedule groups)."""
  c = config_lib.base_config()
  try:
    c.model.vocab_size = int(official["vocab_size"])
    c.model.hidden_size = int(official["hidden_size"])
    c.model.cond_dim = int(official["cond_dim"])
    c.model.n_blocks = int(official["n_blocks"])
    c.model.n_heads = int(official["n_heads"])
    c.model.dropout = float(official.get("dropout", 0.1))
    c.model.max_length = int(official["model_length"])
    c.model.normalize_embedding = bool(official.get("use_normalized_embedding", True))
    c.model.self_conditioning = bool(official.get("self_conditioning", True))
    c.model.use_skip = bool(official.get("use_bias", True))
    c.schedule.name = "gumbel"
    c.schedule.loc = float(official.get("gumbel_loc", 4.723))
    c.schedule.scale = float(official.get("gumbel_scale", 0.852))
    c.schedule.entropy = float(official.get("gumbel_entropy", 7.02))
    c.schedule.cutoff = float(official.get("gumbel_cutoff", 1e-5))
  except KeyError as e:
    raise CheckpointError(f"official config.json lacks the key {e}.",
                          "use the config.json published with the checkpoint.") from e
  c.data.seq_len = c.model.max_length
  return c


def official_to_config(model_cfg: ml_collections.ConfigDict,
                       schedule_cfg: ml_collections.ConfigDict) -> dict:
  """The official ``config.json`` dict for our model/schedule config."""
  return {
      "model_type": "LangFlow",
      "vocab_size": model_cfg.vocab_size,
      "hidden_size": model_cfg.hidden_size,
      "cond_dim": model_cfg.cond_dim,
      "n_blocks": model_cfg.n_blocks,
      "n_heads": model_cfg.n_heads,
      "dropout": model_cfg.dropout,
      "model_length": model_cfg.max_length,
      "use_normalized_embedding": model_cfg.normalize_embedding,
      "embedding_norm_method": "layernorm",
      "self_conditioning": model_cfg.self_conditioning,
      "use_bias": model_cfg.use_skip,
      "gumbel_loc": schedule_cfg.loc,
      "gumbel_scale": schedule_cfg.scale,
      "gumbel_cutoff": schedule_cfg.cutoff,
      "gumbel_entropy": schedule_cfg.entropy,
      "return_dict": True,
      "torch_dtype": "float32",
      "transformers_version": "4.38.2",
  }


def _flat_params(model: LangFlow) -> dict[str, nnx.Variable]:
  flat = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    flat[".".join(str(p) for p in path)] = var
  return flat


def load_official(directory: str | pathlib.Path) -> tuple[ml_collections.ConfigDict, LangFlow]:
  """Reads an official release directory into our config and model (float32)."""
  from safetensors.numpy import load_file  # optional at import time

  directory = pathlib.Path(directory)
  config_path, weights_path = directory / "config.json", directory / "model.safetensors"
  for path in (config_path, weights_path):
    if not path.is_file():
      raise CheckpointError(f"{path} does not exist.",
                            "point --from at a directory holding config.json and model.safetensors.")
  try:
    official_cfg = json.loads(config_path.read_text())
    tensors = load_file(str(weights_path))
  except Exception as e:  # a corrupted file: say which
    raise CheckpointError(f"cannot read the official checkpoint in {directory} ({e}).",
                          "download config.json and model.safetensors again.") from e
  config = config_from_official(official_cfg)
  if "backbone.vocab_embed.embedding" in tensors:
    config.model.vocab_size = int(tensors["backbone.vocab_embed.embedding"].shape[0])
  model = nnx.eval_shape(lambda: LangFlow(config.model, config.schedule, rngs=nnx.Rngs(0)))
  load_tensors(model, tensors)
  return config, model


def load_tensors(model: LangFlow, tensors: dict[str, np.ndarray]) -> None:
  """Fills ``model``'s parameters from an official state dict, checking everything."""
  targets = _flat_params(model)
  seen = set()
  for name, value in tensors.items():
    if name == INV_FREQ_KEY:
      expected = np.asarray(rotary_inv_freq(2 * value.shape[0]))
      if value.shape != expected.shape or not np.allclose(value, expected, rtol=1e-6, atol=1e-7):
        raise CheckpointError(f"{INV_FREQ_KEY} differs from the RoPE formula (base 10000).",
                              "this checkpoint uses a different rotary base; it is not supported.")
      continue
    ours, transpose = official_to_ours(name)
    if ours not in targets:
      raise CheckpointError(f"official tensor '{name}' maps to '{ours}', which this model lacks.",
                            "check config.json (self_conditioning, n_blocks) against the weights.")
    array = np.asarray(value, np.float32)
    array = array.T if transpose else array
    if array.shape != tuple(targets[ours].shape):
      raise CheckpointError(
          f"official tensor '{name}' has shape {value.shape}; expected {tuple(targets[ours].shape)}"
          f"{' transposed' if transpose else ''}.",
          "the weights do not match config.json; use the pair published together.")
    targets[ours].set_value(jnp.asarray(array))
    seen.add(ours)
  missing = sorted(set(targets) - seen)
  if missing:
    raise CheckpointError(f"the official checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}.",
                          "the file is incomplete; download it again.")
  # Under eval_shape the buffer is abstract; it is a formula, so recompute it.
  model.backbone.rotary_inv_freq.set_value(
      rotary_inv_freq(2 * model.backbone.rotary_inv_freq.shape[0]))


def export_tensors(model: LangFlow) -> dict[str, np.ndarray]:
  """The official state dict (numpy float32) for ``model``."""
  out = {}
  ours_to_official = {}
  n_blocks = len(model.backbone.blocks)
  for pattern, ours, transpose in _rules():
    template = pattern.pattern
    for i in range(n_blocks) if "(?P<i>" in template else [None]:
      official = template.replace(r"(?P<i>\d+)", str(i)).rstrip("$").replace("\\", "")
      path = ours.replace("{i}", "" if i is None else str(i))
      ours_to_official[path] = (official, transpose)
  for path, var in _flat_params(model).items():
    if path not in ours_to_official:
      raise CheckpointError(f"parameter '{path}' has no official name.",
                            "only LangFlow models with the official layout can be exported.")
    official, transpose = ours_to_official[path]
    array = np.asarray(jax.device_get(var[...]), np.float32)
    out[official] = np.ascontiguousarray(array.T if transpose else array)
  out[INV_FREQ_KEY] = np.asarray(model.backbone.rotary_inv_freq[...], np.float32)
  return out
