"""The LangFlow denoiser: a DiT over normalised token embeddings (method §3).

Module and parameter names mirror the official PyTorch state dict one to one
(``backbone.blocks.3.attn_qkv.weight`` -> ``backbone.blocks[3].attn_qkv.kernel``
transposed), so converting a release is a renaming. Every parameter carries
``logical_axes`` metadata that :mod:`langflow_jax.parallel` maps to mesh axes;
the main activations are pinned with ``parallel.constrain`` (the identity
outside a sharded jit).

Dtypes: parameters are float32. ``compute_dtype`` (float32 or bfloat16) is the
dtype of the matmuls inside the blocks, the self-conditioning projection and the
output head; layer norms, attention softmax, the residual stream, the skip
logits' value and the logits stay float32 in both cases. In bfloat16 every such
product has bf16 operands and float32 accumulation and result, its derivatives'
products too (:func:`low_precision_einsum`); q, k and v are rounded to bf16 for
attention. The skip logits' cotangent products (:func:`einsum_low_precision_cotangents`)
and training's stop-gradient pre-pass (:meth:`LangFlow.self_cond_input`) take bf16
operands as well.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.custom_derivatives import linear_call

from langflow_jax import diffusion, parallel
from langflow_jax.errors import ConfigError
from langflow_jax.schedule import NoiseSchedule, make_schedule

Array = jax.Array

FREQ_EMBED_SIZE = 256  # sinusoidal width of the gamma embedding (hard-coded upstream)
LN_EPS = 1e-5
NORM_EPS = 1e-12  # torch F.normalize default

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Logical axes of the activations (parallel.LOGICAL_RULES maps them to the mesh).
BLD = ("batch", "length", None)
BLHK = ("batch", "length", "act_heads", None)
BLF = ("batch", "length", "act_mlp")
BLV = ("batch", "length", "act_vocab")


def torch_linear_init(fan_in: int):
  """PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def is_low_precision(dtype: Any) -> bool:
  """Whether matmuls in ``dtype`` take the low-precision path (:func:`low_precision_einsum`)."""
  return dtype is not None and jnp.dtype(dtype) != jnp.float32


def _transposed_specs(spec: str) -> tuple[str, str]:
  """The einsum specs of the two cotangents of ``"A,B->C"``: ``"C,B->A"`` and ``"A,C->B"``."""
  inputs, out = spec.split("->")
  a, b = inputs.split(",")
  if not (set(a) <= set(out) | set(b) and set(b) <= set(out) | set(a)):
    raise ValueError(f"einsum {spec!r} sums an index out of one operand alone")
  return f"{out},{b}->{a}", f"{a},{out}->{b}"


MATMUL = "ni,io->no"  # a linear layer's product: rows are tokens
SKIP = "nd,vd->nv"    # the skip logits z E^T: rows are tokens


