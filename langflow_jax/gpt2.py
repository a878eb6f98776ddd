"""GPT-2 in Flax NNX, loaded from a Hugging Face directory: the official Gen. PPL scorer.

The official protocol (method §6.2) scores samples with ``gpt2-large``. Nothing
is downloaded here: point ``langflow-jax genppl --scorer gpt2:DIR`` at a
directory holding a GPT-2 checkpoint in the Hugging Face layout
(``config.json``, ``model.safetensors`` and ``tokenizer.json`` or
``vocab.json`` + ``merges.txt``), e.g. a local copy of ``gpt2-large``.

Architecture (HF ``GPT2LMHeadModel``, evaluation mode): token + learned
position embeddings; pre-LayerNorm blocks with causal multi-head attention
(fused q/k/v projection, scores / sqrt(d_head)) and a 4x MLP with tanh-GELU;
a final LayerNorm; logits tied to the token embedding. HF's ``Conv1D``
stores weights as [in, out], which is already a kernel. Float32 throughout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from langflow_jax.errors import CheckpointError, DataError
from langflow_jax.model import flat_params

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None
  layer_norm_epsilon: float = 1e-5

  @classmethod
  def from_hf(cls, values: dict) -> "GPT2Config":
    act = values.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      raise CheckpointError(f"GPT-2 activation '{act}' is not supported.", "use a standard GPT-2 checkpoint.")
    keys = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in keys})


class LayerNorm(nnx.Module):
  def __init__(self, dim: int, eps: float):
    self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.weight[...] + self.bias[...]


class Conv1D(nnx.Module):
  """HF's Conv1D: y = x W + b with W stored [in, out]."""

  def __init__(self, n_in: int, n_out: int, rngs: nnx.Rngs):
    self.weight = nnx.Param(0.02 * jax.random.normal(rngs.params(), (n_in, n_out), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((n_out,), jnp.float32))

  def __call__(self, x: Array) -> Array:
    return x @ self.weight[...] + self.bias[...]


class Attention(nnx.Module):
  def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
    self.n_head = cfg.n_head
    self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd, rngs)
    self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd, rngs)

  def __call__(self, x_BxLxD: Array) -> Array:
    b, l, d = x_BxLxD.shape
    h = self.n_head
    q, k, v = jnp.split(self.c_attn(x_BxLxD), 3, axis=-1)
    q, k, v = (t.reshape(b, l, h, d // h) for t in (q, k, v))
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(d // h)
    causal = jnp.tril(jnp.ones((l, l), bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(scores, axis=-1), v)
    return self.c_proj(out.reshape(b, l, d))


class MLP(nnx.Module):
  def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
    inner = cfg.n_inner or 4 * cfg.n_embd
    self.c_fc = Conv1D(cfg.n_embd, inner, rngs)
    self.c_proj = Conv1D(inner, cfg.n_embd, rngs)

  def __call__(self, x: Array) -> Array:
    return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))


class Block(nnx.Module):
  def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
    self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
    self.attn = Attention(cfg, rngs)
    self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x: Array) -> Array:
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class Embedding(nnx.Module):
  def __init__(self, n: int, dim: int, rngs: nnx.Rngs):
    self.weight = nnx.Param(0.02 * jax.random.normal(rngs.params(), (n, dim), jnp.float32))


class GPT2(nnx.Module):
  """GPT-2 LM: ids [B, L] -> next-token logits [B, L, V], float32."""

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    self.config = cfg
    self.wte = Embedding(cfg.vocab_size, cfg.n_embd, rngs)
    self.wpe = Embedding(cfg.n_positions, cfg.n_embd, rngs)
    self.h = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
    self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)

  def __call__(self, ids_BxL: Array) -> Array:
    length = ids_BxL.shape[1]
    x = jnp.take(self.wte.weight[...], ids_BxL, axis=0) + self.wpe.weight[...][:length][None]
    for block in self.h:
      x = block(x)
    return self.ln_f(x) @ self.wte.weight[...].T


def hf_name(name: str) -> str | None:
  """Our parameter name for an HF state-dict key; None for buffers and the tied head."""
  name = name.removeprefix("transformer.")
  if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
    return None
  return name


def load_tensors(model: GPT2, tensors: dict[str, np.ndarray]) -> None:
  """Fills ``model`` from an HF GPT-2 state dict; every parameter must be present."""
  targets = flat_params(model)
  seen = set()
  for key, value in tensors.items():
    name = hf_name(key)
    if name is None:
      continue
    if name not in targets:
      raise CheckpointError(f"unexpected GPT-2 tensor '{key}'.", "use a GPT2LMHeadModel checkpoint.")
    if tuple(value.shape) != tuple(targets[name].shape):
      raise CheckpointError(f"GPT-2 tensor '{key}' has shape {value.shape}, expected {targets[name].shape}.",
                            "check that config.json belongs to these weights.")
    targets[name].set_value(jnp.asarray(value, jnp.float32))
    seen.add(name)
  missing = sorted(set(targets) - seen)
  if missing:
    raise CheckpointError(f"GPT-2 checkpoint lacks {len(missing)} tensors (e.g. '{missing[0]}').",
                          "use a complete model.safetensors.")


def load_tokenizer(directory: pathlib.Path):
  """The GPT-2 BPE from tokenizer.json, or from vocab.json + merges.txt."""
  from tokenizers import Tokenizer
  from tokenizers.implementations import ByteLevelBPETokenizer

  if (directory / "tokenizer.json").is_file():
    return Tokenizer.from_file(str(directory / "tokenizer.json"))
  if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
    return ByteLevelBPETokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
  raise DataError(f"{directory} has no GPT-2 tokenizer (tokenizer.json, or vocab.json and merges.txt).",
                  "copy the tokenizer files of the checkpoint into the same directory.")


def load_gpt2(directory: str | pathlib.Path) -> tuple[GPT2, object]:
  """(model, tokenizer) from a Hugging Face GPT-2 directory."""
  from safetensors.numpy import load_file

  directory = pathlib.Path(directory).expanduser()
  for name in ("config.json", "model.safetensors"):
    if not (directory / name).is_file():
      raise CheckpointError(f"{directory / name} does not exist.",
                            "point --scorer gpt2:DIR at a local GPT-2 checkpoint (config.json, model.safetensors, "
                            "tokenizer.json).")
  cfg = GPT2Config.from_hf(json.loads((directory / "config.json").read_text()))
  model = nnx.eval_shape(lambda: GPT2(cfg, rngs=nnx.Rngs(0)))
  load_tensors(model, load_file(str(directory / "model.safetensors")))
  return model, load_tokenizer(directory)


def save_hf(model: GPT2, directory: str | pathlib.Path) -> None:
  """Writes config.json and model.safetensors in the HF layout (tests, conversions)."""
  from safetensors.numpy import save_file

  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  cfg = dataclasses.asdict(model.config)
  cfg.update(model_type="gpt2", activation_function="gelu_new", architectures=["GPT2LMHeadModel"])
  (directory / "config.json").write_text(json.dumps(cfg, indent=1))
  save_file({k: np.asarray(v[...]) for k, v in flat_params(model).items()}, str(directory / "model.safetensors"))
