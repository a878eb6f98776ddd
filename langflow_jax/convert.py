"""Official LangFlow checkpoints (``config.json`` + ``model.safetensors``) <-> ours.

The official state dict and our parameter tree differ only in names and in the
transposition of Linear weights (torch ``[out, in]``, NNX ``[in, out]``), so
the mapping is one table. Nothing is dropped silently: an unmapped, missing or
mis-shaped tensor is a :class:`CheckpointError`. A release is read from a local
directory or straight from the Hugging Face hub (``hf:OWNER/NAME[@REVISION]``,
through its cache, so ``HF_HUB_OFFLINE=1`` reads a populated cache).
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from langflow_jax import config as config_lib
from langflow_jax.errors import CheckpointError
from langflow_jax.model import LangFlow, flat_params, rotary_inv_freq

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


def _mapping() -> list[tuple[str, str, bool]]:
  """(official template, our template, transpose) for every tensor kind."""
  rows = []
  for official, ours in _LINEAR:
    rows.append((official + ".weight", ours + ".kernel", True))
    rows.append((official + ".bias", ours + ".bias", False))
  rows += [(official, ours, False) for official, ours in _DIRECT]
  return rows


def _translate(name: str, source_col: int) -> tuple[str, bool] | None:
  """Maps a name through the table (0: official -> ours, 1: ours -> official)."""
  for row in _mapping():
    pattern = re.escape(row[source_col]).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$"
    match = re.match(pattern, name)
    if match:
      return row[1 - source_col].replace("{i}", match.groupdict().get("i") or ""), row[2]
  return None


def official_to_ours(name: str) -> tuple[str, bool]:
  """Our dotted path for an official key, and whether to transpose it."""
  found = _translate(name, 0)
  if found is None:
    raise CheckpointError(f"official tensor '{name}' has no counterpart in langflow_jax.",
                          "check that the checkpoint is a LangFlow release; report the key if it is.")
  return found


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


def config_to_official(model_cfg: ml_collections.ConfigDict,
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
  embedding = tensors.get("backbone.vocab_embed.embedding")
  if embedding is not None and embedding.shape[0] != config.model.vocab_size:
    # the tokenizer and protocol follow vocab_size: a mismatch must not pass unnoticed
    raise CheckpointError(
        f"config.json says vocab_size={config.model.vocab_size}, but the weights have "
        f"{embedding.shape[0]} token embeddings (backbone.vocab_embed.embedding {tuple(embedding.shape)}).",
        "the weights do not match config.json; use the pair published together.")
  model = nnx.eval_shape(lambda: LangFlow(config.model, config.schedule, rngs=nnx.Rngs(0)))
  load_tensors(model, tensors)
  return config, model


def load_tensors(model: LangFlow, tensors: dict[str, np.ndarray]) -> None:
  """Fills ``model``'s parameters from an official state dict, checking everything."""
  targets = flat_params(model)
  seen = set()
  # A formula, so recompute it when absent; when present, keep the stored
  # float32 values (torch's pow may differ from ours in the last bit).
  inv_freq = rotary_inv_freq(2 * model.backbone.rotary_inv_freq.shape[0])
  for name, value in tensors.items():
    if name == INV_FREQ_KEY:
      if value.shape != inv_freq.shape or not np.allclose(value, inv_freq, rtol=1e-6, atol=1e-7):
        raise CheckpointError(f"{INV_FREQ_KEY} differs from the RoPE formula (base 10000).",
                              "this checkpoint uses a different rotary base; it is not supported.")
      inv_freq = jnp.asarray(value, jnp.float32)
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
  model.backbone.rotary_inv_freq.set_value(inv_freq)


def export_tensors(model: LangFlow) -> dict[str, np.ndarray]:
  """The official state dict (numpy float32) for ``model``."""
  out = {}
  for path, var in flat_params(model).items():
    found = _translate(path, 1)
    if found is None:
      raise CheckpointError(f"parameter '{path}' has no official name.",
                            "only LangFlow models with the official layout can be exported.")
    official, transpose = found
    array = np.asarray(jax.device_get(var[...]), np.float32)
    out[official] = np.ascontiguousarray(array.T if transpose else array)
  out[INV_FREQ_KEY] = np.asarray(model.backbone.rotary_inv_freq[...], np.float32)
  return out