def _row_major_transpose(x_NxI: Array) -> Array:
  """x^T, laid out row-major. XLA:CPU folds a plain transpose into the next product's dimension
  numbers, and its native bf16 product takes no transposed left operand (it would run in float32); a
  transpose through a 3-d view cannot fold, so the copy is made and the product stays bf16."""
  n, i = x_NxI.shape
  t = next((f for f in (16, 8, 4, 2) if n % f == 0), None)
  if t is None:
    return x_NxI.T
  return jnp.transpose(x_NxI.reshape(n // t, t, i), (2, 0, 1)).reshape(i, n)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def low_precision_einsum(spec: str, a: Array, b: Array) -> Array:
  """``einsum(spec, a, b)`` of two low-precision (bfloat16) operands, accumulated and returned in float32.

  Its derivatives' products take low-precision operands too: a tangent or a cotangent is rounded to
  the operands' dtype before it meets the other operand. XLA:CPU runs a bf16 product natively
  (YNNPACK; several times its float32 rate where the CPU has AMX or AVX-512 BF16) only when both
  operands are bf16 and the result is float32: a bf16 result, or jax's own transpose of this product
  (a float32 cotangent against a bf16 operand), turns it into a float32 product. A custom JVP whose
  tangent products are ``linear_call``s with their own transposes keeps both forward mode (the
  likelihood's Hutchinson JVP) and reverse mode (training) on bf16 products.
  """
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@low_precision_einsum.defjvp
def _low_precision_einsum_jvp(spec, primals, tangents):
  a, b = primals
  ta, tb = tangents
  spec_da, spec_db = _transposed_specs(spec)
  f32 = jnp.float32

  def along_a(b, ta):
    return jnp.einsum(spec, ta.astype(a.dtype), b, preferred_element_type=f32)

  def along_a_transposed(b, ct):
    return jnp.einsum(spec_da, ct.astype(b.dtype), b, preferred_element_type=f32).astype(a.dtype)

  def along_b(a, tb):
    return jnp.einsum(spec, a, tb.astype(b.dtype), preferred_element_type=f32)

  def along_b_transposed(a, ct):
    if spec == MATMUL and jax.default_backend() == "cpu":  # the weight gradient of a linear layer
      return jnp.dot(_row_major_transpose(a), ct.astype(a.dtype), preferred_element_type=f32).astype(b.dtype)
    return jnp.einsum(spec_db, a, ct.astype(a.dtype), preferred_element_type=f32).astype(b.dtype)

  tangent = (linear_call(along_a, along_a_transposed, b, ta) +
             linear_call(along_b, along_b_transposed, a, tb))
  return low_precision_einsum(spec, a, b), tangent


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 3))
def einsum_low_precision_cotangents(spec: str, a: Array, b: Array, dtype: Any) -> Array:
  """``einsum(spec, a, b)`` of float32 operands, in float32, whose reverse-mode products run in ``dtype``.

  The value and the forward-mode tangent (the likelihood's JVP) are float32 products; only the
  transposes, training's cotangent products, round their operands to ``dtype`` (float32
  accumulation). For products whose value must stay float32 (the skip logits z E^T, several
  hundred nats at low noise) while their gradients, like every other gradient of the bf16 path,
  tolerate bf16 operands.
  """
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@einsum_low_precision_cotangents.defjvp
def _einsum_low_precision_cotangents_jvp(spec, dtype, primals, tangents):
  a, b = primals
  ta, tb = tangents
  spec_da, spec_db = _transposed_specs(spec)
  f32 = jnp.float32

  def along_a(b, ta):
    return jnp.einsum(spec, ta, b, preferred_element_type=f32)

  def along_a_transposed(b, ct):
    return jnp.einsum(spec_da, ct.astype(dtype), b.astype(dtype), preferred_element_type=f32)

  def along_b(a, tb):
    return jnp.einsum(spec, a, tb, preferred_element_type=f32)

  def along_b_transposed(a, ct):
    if spec == SKIP and jax.default_backend() == "cpu":
      # ct^T z has a transposed left operand, which XLA:CPU's bf16 product does not take; the
      # row-major copy of the [N, V] cotangent (or of the [D, V] result, as z^T ct) costs more than
      # the float32 product it would save (measured on the bench config), so E's cotangent stays float32
      return jnp.einsum(spec_db, a, ct, preferred_element_type=f32)
    return jnp.einsum(spec_db, a.astype(dtype), ct.astype(dtype), preferred_element_type=f32)

  tangent = (linear_call(along_a, along_a_transposed, b, ta) +
             linear_call(along_b, along_b_transposed, a, tb))
  return einsum_low_precision_cotangents(spec, a, b, dtype), tangent


def product(spec: str, a: Array, b: Array) -> Array:
  """``einsum(spec, a, b)`` in the operands' dtype, accumulated and returned in float32: float32
  operands through ``jnp.einsum``, low-precision ones through :func:`low_precision_einsum`."""
  if is_low_precision(a.dtype):
    return low_precision_einsum(spec, a, b)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


class Linear(nnx.Linear):
  """``nnx.Linear`` applied to the input flattened to [N, in_features].

  A [B, L, D] input makes the kernel gradient a contraction over two dims;
  XLA:CPU then lays the cotangent out with a copy fusion that recomputes the
  residual stream's backward chain per layer (1.8x slower backward on the
  bench config). One matmul row per token avoids that on every backend.

  With a low-precision ``dtype`` the product is :func:`low_precision_einsum`
  (bf16 operands, float32 accumulation) and the output, bias added, stays
  float32: the residual stream and the logits it feeds are float32, and the
  next product rounds its own operand; float32 is ``nnx.Linear`` itself.
  """

  def __call__(self, x: Array) -> Array:
    lead = x.shape[:-1]
    x_NxI = x.reshape(-1, x.shape[-1])
    if not is_low_precision(self.dtype):
      return super().__call__(x_NxI).reshape(lead + (-1,))
    y_NxO = low_precision_einsum(MATMUL, x_NxI.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y_NxO = y_NxO + self.bias[...].astype(jnp.float32)
    return y_NxO.reshape(lead + (-1,))


def linear(in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
           rngs: nnx.Rngs, use_bias: bool = True, zero_init: bool = False,
           kernel_std: float | None = None, dtype: Any = jnp.float32) -> Linear:
  """A :class:`Linear` with torch's init (or zeros; or a N(0, kernel_std^2) kernel and a
  zero bias) and logical axis names."""
  init = nnx.initializers.zeros_init() if zero_init else torch_linear_init(in_features)
  kernel_init = init if kernel_std is None else nnx.initializers.normal(kernel_std)
  bias_init = init if kernel_std is None else nnx.initializers.zeros_init()
  return Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=kernel_init, bias_init=bias_init, rngs=rngs,
      kernel_metadata={"logical_axes": axes}, bias_metadata={"logical_axes": axes[1:]})


