"""The autoregressive baseline: LangFlow's backbone with causal attention.

Same family as :mod:`langflow_jax.model`: pre-LN blocks with RoPE, the width,
heads, MLP ratio, dropout and compute dtype of ``config.model``, the same
tokenizer and vocabulary, an untied output head, and the same parameter names
and ``logical_axes``, so :mod:`langflow_jax.parallel` shards it with the same
rules and :mod:`langflow_jax.train` trains it (``--config.objective.name=ar``).

What differs, and why:

* No noise conditioning. With a constant input, adaLN would reduce to learned
  per-channel shift/scale/gate vectors, so the blocks use plain scale-only
  layer norms and ungated residual branches, as the AR baseline of the
  MDLM/Duo lineage does (its ``DDiTBlockCausal``). The model is therefore
  smaller by the gamma MLP, the adaLN linears and the self-conditioning
  projection: 85.0M against 93.6M non-embedding weights at 12x768 with cond
  128 (162M against 171M in all); 0.40M against 0.56M for ``tiny``.
* A learned start vector at position 0: the inputs are ``[s, x_0 .. x_{L-2}]``
  and ``logits[:, t]`` is ``log p(x_t | x_<t)``. Every token of a sequence is
  a target, so the AR's CE and perplexity cover exactly the tokens of
  LangFlow's CE and likelihood bound, and the trainer's token counts apply
  unchanged.

Decoding keeps a per-layer KV cache of ``length`` positions: one parallel
causal pass over the prompt fills it, then ``lax.scan`` feeds one token per
position. The scorer (:func:`sequence_nll`, :func:`sequence_scorer` for
``metrics.generative_perplexity``) follows the Gen. PPL protocol of method §6.2:
per-sequence summed NLL over tokens 1..len-1 and ``exp(sum NLL / sum (len - 1))``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from langflow_jax import metrics
from langflow_jax.errors import ConfigError
from langflow_jax.model import (DTYPES, PreLNBlock, ScaleOnlyLayerNorm, TokenEmbedding, check_heads,
                                check_length, dot_product_attention, dropout, linear, normalized_rows,
                                rotary_inv_freq, rotary_qkv, rotary_tables, vocab_argmax, vocab_categorical)
from langflow_jax.objective import ObjectiveOutput, objective_output, token_cross_entropy

Array = jax.Array
KVCache = tuple[tuple[Array, Array], ...]  # per block: keys, values [B, S, H, d_h]


class CausalBlock(PreLNBlock):
  """Pre-LN causal block: x + Attn(LN(x)), then x + MLP(LN(x)); weights as in DDiTBlock."""

  causal = True  # False: the same block attending everywhere (the masked-diffusion baseline)

  def __call__(self, h_BxTxD: Array, cos_TxK: Array, sin_TxK: Array, start: Array | int,
               kv: tuple[Array, Array] | None, dropout_key: Array | None = None):
    """T positions ``start .. start+T-1``; with ``kv`` they are written into it and attend over it.

    Returns the new residual stream and the updated ``kv`` (None without one).
    """
    b, t, d = h_BxTxD.shape
    k1, k2 = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
    a = self.norm1(h_BxTxD).astype(self.attn_qkv.dtype or jnp.float32)
    q, k, v = rotary_qkv(self.attn_qkv, a, self.n_heads, cos_TxK, sin_TxK)
    if kv is not None:
      k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), start, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), start, axis=1)
      kv = (k, v)
    mask_TxS = (jnp.arange(k.shape[1])[None, :] <= start + jnp.arange(t)[:, None]) if self.causal else None
    o_BxTxHxK = dot_product_attention(q, k, v, mask_TxS, impl=self.attention_impl)
    h_BxTxD = h_BxTxD + dropout(self.attn_out(o_BxTxHxK.reshape(b, t, d)), self.dropout_rate, k1)
    m = self.mlp_2(jax.nn.gelu(self.mlp_1(self.norm2(h_BxTxD)), approximate=True))
    return h_BxTxD + dropout(m, self.dropout_rate, k2), kv


class OutputLayer(nnx.Module):
  """Final scale-only norm and the untied, zero-initialised head to vocabulary logits."""

  def __init__(self, dim: int, vocab_size: int, compute_dtype: Any, *, rngs: nnx.Rngs):
    self.norm_final = ScaleOnlyLayerNorm(dim)
    self.linear = linear(dim, vocab_size, ("embed", "vocab"), zero_init=True, rngs=rngs,
                         dtype=compute_dtype)

  def __call__(self, h: Array) -> Array:
    return self.linear(self.norm_final(h)).astype(jnp.float32)


class PlainTransformer(nnx.Module):
  """The baselines' network: token embeddings, plain pre-LN blocks with RoPE, the untied head.

  ``block_class`` sets the attention (causal here; bidirectional for the
  masked-diffusion baseline), ``num_embeddings`` the rows of the table (the
  vocabulary, plus [MASK] there), ``start_vector`` the AR's learned input at
  position 0.
  """

  block_class: type[CausalBlock] = CausalBlock

  def __init__(self, model_cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, num_embeddings: int | None = None,
               start_vector: bool = False):
    d, v = int(model_cfg.hidden_size), int(model_cfg.vocab_size)
    check_heads(d, model_cfg.n_heads)
    compute_dtype = DTYPES[model_cfg.compute_dtype]
    self.vocab_size = v
    self.max_length = int(model_cfg.max_length)
    self.normalize_embedding = bool(model_cfg.normalize_embedding)
    self.vocab_embed = TokenEmbedding(num_embeddings or v, d, rngs=rngs)
    if start_vector:
      bound = 1.0 / math.sqrt(d)  # initialised like one embedding row
      self.start_embedding = nnx.Param(
          jax.random.uniform(rngs.params(), (d,), jnp.float32, -bound, bound), logical_axes=("embed",))
    self.rotary_inv_freq = nnx.Variable(rotary_inv_freq(d // model_cfg.n_heads))
    self.blocks = nnx.List([
        self.block_class(d, model_cfg.n_heads, model_cfg.mlp_ratio, model_cfg.dropout, compute_dtype,
                         rngs=rngs, attention=model_cfg.get("attention", "einsum"))
        for _ in range(model_cfg.n_blocks)
    ])
    self.output_layer = OutputLayer(d, v, compute_dtype, rngs=rngs)

  @property
  def hidden_size(self) -> int:
    return self.vocab_embed.embedding.shape[1]

  def _embed(self, ids_BxT: Array, with_start: bool = False) -> Array:
    """Input vectors (float32), rows normalised like LangFlow's when the config says so.

    Rows are gathered before they are normalised (the same numbers), so a
    decode step touches B rows, not the whole table.
    """
    x = jnp.take(self.vocab_embed.embedding[...], ids_BxT, axis=0).astype(jnp.float32)
    if with_start:
      s_D = self.start_embedding[...].astype(jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(s_D, (x.shape[0], 1, x.shape[2])), x], axis=1)
    return normalized_rows(x) if self.normalize_embedding else x

  def _run(self, x_BxTxD: Array, start: Array | int, cache: KVCache | None,
           dropout_key: Array | None = None) -> tuple[Array, KVCache | None]:
    cos, sin = rotary_tables(self.rotary_inv_freq[...], x_BxTxD.shape[1], start)
    keys = (jax.random.split(dropout_key, len(self.blocks)) if dropout_key is not None
            else [None] * len(self.blocks))
    h, new_cache = x_BxTxD, []
    for i, (block, key) in enumerate(zip(self.blocks, keys)):
      h, kv = block(h, cos, sin, start, None if cache is None else cache[i], key)
      new_cache.append(kv)
    return self.output_layer(h), (None if cache is None else tuple(new_cache))


class ARTransformer(PlainTransformer):
  """Causal LM over token ids: ``model(ids_BxL)[:, t] = log p(x_t | x_<t)`` (float32 logits)."""

  def __init__(self, model_cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    super().__init__(model_cfg, rngs=rngs, start_vector=True)

  def __call__(self, ids_BxL: Array, *, dropout_key: Array | None = None) -> Array:
    """Teacher-forced logits [B, L, V] for every position (no cache)."""
    check_length(ids_BxL.shape[1], self.max_length)
    logits, _ = self._run(self._embed(ids_BxL[:, :-1], with_start=True), 0, None, dropout_key)
    return logits

  def init_cache(self, batch: int, length: int) -> KVCache:
    """Zeroed keys/values for ``length`` positions, in the blocks' compute dtype."""
    check_length(length, self.max_length)
    block = self.blocks[0]
    dtype = block.attn_qkv.dtype or jnp.float32
    shape = (batch, length, block.n_heads, self.hidden_size // block.n_heads)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.blocks)

  def prefill(self, prompt_BxP: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """Positions 0..P (start vector and prompt) in one pass: logits [B, P+1, V] for x_0..x_P."""
    return self._run(self._embed(prompt_BxP, with_start=True), 0, cache)

  def decode_step(self, token_B: Array, position: Array | int, cache: KVCache) -> tuple[Array, KVCache]:
    """Feeds x_{position-1} at ``position``: logits [B, V] for x_position."""
    logits, cache = self._run(self._embed(token_B[:, None], with_start=False), position, cache)
    return logits[:, 0], cache


def create_model(config: ml_collections.ConfigDict, seed: int = 0) -> ARTransformer:
  """A freshly initialised AR baseline for ``config.model``."""
  return ARTransformer(config.model, rngs=nnx.Rngs(params=seed))


def objective(model: ARTransformer, ids_BxL: Array, mask_BxL: Array, key: Array, *,
              cfg: ml_collections.ConfigDict, skip_scale: Array | float = 1.0,
              train: bool = True) -> ObjectiveOutput:
  """Next-token CE of the causal baseline, teacher-forced, over every valid token.

  Position 0 is predicted from the start vector, so the token count equals
  LangFlow's. There is no noise level (``gamma_B`` is 0), no schedule fit and
  no self-conditioning; ``cfg`` and ``skip_scale`` are unused.
  """
  del cfg, skip_scale
  mask = mask_BxL.astype(jnp.float32)
  logits = model(ids_BxL, dropout_key=key if train else None)
  ce_BxL = token_cross_entropy(logits, ids_BxL) * mask
  zeros_B = jnp.zeros(ids_BxL.shape[:1], jnp.float32)
  return objective_output(ce_BxL, jnp.sum(mask, axis=-1), zeros_B, zeros_B, zeros_B)


# --------------------------------------------------------------------------- decoding


def nucleus_filter(logits_BxV: Array, top_p: float) -> Array:
  """Logits outside the smallest set of tokens holding ``top_p`` of the mass set to -inf."""
  probs = jax.nn.softmax(logits_BxV, axis=-1)
  sorted_p = -jnp.sort(-probs, axis=-1)
  before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the more likely tokens
  n_keep = jnp.sum(before < top_p, axis=-1, keepdims=True)  # >= 1 for top_p > 0
  threshold = jnp.take_along_axis(sorted_p, n_keep - 1, axis=-1)
  return jnp.where(probs >= threshold, logits_BxV, -jnp.inf)


def choose_tokens(logits_BxV: Array, key: Array, temperature: Array | float, top_p: float,
                  greedy: bool) -> Array:
  """Next tokens: argmax, or a draw from softmax(logits / T) restricted to the top-p nucleus."""
  logits = logits_BxV.astype(jnp.float32)
  if greedy:
    return vocab_argmax(logits)
  logits = logits / temperature
  if top_p < 1.0:
    logits = nucleus_filter(logits, top_p)
  return vocab_categorical(key, logits)


@functools.partial(jax.jit, static_argnames=("graphdef", "length", "top_p", "greedy", "return_logits"))
def decode(graphdef: Any, state: nnx.State, key: Array, prompt_BxP: Array, temperature: Array, *,
           length: int, top_p: float = 1.0, greedy: bool = False, return_logits: bool = False):
  """The jitted KV-cache decoder over ``nnx.split(model)``; see :func:`generate`.

  The draw for position t uses ``fold_in(key, t)``, so a result depends only
  on the key, the prompt and the settings.
  """
  model = nnx.merge(graphdef, state)
  b, p = prompt_BxP.shape
  pick = lambda logits, t: choose_tokens(logits, jax.random.fold_in(key, t), temperature, top_p, greedy)
  prompt_logits, cache = model.prefill(prompt_BxP, model.init_cache(b, length))
  first_B = pick(prompt_logits[:, -1], p)

  def step(carry, t):
    token_B, cache = carry
    logits_BxV, cache = model.decode_step(token_B, t, cache)
    next_B = pick(logits_BxV, t)
    return (next_B, cache), (next_B, logits_BxV if return_logits else None)

  _, (tokens_TxB, logits_TxBxV) = jax.lax.scan(step, (first_B, cache), jnp.arange(p + 1, length))
  ids_BxL = jnp.concatenate([prompt_BxP.astype(jnp.int32), first_B[:, None], tokens_TxB.T], axis=1)
  if not return_logits:
    return ids_BxL
  return ids_BxL, jnp.concatenate([prompt_logits, jnp.swapaxes(logits_TxBxV, 0, 1)], axis=1)


def generation_prompt(prompt_BxP: Array | None, batch_size: int | None, length: int, max_length: int, *,
                      temperature: float, top_p: float, greedy: bool) -> Array:
  """The int32 prompt of a generate() call (``batch_size`` empty rows without one), settings checked."""
  if prompt_BxP is None:
    if batch_size is None:
      raise ConfigError("generate() needs a prompt or a batch_size.", "pass prompt_BxP or batch_size.")
    prompt_BxP = jnp.zeros((batch_size, 0), jnp.int32)
  prompt_BxP = jnp.asarray(prompt_BxP, jnp.int32)
  if not 0 <= prompt_BxP.shape[1] < length:
    raise ConfigError(f"a prompt of {prompt_BxP.shape[1]} tokens leaves nothing to generate in {length}.",
                      "use a longer output length or a shorter prompt.")
  if not 0.0 < top_p <= 1.0:
    raise ConfigError(f"top_p={top_p} must lie in (0, 1].", "use e.g. 0.9, or 1.0 to turn it off.")
  if not greedy and not temperature > 0.0:
    raise ConfigError(f"temperature={temperature} must be positive.", "use e.g. 1.0, or greedy decoding.")
  check_length(length, max_length)
  return prompt_BxP


def generate(model: ARTransformer, key: Array, length: int, *, prompt_BxP: Array | None = None,
             batch_size: int | None = None, temperature: float = 1.0, top_p: float = 1.0,
             greedy: bool = False, return_logits: bool = False):
  """Sequences of ``length`` tokens that begin with the prompt (all rows the same length).

  Without a prompt, ``batch_size`` sequences are drawn from the start vector.
  Returns ids [B, length] (int32) and, with ``return_logits``, the logits
  [B, length, V] that chose them, which equal ``model(ids)``.
  """
  prompt_BxP = generation_prompt(prompt_BxP, batch_size, length, model.max_length, temperature=temperature,
                                 top_p=top_p, greedy=greedy)
  graphdef, state = nnx.split(model)
  return decode(graphdef, state, key, prompt_BxP, jnp.float32(temperature), length=int(length),
                top_p=float(top_p), greedy=bool(greedy), return_logits=bool(return_logits))


def sample_texts(model: ARTransformer, tokenizer, sample_cfg: ml_collections.ConfigDict, length: int,
                 prompt: str = "") -> list[str]:
  """``sample.num`` decoded samples after ``[BOS] + prompt`` (temperature 0: greedy)."""
  if not isinstance(model, ARTransformer):
    raise ConfigError("this run did not train the autoregressive baseline.",
                      "pass the --workdir of a run trained with --config.objective.name=ar.")
  prompt_ids = [tokenizer.bos_id, *tokenizer.encode(prompt)] if prompt else [tokenizer.bos_id]
  prompt_BxP = jnp.tile(jnp.asarray(prompt_ids, jnp.int32)[None], (sample_cfg.num, 1))
  greedy = sample_cfg.temperature == 0.0
  ids = generate(model, jax.random.PRNGKey(sample_cfg.seed), length, prompt_BxP=prompt_BxP,
                 temperature=1.0 if greedy else sample_cfg.temperature, top_p=sample_cfg.top_p,
                 greedy=greedy)
  return [tokenizer.decode(row) for row in np.asarray(ids)]


# --------------------------------------------------------------------------- scoring


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _sequence_nll(graphdef: Any, state: nnx.State, ids_BxL: Array, mask_BxL: Array,
                  score_first: Array) -> tuple[Array, Array]:
  logp_BxLxV = jax.nn.log_softmax(nnx.merge(graphdef, state)(ids_BxL), axis=-1)
  nll_BxL = -jnp.take_along_axis(logp_BxLxV, ids_BxL[..., None], axis=-1)[..., 0]
  valid = mask_BxL.astype(jnp.float32)
  valid = valid.at[:, 0].multiply(score_first.astype(jnp.float32))
  return jnp.sum(nll_BxL * valid, axis=-1), jnp.sum(valid, axis=-1)


def sequence_nll(model: ARTransformer, ids_BxL: Array, mask_BxL: Array | None = None, *,
                 score_first: bool = False) -> tuple[Array, Array]:
  """Teacher-forced summed NLL (nats) and scored-token count of each sequence.

  By default the first token is not scored (the count is len - 1, as in the
  Gen. PPL protocol); ``score_first`` scores it from the start vector.
  """
  ids_BxL = jnp.asarray(ids_BxL, jnp.int32)
  mask_BxL = jnp.ones(ids_BxL.shape, bool) if mask_BxL is None else jnp.asarray(mask_BxL, bool)
  graphdef, state = nnx.split(model)
  return _sequence_nll(graphdef, state, ids_BxL, mask_BxL, jnp.asarray(score_first))


def sequence_scorer(model: ARTransformer, batch_size: int = 32):
  """The model as a ``metrics.SequenceScorer``: each sequence's summed NLL of tokens 1..n-1 and n-1.

  Sequences are truncated to the model's length and right-padded (masked) to
  it in batches of ``batch_size``: one compilation. The first token of each
  sequence is not scored (``len - 1`` tokens, the Gen. PPL protocol).
  """
  max_len = model.max_length

  def score(sequences):
    return metrics.score_in_batches([list(s)[:max_len] for s in sequences],
                                    lambda ids, mask: sequence_nll(model, ids, mask), batch_size=batch_size,
                                    width=lambda chunk: max_len)

  return score