HUB_PREFIX = "hf:"
# Only what load_official reads: a release repository may hold more (a README, torch weights).
RELEASE_FILES = ("config.json", "model.safetensors")
# OWNER/NAME as the hub spells repository ids, then an optional @branch, tag or commit.
_HUB_SPEC = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?")
_HUB_EXAMPLE = "hf:Continuous-Rivals-Discrete/langflow-owt"


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
  """(repo id, revision or None) of ``hf:OWNER/NAME[@REVISION]``."""
  match = _HUB_SPEC.fullmatch(spec[len(HUB_PREFIX):])
  if match is None:
    raise CheckpointError(f"--from {spec!r} is not a hub repository (expected hf:OWNER/NAME[@REVISION]).",
                          f"name the repository, e.g. --from {_HUB_EXAMPLE} (or @REVISION for a branch, tag "
                          "or commit), or pass a local directory.")
  return match["repo"], match["revision"]


def hub_offline() -> bool:
  """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as huggingface_hub reads it, but at call time:
  the library reads it once at import, which would miss a later change."""
  value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
  return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def download_release(spec: str) -> pathlib.Path:
  """The local snapshot directory of a hub release, downloaded into the hub cache unless it is there.

  Offline (``HF_HUB_OFFLINE=1``) nothing is requested and the cache must hold
  the revision; online, a hub that cannot be reached also falls back to the
  cache. Every failure is one :class:`CheckpointError` naming the fix.
  """
  repo_id, revision = parse_hub_spec(spec)
  try:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                       RevisionNotFoundError)
  except ImportError as e:
    raise CheckpointError(f"--from {spec} needs the huggingface_hub package, which is not installed.",
                          "pip install 'langflow-jax[hub]' (or huggingface_hub), or pass a local directory.") from e

  from langflow_jax.data.tokenizer import hub_cache_dir

  offline, cache = hub_offline(), hub_cache_dir()
  where = repo_id + (f" at revision {revision}" if revision else "")
  get_it = (f"run `hf download {repo_id} {' '.join(RELEASE_FILES)}{f' --revision {revision}' if revision else ''}` "
            f"(`huggingface-cli download` before huggingface_hub 1.0) on a machine with internet and copy its hub "
            f"cache to {cache}, or add --local-dir DIR to that command and pass --from DIR here")
  try:
    # HF_ENDPOINT (a mirror) at call time too, as the cache and the offline switch.
    snapshot = pathlib.Path(snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                              allow_patterns=list(RELEASE_FILES), local_files_only=offline,
                                              endpoint=os.environ.get("HF_ENDPOINT") or None))
  except HFValidationError as e:  # a name the hub does not allow ("--", "..", ".git" ending)
    raise CheckpointError(f"--from {spec!r} is not a valid hub repository id ({' '.join(str(e).split())}).",
                          f"name the repository as the hub spells it, e.g. --from {_HUB_EXAMPLE}.") from e
  except RevisionNotFoundError as e:
    raise CheckpointError(f"the hub repository {repo_id} has no revision '{revision}'.",
                          "give a branch, tag or commit of it, or leave @REVISION out for main.") from e
  except RepositoryNotFoundError as e:  # also a private or gated one without access
    raise CheckpointError(f"the hub has no repository {repo_id} that this machine may read (missing, private "
                          "or gated).", f"check the name (e.g. {_HUB_EXAMPLE}), or log in with `hf auth login` "
                          "for a repository you have access to.") from e
  except LocalEntryNotFoundError as e:
    if offline:
      raise CheckpointError(f"{where} is not in the Hugging Face cache {cache}, and offline mode "
                            "(HF_HUB_OFFLINE=1) forbids downloading it.",
                            f"set HF_HUB_OFFLINE=0 where there is network, or {get_it}.") from e
    raise CheckpointError(f"cannot reach the Hugging Face hub for {where}, and the cache {cache} does not hold "
                          f"it ({type(e.__cause__ or e).__name__}).",
                          f"check the network (or HF_ENDPOINT), or {get_it}.") from e
  missing = [name for name in RELEASE_FILES if not (snapshot / name).is_file()]
  if missing:  # a partial snapshot: hf_hub_download of one file, or an interrupted download
    raise CheckpointError(f"the cached snapshot {snapshot} of {where} lacks {', '.join(missing)}.",
                          f"download it again with network (HF_HUB_OFFLINE=0), or {get_it}.")
  return snapshot