class ScaleOnlyLayerNorm(nnx.Module):
  """LayerNorm without affine terms (eps 1e-5, biased variance) times a weight."""

  def __init__(self, dim: int):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))

  def __call__(self, x: Array) -> Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * self.scale[...]


def gamma_frequency_embedding(gamma_B: Array) -> Array:
  """[cos(gamma f_j), sin(gamma f_j)] with f_j = 10000^(-j/128), cos first."""
  half = FREQ_EMBED_SIZE // 2
  freqs = jnp.exp(jnp.float32(-math.log(10000.0)) * jnp.arange(half, dtype=jnp.float32) / half)
  args_BxF = gamma_B.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args_BxF), jnp.sin(args_BxF)], axis=-1)


class GammaEmbedder(nnx.Module):
  """Official ``sigma_map``: sinusoid(gamma) -> Linear -> SiLU -> Linear."""

  def __init__(self, cond_dim: int, *, rngs: nnx.Rngs):
    self.linear_1 = linear(FREQ_EMBED_SIZE, cond_dim, ("freq", "cond"), rngs=rngs)
    self.linear_2 = linear(cond_dim, cond_dim, ("cond", "cond"), rngs=rngs)

  def __call__(self, gamma_B: Array) -> Array:
    h = self.linear_1(gamma_frequency_embedding(gamma_B))
    return self.linear_2(jax.nn.silu(h))


def rotary_inv_freq(head_dim: int) -> Array:
  return 1.0 / (10000.0 ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rotary_tables(inv_freq: Array, length: int, offset: Array | int = 0) -> tuple[Array, Array]:
  """GPT-NeoX rotate-half tables over the full head dim: cos, sin of [L, d_h].

  Rows are positions ``offset .. offset+L-1`` (a KV-cache decoder's new tokens).
  """
  positions = (offset + jnp.arange(length)).astype(jnp.float32)
  theta_LxH = positions[:, None] * inv_freq[None, :]
  theta = jnp.concatenate([theta_LxH, theta_LxH], axis=-1)
  return jnp.cos(theta), jnp.sin(theta)


def apply_rotary(x_BxLxHxK: Array, cos_LxK: Array, sin_LxK: Array) -> Array:
  half = x_BxLxHxK.shape[-1] // 2
  x1, x2 = x_BxLxHxK[..., :half], x_BxLxHxK[..., half:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos = cos_LxK[None, :, None, :].astype(x_BxLxHxK.dtype)
  sin = sin_LxK[None, :, None, :].astype(x_BxLxHxK.dtype)
  return x_BxLxHxK * cos + rotated * sin


def rotary_qkv(attn_qkv: nnx.Linear, a_BxLxD: Array, n_heads: int, cos_LxK: Array,
               sin_LxK: Array) -> tuple[Array, Array, Array]:
  """Fused q/k/v projection (head-major inside each third), RoPE on q and k.

  The fused [D, 3D] kernel is applied a third at a time, each third's columns
  pinned to whole heads, so each tensor-parallel device computes its own heads
  of q, k and v (contiguous column shards of the fused kernel would split q, k
  and v across devices). Rows are tokens, as in :class:`Linear`.
  """
  b, l, d = a_BxLxD.shape
  dtype = attn_qkv.dtype or jnp.float32
  x_NxD = a_BxLxD.reshape(b * l, d).astype(dtype)
  kernel_Dx3xD = attn_qkv.kernel[...].reshape(d, 3, d)

  q, k, v = (
      parallel.constrain(product(MATMUL, x_NxD, parallel.constrain(kernel_Dx3xD[:, i], (None, "act_heads"))
                                 .astype(dtype)).astype(dtype).reshape(b, l, n_heads, d // n_heads), BLHK)
      for i in range(3))
  return apply_rotary(q, cos_LxK, sin_LxK), apply_rotary(k, cos_LxK, sin_LxK), v


# Attention kernels (``model.attention``). "einsum" is this module's own, the
# fastest on XLA:CPU; the others go through jax.nn.dot_product_attention with
# that implementation: "xla" (the same maths, XLA's lowering), "cudnn" (flash
# attention on NVIDIA GPUs; bf16/fp16 inputs only) or "auto" (cuDNN where it
# applies, XLA otherwise). All compute the scores and softmax in float32.


def dot_product_attention(q_BxLxHxK: Array, k_BxSxHxK: Array, v_BxSxHxK: Array,
                          mask_LxS: Array | None = None, impl: str = "einsum") -> Array:
  """softmax(q k^T / sqrt(d_h)) v per head; scores and softmax in float32.

  ``mask_LxS`` (True: may attend) is None for the bidirectional denoiser.
  The einsum products run head-major ([B, H, L, K], batch dims leading), which
  XLA:CPU executes as batched matmuls without per-call transposes (3.5x
  faster forward on the bench config than contracting in [B, L, H, K]).
  """
  if impl != "einsum":
    out_BxLxHxK = jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask=None if mask_LxS is None else mask_LxS[None, None],
        implementation=None if impl == "auto" else impl)
    return parallel.constrain(out_BxLxHxK, BLHK)
  q_BxHxLxK, k_BxHxSxK, v_BxHxSxK = (x.transpose(0, 2, 1, 3) for x in (q_BxLxHxK, k_BxSxHxK, v_BxSxHxK))
  scores_BxHxLxS = product("bhqk,bhsk->bhqs", q_BxHxLxK, k_BxHxSxK)
  scores_BxHxLxS = scores_BxHxLxS / math.sqrt(q_BxLxHxK.shape[-1])
  if mask_LxS is not None:
    scores_BxHxLxS = jnp.where(mask_LxS, scores_BxHxLxS, -jnp.inf)
  probs = jax.nn.softmax(scores_BxHxLxS, axis=-1)
  out_BxHxLxK = product("bhqs,bhsk->bhqk", probs.astype(v_BxHxSxK.dtype), v_BxHxSxK).astype(v_BxHxSxK.dtype)
  return parallel.constrain(out_BxHxLxK.transpose(0, 2, 1, 3), BLHK)


def normalized_rows(w_VxD: Array) -> Array:
  """Rows rescaled to norm sqrt(D) (an L2 normalisation, not a LayerNorm)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(w_VxD), axis=-1, keepdims=True))
  return math.sqrt(w_VxD.shape[-1]) * w_VxD / jnp.maximum(norm, NORM_EPS)


ARGMAX_BLOCK = 64


def vocab_argmax(x_NxV: Array) -> Array:
  """``jnp.argmax(x, -1)`` as int32, the same index (the first of ties; NaN ranks highest), in two levels.

  XLA:CPU lowers an argmax to a reduction over (value, index) pairs that does not vectorise: over a
  [1, 128, 8192] float32 block it took 2.4 ms against 0.15 ms for a max, so every decode of the
  logits cost a third of a sampler step. Here a max over blocks of ``ARGMAX_BLOCK`` (a vectorised
  reduce window; the last block padded with -inf without a copy) picks the first block holding the
  largest value, and the pair reduction runs over that block only (0.35 ms; 5.5 against 57 ms over
  [4, 128, 50257]). The last block starts ``V - ARGMAX_BLOCK`` when V is not a multiple: the overlap
  belongs to the block before, whose values are all smaller, so the first index still wins. The
  window's max drops NaN on XLA:CPU, so an input with a NaN anywhere (its sum is NaN) takes
  ``jnp.argmax`` itself (a ``lax.cond``: one branch runs, outside ``vmap``).
  """
  exact = lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32)
  if x_NxV.shape[-1] <= ARGMAX_BLOCK:
    return exact(x_NxV)
  if not jnp.issubdtype(x_NxV.dtype, jnp.floating):
    return _blocked_argmax(x_NxV, jnp.array(jnp.iinfo(x_NxV.dtype).min, x_NxV.dtype))
  blocked = lambda x: _blocked_argmax(x, jnp.array(-jnp.inf, x.dtype))
  return jax.lax.cond(jnp.isnan(jnp.sum(x_NxV, dtype=jnp.float32)), exact, blocked, x_NxV)


def _blocked_argmax(x_NxV: Array, low: Array) -> Array:
  v, block = x_NxV.shape[-1], ARGMAX_BLOCK
  window = (1,) * (x_NxV.ndim - 1) + (block,)
  block_max = jax.lax.reduce_window(x_NxV, low, jax.lax.max, window, window,
                                    padding=((0, 0),) * (x_NxV.ndim - 1) + ((0, -v % block),))
  start = jnp.minimum(jnp.argmax(block_max, axis=-1).astype(jnp.int32) * block, v - block)
  rows_RxV = x_NxV.reshape(-1, v)
  inner = jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, block))(rows_RxV, start.reshape(-1))
  return start + jnp.argmax(inner, axis=-1).astype(jnp.int32).reshape(start.shape)


def vocab_categorical(key: Array, logits_NxV: Array) -> Array:
  """``jax.random.categorical(key, logits, -1)``, the same draw (argmax of logits plus the same Gumbel
  noise), through :func:`vocab_argmax`."""
  return vocab_argmax(jax.random.gumbel(key, logits_NxV.shape, logits_NxV.dtype) + logits_NxV)


def chosen_log_probs(logits_NxV: Array, tokens_N: Array) -> Array:
  """float32 log softmax(logits) at ``tokens``: the chosen logit less the log-sum-exp (no [N, V] log-softmax
  is written out)."""
  logits = logits_NxV.astype(jnp.float32)
  chosen = jnp.take_along_axis(logits, tokens_N[..., None], axis=-1)[..., 0]
  return chosen - jax.nn.logsumexp(logits, axis=-1)


def dropout(x: Array, rate: float, key: Array | None) -> Array:
  """Inverted dropout; the identity when ``key`` is None (evaluation)."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class PreLNBlock(nnx.Module):
  """The weights every block has: scale-only norms, fused qkv, output projection, MLP."""

  def __init__(self, dim: int, n_heads: int, mlp_ratio: int, dropout_rate: float,
               compute_dtype: Any, *, rngs: nnx.Rngs, attention: str = "einsum"):
    self.n_heads = n_heads
    self.dropout_rate = dropout_rate
    self.attention_impl = attention
    self.norm1 = ScaleOnlyLayerNorm(dim)
    self.attn_qkv = linear(dim, 3 * dim, ("embed", "qkv"), use_bias=False, rngs=rngs,
                           dtype=compute_dtype)
    self.attn_out = linear(dim, dim, ("heads", "embed"), use_bias=False, rngs=rngs,
                           dtype=compute_dtype)
    self.norm2 = ScaleOnlyLayerNorm(dim)
    self.mlp_1 = linear(dim, mlp_ratio * dim, ("embed", "mlp"), rngs=rngs, dtype=compute_dtype)
    self.mlp_2 = linear(mlp_ratio * dim, dim, ("mlp", "embed"), rngs=rngs, dtype=compute_dtype)


class DDiTBlock(PreLNBlock):
  """adaLN-modulated bidirectional transformer block with rotary attention."""

  def __init__(self, dim: int, n_heads: int, cond_dim: int, mlp_ratio: int, dropout_rate: float,
               compute_dtype: Any, *, rngs: nnx.Rngs, attention: str = "einsum"):
    super().__init__(dim, n_heads, mlp_ratio, dropout_rate, compute_dtype, rngs=rngs, attention=attention)
    # Zero-init: every block starts as the identity (its gates are 0).
    self.ada = linear(cond_dim, 6 * dim, ("cond", "modulation"), zero_init=True, rngs=rngs,
                      dtype=compute_dtype)

  def attention(self, a_BxLxD: Array, cos: Array, sin: Array) -> Array:
    q, k, v = rotary_qkv(self.attn_qkv, a_BxLxD, self.n_heads, cos, sin)
    o_BxLxHxK = dot_product_attention(q, k, v, impl=self.attention_impl)
    return self.attn_out(o_BxLxHxK.reshape(a_BxLxD.shape))

  def __call__(self, h_BxLxD: Array, c_BxC: Array, cos: Array, sin: Array,
               dropout_key: Array | None = None) -> Array:
    mod = self.ada(c_BxC)[:, None, :]
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
    k1, k2 = jax.random.split(dropout_key) if dropout_key is not None else (None, None)

    a = self.norm1(h_BxLxD) * (1 + scale1) + shift1
    a = self.attention(a.astype(self.attn_qkv.dtype or jnp.float32), cos, sin)
    h_BxLxD = h_BxLxD + gate1 * dropout(a, self.dropout_rate, k1)

    m = self.norm2(h_BxLxD) * (1 + scale2) + shift2
    m = self.mlp_2(jax.nn.gelu(parallel.constrain(self.mlp_1(m), BLF), approximate=True))
    return parallel.constrain(h_BxLxD + gate2 * dropout(m, self.dropout_rate, k2), BLD)


class FinalLayer(nnx.Module):
  """adaLN final norm and the untied output head to vocabulary logits."""

  def __init__(self, dim: int, vocab_size: int, cond_dim: int, compute_dtype: Any, *,
               rngs: nnx.Rngs, logit_init_std: float = 0.0):
    self.norm_final = ScaleOnlyLayerNorm(dim)
    self.ada = linear(cond_dim, 2 * dim, ("cond", "modulation"), zero_init=True, rngs=rngs,
                      dtype=compute_dtype)
    # The normalised input has norm sqrt(dim), so a N(0, std^2 / dim) kernel starts every
    # logit at N(0, std^2): 0 is the official zero head.
    self.linear = linear(dim, vocab_size, ("embed", "vocab"), zero_init=logit_init_std == 0, rngs=rngs,
                         kernel_std=logit_init_std / math.sqrt(dim) if logit_init_std else None,
                         dtype=compute_dtype)

  def __call__(self, h_BxLxD: Array, c_BxC: Array) -> Array:
    shift, scale = jnp.split(self.ada(c_BxC)[:, None, :], 2, axis=-1)
    y = self.norm_final(h_BxLxD) * (1 + scale) + shift
    return self.linear(y)


class TokenEmbedding(nnx.Module):
  """The raw embedding table W [V, D] (official ``vocab_embed``)."""

  def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs):
    bound = 1.0 / math.sqrt(dim)  # kaiming_uniform(a=sqrt(5)) on a [V, D] matrix
    self.embedding = nnx.Param(
        jax.random.uniform(rngs.params(), (vocab_size, dim), jnp.float32, -bound, bound),
        logical_axes=("vocab", "embed"))


def check_heads(hidden_size: int, n_heads: int) -> None:
  """RoPE rotates halves of each head, so heads must split D into even widths."""
  if hidden_size % n_heads or (hidden_size // n_heads) % 2:
    raise ConfigError(
        f"model.hidden_size={hidden_size} must split into model.n_heads={n_heads} heads of even width.",
        "choose n_heads dividing hidden_size with an even quotient.")


def check_length(length: int, max_length: int) -> None:
  if length > max_length:
    raise ConfigError(
        f"sequence length {length} is longer than the model's max_length {max_length}.",
        "use shorter sequences (--config.data.seq_len) or a model trained for longer ones.")


class Backbone(nnx.Module):
  """The official ``backbone``: embeddings, gamma MLP, DiT blocks, head, self-cond."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, v = cfg.hidden_size, cfg.vocab_size
    check_heads(d, cfg.n_heads)
    compute_dtype = DTYPES[cfg.compute_dtype]
    self.normalize_embedding = bool(cfg.normalize_embedding)
    self.vocab_embed = TokenEmbedding(v, d, rngs=rngs)
    self.sigma_map = GammaEmbedder(cfg.cond_dim, rngs=rngs)
    self.rotary_inv_freq = nnx.Variable(rotary_inv_freq(d // cfg.n_heads))
    self.blocks = nnx.List([
        DDiTBlock(d, cfg.n_heads, cfg.cond_dim, cfg.mlp_ratio, cfg.dropout, compute_dtype,
                  rngs=rngs, attention=cfg.get("attention", "einsum")) for _ in range(cfg.n_blocks)
    ])
    self.output_layer = FinalLayer(d, v, cfg.cond_dim, compute_dtype, rngs=rngs,
                                   logit_init_std=float(cfg.get("logit_init_std", 0.0)))
    self.self_conditioning = bool(cfg.self_conditioning)
    if self.self_conditioning:
      self.self_cond_proj = linear(2 * d, d, ("embed2", "embed"), use_bias=False, zero_init=True,
                                   rngs=rngs, dtype=compute_dtype)
    self.posterior_input = bool(cfg.get("posterior_input", False))
    if self.posterior_input:
      self.posterior_proj = linear(d, d, ("embed2", "embed"), use_bias=False, zero_init=True, rngs=rngs,
                                   dtype=compute_dtype)

  def embedding_matrix(self) -> Array:
    """E: rows rescaled to norm sqrt(D) (an L2 normalisation, not a LayerNorm)."""
    w = self.vocab_embed.embedding[...].astype(jnp.float32)
    return normalized_rows(w) if self.normalize_embedding else w

  def token_posterior_mean(self, z_BxLxD: Array, gamma_B: Array) -> Array:
    """E^T softmax(c_skip(gamma) z E^T): each position's posterior-mean embedding from its own noisy
    embedding alone, under a uniform prior (the skip logits' posterior), float32.

    The ``posterior_input`` feature: the network would otherwise have to learn this V-way softmax of
    every neighbour's z before it can combine neighbours (a 2-block, width-128 network learns it slowly).
    """
    e_VxD = self.embedding_matrix()
    b, l, d = z_BxLxD.shape
    skip_NxV = jnp.einsum(SKIP, z_BxLxD.reshape(b * l, d).astype(jnp.float32), e_VxD,
                          preferred_element_type=jnp.float32)
    logits = diffusion.skip_coefficient(gamma_B)[:, None, None] * skip_NxV.reshape(b, l, -1)
    return diffusion.denoised_embedding_from_logits(logits, e_VxD)

  def __call__(self, z_BxLxD: Array, gamma_B: Array, self_cond_BxLxD: Array | None,
               dropout_key: Array | None = None, return_hidden: bool = False):
    z_BxLxD = parallel.constrain(z_BxLxD.astype(jnp.float32), BLD)
    h = z_BxLxD
    if self.self_conditioning:
      s = jnp.zeros_like(z_BxLxD) if self_cond_BxLxD is None else self_cond_BxLxD
      h = z_BxLxD + self.self_cond_proj(jnp.concatenate([z_BxLxD, s.astype(jnp.float32)], -1))
    if self.posterior_input:
      h = h + self.posterior_proj(self.token_posterior_mean(z_BxLxD, gamma_B))
    c_BxC = parallel.constrain(jax.nn.silu(self.sigma_map(gamma_B)), ("batch", None))
    cos, sin = rotary_tables(self.rotary_inv_freq[...], z_BxLxD.shape[1])
    keys = (jax.random.split(dropout_key, len(self.blocks)) if dropout_key is not None
            else [None] * len(self.blocks))
    hidden = [h]
    for block, key in zip(self.blocks, keys):
      h = block(h, c_BxC, cos, sin, key)
      hidden.append(h)
    logits_BxLxV = parallel.constrain(self.output_layer(h, c_BxC).astype(jnp.float32), BLV)
    return (logits_BxLxV, hidden) if return_hidden else logits_BxLxV


class LangFlow(nnx.Module):
  """Denoiser plus its noise schedule: logits over tokens from noisy embeddings.

  ``logits = backbone(z, gamma, s) + skip_scale * c_skip(gamma) * z E^T``; the
  skip term is the exact posterior logit of a Gaussian observation, so the
  network only learns a residual. ``skip_scale`` is 1 except during the
  training warm-up of the preconditioning (method §4.5).
  """

  def __init__(self, model_cfg: ml_collections.ConfigDict,
               schedule_cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.vocab_size = int(model_cfg.vocab_size)
    self.max_length = int(model_cfg.max_length)
    self.use_skip = bool(model_cfg.use_skip)
    self.compute_dtype = DTYPES[model_cfg.compute_dtype]
    self.backbone = Backbone(model_cfg, rngs=rngs)
    self.schedule: NoiseSchedule = make_schedule(schedule_cfg)

  @property
  def hidden_size(self) -> int:
    return self.backbone.vocab_embed.embedding.shape[1]

  @property
  def self_conditioning(self) -> bool:
    return self.backbone.self_conditioning

  def embedding_matrix(self) -> Array:
    return self.backbone.embedding_matrix()

  def embed(self, ids_BxL: Array) -> Array:
    """Clean embeddings E[ids], float32."""
    # The lookup reads a gathered (replicated) table: a gather from a table
    # sharded on both dims makes XLA replicate the batch instead.
    table = parallel.constrain(self.embedding_matrix(), (None, None))
    return parallel.constrain(jnp.take(table, ids_BxL, axis=0), BLD)

  def denoise(self, logits_BxLxV: Array, temperature: float | Array = 1.0) -> Array:
    """Posterior-mean embedding E^T softmax(logits / temperature), float32."""
    return diffusion.denoised_embedding_from_logits(logits_BxLxV, self.embedding_matrix(), temperature)

  def __call__(self, z_BxLxD: Array, gamma_B: Array, self_cond_BxLxD: Array | None = None, *,
               skip_scale: float | Array = 1.0, dropout_key: Array | None = None,
               return_hidden: bool = False):
    gamma_B = self._levels(z_BxLxD, gamma_B)
    out = self.backbone(z_BxLxD, gamma_B, self_cond_BxLxD, dropout_key, return_hidden)
    logits, hidden = out if return_hidden else (out, None)
    if self.use_skip:
      logits = self._add_skip(logits, z_BxLxD, gamma_B, skip_scale, value_dtype=jnp.float32)
    return (logits, hidden) if return_hidden else logits

  def _levels(self, z_BxLxD: Array, gamma_B: Array) -> Array:
    """One float32 noise level per sequence (the length checked)."""
    check_length(z_BxLxD.shape[1], self.max_length)
    gamma_B = jnp.asarray(gamma_B, jnp.float32)
    if gamma_B.ndim == 2:  # per-token levels are averaged, as upstream does
      gamma_B = jnp.mean(gamma_B, axis=-1)
    return jnp.broadcast_to(gamma_B, z_BxLxD.shape[:1])

  def _add_skip(self, logits_BxLxV: Array, z_BxLxD: Array, gamma_B: Array, skip_scale: float | Array,
                value_dtype: Any) -> Array:
    """``logits + skip_scale * c_skip(gamma) * z E^T``; the product's operands in ``value_dtype``."""
    b, l, d = z_BxLxD.shape
    z_NxD, e_VxD = z_BxLxD.reshape(b * l, d).astype(jnp.float32), self.embedding_matrix()
    if is_low_precision(value_dtype):  # a value nothing differentiates (self_cond_input)
      skip_NxV = jnp.einsum(SKIP, z_NxD.astype(value_dtype), e_VxD.astype(value_dtype),
                            preferred_element_type=jnp.float32)
    elif is_low_precision(self.compute_dtype):
      skip_NxV = einsum_low_precision_cotangents(SKIP, z_NxD, e_VxD, self.compute_dtype)
    else:
      skip_NxV = jnp.einsum(SKIP, z_NxD, e_VxD, preferred_element_type=jnp.float32)
    coeff_B = skip_scale * diffusion.skip_coefficient(gamma_B)
    return parallel.constrain(logits_BxLxV + coeff_B[:, None, None] * skip_NxV.reshape(b, l, -1), BLV)

  def self_cond_input(self, z_BxLxD: Array, gamma_B: Array, *, skip_scale: float | Array = 1.0,
                      dropout_key: Array | None = None) -> Array:
    """Training's self-conditioning pre-pass: E^T softmax(logits) of a pass without a
    self-conditioning input, under stop-gradient.

    Nothing differentiates it and it is a network input, so with a low-precision
    ``compute_dtype`` its skip logits and E^T p take that dtype's operands too (float32
    accumulation), where the differentiated pass keeps the skip logits' value float32. The
    likelihood's pre-pass, which ``sc_chain_rule`` differentiates, and the sampler's (the
    previous step's prediction) are float32 products.
    """
    gamma_B = self._levels(z_BxLxD, gamma_B)
    logits = self.backbone(z_BxLxD, gamma_B, None, dropout_key, False)
    if self.use_skip:
      logits = self._add_skip(logits, z_BxLxD, gamma_B, skip_scale, value_dtype=self.compute_dtype)
    x_hat = diffusion.denoised_embedding_from_logits(logits, self.embedding_matrix(), dtype=self.compute_dtype)
    return jax.lax.stop_gradient(x_hat)

  def clean_logits(self, ids_BxL: Array) -> Array:
    """Logits for noiseless embeddings at gamma_min (official forward(input_ids))."""
    gamma_min, _ = self.schedule.endpoints()
    z = self.embed(ids_BxL)
    return self(z, jnp.full((ids_BxL.shape[0],), gamma_min))


def with_embedding_normalised_once(model: LangFlow) -> LangFlow:
  """A copy of ``model`` that stores E already row-normalised (``normalize_embedding`` off): the same
  E without the normalisation of the [V, D] table in every call. For a loop of separate calls (the
  serving engine's ticks); a ``scan`` hoists it by itself. ``model`` is left as it is."""
  if not model.backbone.normalize_embedding:
    return model
  copy = nnx.clone(model)
  copy.backbone.vocab_embed.embedding.set_value(jax.jit(lambda m: m.embedding_matrix())(model))
  copy.backbone.normalize_embedding = False
  return copy


def create_model(config: ml_collections.ConfigDict, seed: int = 0) -> LangFlow:
  """A freshly initialised model for ``config`` (its ``model`` and ``schedule``)."""
  return LangFlow(config.model, config.schedule, rngs=nnx.Rngs(params=seed))


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def flat_params(model: nnx.Module) -> dict[str, nnx.Variable]:
  """Every parameter by its dotted path (``backbone.blocks.0.attn_qkv.kernel``)."""
  return {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def forward_matmul_flops_per_token(model_cfg: ml_collections.ConfigDict, length: int) -> int:
  """Matmul FLOPs of one forward pass per token (the benchmarks' model FLOPs).

  Blocks (q/k/v, output projection, MLP, and QK^T plus AV over ``length``
  keys), the output head, the skip logits z E^T and the self-conditioning
  projection; the gamma MLP and everything elementwise are left out.
  """
  d, v = model_cfg.hidden_size, model_cfg.vocab_size
  per_block = 2 * d * d * (3 + 1 + 2 * model_cfg.mlp_ratio) + 4 * length * d
  flops = model_cfg.n_blocks * per_block + 2 * d * v
  flops += 2 * d * v if model_cfg.use_skip else 0
  flops += 4 * d * d if model_cfg.self_conditioning else 0
  return flops