def release_dir(source: str | pathlib.Path) -> tuple[pathlib.Path, str]:
  """(local release directory, where it came from) for ``--from``: a directory, or ``hf:OWNER/NAME[@REVISION]``
  resolved to its hub snapshot (named with the commit it resolved to, so the run records exactly what it holds)."""
  if isinstance(source, str) and source.startswith(HUB_PREFIX):
    snapshot = download_release(source)
    return snapshot, f"{HUB_PREFIX}{parse_hub_spec(source)[0]}@{snapshot.name}"
  directory = pathlib.Path(source).expanduser()
  return directory, str(directory.resolve())


# Tokenizer and dataset of each official vocabulary size (method §7.1).
_PROTOCOLS = {50257: ("gpt2", "owt"), 30522: ("bert-base-uncased", "lm1b")}


def convert_official(source: str | pathlib.Path, workdir: str | pathlib.Path) -> pathlib.Path:
  """Writes an official release (a directory or ``hf:OWNER/NAME[@REVISION]``) as a run directory
  that ``eval``/``sample`` read.

  The weights become both the raw and the EMA parameters of a step-0 train
  state (the release holds the evaluated weights), with a fresh optimizer.
  """
  from langflow_jax import checkpoint as ckpt_lib
  from langflow_jax import train_state

  workdir = pathlib.Path(workdir).expanduser()
  # Checked before the release is read (from the hub, a download of gigabytes), and
  # read-only, so that a release that fails to load leaves no directory behind.
  if ckpt_lib.checkpoint_dir(workdir).is_dir():
    existing = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), read_only=True)
    try:
      if existing.latest_step() is not None:
        raise CheckpointError(f"{workdir} already holds checkpoints.", "convert into a new, empty --workdir.")
    finally:
      existing.close()
  directory, origin = release_dir(source)
  config, model = load_official(directory)
  if config.model.vocab_size in _PROTOCOLS:
    config.data.tokenizer, config.data.name = _PROTOCOLS[config.model.vocab_size]
  tx = train_state.make_optimizer(config.optimizer, config.train.steps)
  ckpt_lib.save_state(workdir, 0, train_state.state_from_model(model, tx, config.train.seed), config,
                      {"converted_from": origin})
  (workdir / "config.json").write_text(config_lib.to_json(config))
  return workdir


def export_official(workdir: str | pathlib.Path, out_dir: str | pathlib.Path, use_ema: bool = True) -> pathlib.Path:
  """Writes a run's weights (EMA by default) as ``config.json`` + ``model.safetensors``."""
  from safetensors.numpy import save_file

  from langflow_jax import checkpoint as ckpt_lib

  config, model = ckpt_lib.load_model(workdir, use_ema=use_ema)
  if config.schedule.name != "gumbel" or not config.model.use_skip:
    raise CheckpointError(
        f"the official layout needs the Gumbel schedule and skip logits (this run: schedule "
        f"'{config.schedule.name}', use_skip={config.model.use_skip}).",
        "export only models trained with --config.schedule.name=gumbel and model.use_skip=true.")
  out_dir = pathlib.Path(out_dir).expanduser()
  out_dir.mkdir(parents=True, exist_ok=True)
  official_cfg = config_to_official(config.model, config.schedule)
  # The learned schedule lives in the tensors; the config holds its values too.
  official_cfg.update(gumbel_loc=float(model.schedule.loc[...]), gumbel_scale=float(model.schedule.scale[...]),
                      gumbel_entropy=float(model.schedule.entropy[...]))
  (out_dir / "config.json").write_text(json.dumps(official_cfg, indent=2))
  save_file(export_tensors(model), str(out_dir / "model.safetensors"))
  return out_dir
