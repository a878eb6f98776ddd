import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from langflow_jax import diffusion, model as M
from langflow_jax.config import base_config
from langflow_jax.errors import ConfigError
from tests.conftest import small_config


def make(**kw):
  cfg = small_config(vocab_size=50, **kw)
  return cfg, M.create_model(cfg, seed=0)


def randomize_zero_inits(model, scale=0.1):
  """Zero-initialised layers hide the network at init; give them values."""
  key = jax.random.PRNGKey(7)
  layers = [model.backbone.output_layer.linear, model.backbone.output_layer.ada, model.backbone.self_cond_proj]
  layers += [b.ada for b in model.backbone.blocks]
  for layer in layers:
    key, sub = jax.random.split(key)
    layer.kernel.set_value(jax.random.normal(sub, layer.kernel.shape) * scale)


def inputs(b=2, l=16, d=32, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return jax.random.normal(k1, (b, l, d)), jnp.array([3.0, 8.0])[:b], jax.random.normal(k2, (b, l, d))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(dtype):
  _, model = make(compute_dtype=dtype)
  z, g, s = inputs()
  logits = model(z, g, s)
  assert logits.shape == (2, 16, 50) and logits.dtype == jnp.float32
  params = nnx.state(model, nnx.Param)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_embeddings_are_normalised_to_sqrt_d():
  _, model = make()
  e = model.embedding_matrix()
  np.testing.assert_allclose(np.linalg.norm(np.asarray(e), axis=-1), np.sqrt(32), rtol=1e-5)


def test_output_at_init_is_the_exact_gaussian_posterior():
  # With the official zero head, zero-initialised adaLN/output layers make the network
  # logits 0, so the model starts as the skip term: log N(z; alpha E[v], sigma^2) + const.
  _, model = make(logit_init_std=0.0)
  z, g, _ = inputs()
  logits = model(z, g)
  e = model.embedding_matrix()
  a, s = diffusion.alpha_sigma(g)
  log_lik = -jnp.sum((z[:, :, None, :] - a[:, None, None, None] * e[None, None]) ** 2, -1) / (
      2 * s[:, None, None] ** 2)
  np.testing.assert_allclose(np.asarray(jax.nn.log_softmax(logits)), np.asarray(jax.nn.log_softmax(log_lik)),
                             rtol=1e-4, atol=1e-3)


def block_gradients(model, z, g, ids):
  """Gradient norm of the CE w.r.t. each block's adaLN kernel (gates included), at init."""

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    logits = nnx.merge(graphdef, params, rest)(z, g)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], -1))

  blocks = jax.grad(loss)(params)["backbone"]["blocks"]
  return [float(jnp.linalg.norm(blocks[i]["ada"]["kernel"][...])) for i in range(len(model.backbone.blocks))]


@pytest.mark.parametrize("logit_init_std", [0.0, None, 1.0])  # None: the config's default
def test_default_head_init_lets_the_blocks_learn_from_step_zero(logit_init_std):
  # With a zero head every block (zero-gated, so the identity) gets no gradient: the
  # network starts at a stationary point of the loss (with the skip term and a unigram
  # bias, the context-free posterior) and leaves it only by noise. A random head
  # N(0, std^2 / D) gives the gates a gradient at once.
  std = base_config().model.logit_init_std if logit_init_std is None else logit_init_std
  assert logit_init_std is not None or std > 0, "the default head must not start at the saddle"
  cfg, model = make(logit_init_std=std)
  z, g, _ = inputs()
  ids = jax.random.randint(jax.random.PRNGKey(3), z.shape[:2], 0, cfg.model.vocab_size)
  norms = block_gradients(model, z, g, ids)
  if std == 0.0:
    assert norms == [0.0] * len(norms)
  else:
    assert min(norms) > 1e-4 * std
    logits = model.backbone(z, g, None)  # network part only: the initial logits ~ N(0, std^2)
    assert 0.8 * std < float(jnp.std(logits)) < 1.2 * std


def test_self_conditioning_input_changes_output():
  _, model = make()
  z, g, s = inputs()
  randomize_zero_inits(model)
  assert not np.allclose(np.asarray(model(z, g, s)), np.asarray(model(z, g, None)))
  np.testing.assert_array_equal(np.asarray(model(z, g, jnp.zeros_like(s))), np.asarray(model(z, g, None)))


def test_dropout_only_with_a_key():
  cfg, model = make(dropout=0.5)
  z, g, _ = inputs()
  randomize_zero_inits(model)
  a, b = model(z, g), model(z, g)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c = model(z, g, dropout_key=jax.random.PRNGKey(0))
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_sequence_longer_than_model_is_a_clear_error():
  _, model = make()
  z = jnp.zeros((1, 33, 32))
  with pytest.raises(ConfigError, match="longer than the model's max_length 32"):
    model(z, jnp.array([3.0]))


def test_per_token_gamma_is_averaged():
  _, model = make()
  z, _, _ = inputs(b=1)
  np.testing.assert_allclose(np.asarray(model(z, jnp.array([[2.0, 4.0]]))), np.asarray(model(z, jnp.array([3.0]))),
                             rtol=1e-6)


def test_rotary_matches_rotate_half_definition():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 2, 8))
  cos, sin = M.rotary_tables(M.rotary_inv_freq(8), 5)
  out = np.asarray(M.apply_rotary(x, cos, sin))
  xn = np.asarray(x)
  for p in range(5):
    for j in range(4):
      theta = p / 10000 ** (2 * j / 8)
      x1, x2 = xn[0, p, :, j], xn[0, p, :, j + 4]
      np.testing.assert_allclose(out[0, p, :, j], x1 * np.cos(theta) - x2 * np.sin(theta), rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(out[0, p, :, j + 4], x2 * np.cos(theta) + x1 * np.sin(theta), rtol=1e-5, atol=1e-6)


def test_bad_head_split_is_a_config_error():
  with pytest.raises(ConfigError, match="heads of even width"):
    make(n_heads=3)


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_jax_attention_kernels_match_the_einsum_kernel(impl):
  """model.attention routes through jax.nn.dot_product_attention; same maths, masked or not."""
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(3), 3)
  q = jax.random.normal(kq, (2, 5, 4, 8))
  k, v = jax.random.normal(kk, (2, 7, 4, 8)), jax.random.normal(kv, (2, 7, 4, 8))
  causal_5x7 = jnp.arange(7)[None, :] <= 2 + jnp.arange(5)[:, None]  # a KV-cache step's mask
  for mask in (None, causal_5x7):
    ours = M.dot_product_attention(q, k, v, mask, impl="einsum")
    np.testing.assert_allclose(np.asarray(M.dot_product_attention(q, k, v, mask, impl=impl)), np.asarray(ours),
                               rtol=1e-5, atol=1e-6)
  cfg_e, model_e = make()
  cfg_j, model_j = make(attention=impl)
  randomize_zero_inits(model_e)
  randomize_zero_inits(model_j)
  z, g, s = inputs()
  np.testing.assert_allclose(np.asarray(model_j(z, g, s)), np.asarray(model_e(z, g, s)), rtol=1e-5, atol=1e-5)


def test_unknown_attention_kernel_is_a_config_error():
  from langflow_jax.config import validate
  cfg = base_config()
  cfg.model.attention = "flash"
  with pytest.raises(ConfigError, match="model.attention"):
    validate(cfg)


# ----------------------------------------------------------------------------- the bfloat16 products


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, str]]:
  """(lhs dtype, rhs dtype) of every dot in compiled HLO text."""
  import re

  types = {m.group(1): m.group(2) for m in re.finditer(r"%([\w.\-]+) = (\w+)\[", hlo)}
  return [(types.get(a), types.get(b)) for a, b in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)]


@pytest.mark.parametrize("spec,shapes", [(M.MATMUL, ((64, 32), (32, 48))),
                                         ("bhqk,bhsk->bhqs", ((2, 3, 8, 4), (2, 3, 8, 4)))])
def test_low_precision_einsum_value_jvp_and_gradient_follow_the_float32_product(spec, shapes):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  a, b = (jax.random.normal(k, s) for k, s in zip(keys[:2], shapes))
  ta, tb = (jax.random.normal(k, s) for k, s in zip(keys[2:], shapes))
  bf = jnp.bfloat16
  low = lambda a, b: M.low_precision_einsum(spec, a.astype(bf), b.astype(bf))  # noqa: E731
  exact = lambda a, b: jnp.einsum(spec, a, b)  # noqa: E731
  assert low(a, b).dtype == jnp.float32
  rel = lambda x, y: float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))  # noqa: E731
  assert rel(low(a, b), exact(a, b)) < 1e-2  # bf16 rounding of the operands only
  _, t_low = jax.jvp(low, (a, b), (ta, tb))
  _, t_exact = jax.jvp(exact, (a, b), (ta, tb))
  assert rel(t_low, t_exact) < 2e-2
  w = jax.random.normal(jax.random.PRNGKey(9), low(a, b).shape)
  g_low = jax.grad(lambda a, b: jnp.sum(w * low(a, b)), argnums=(0, 1))(a, b)
  g_exact = jax.grad(lambda a, b: jnp.sum(w * exact(a, b)), argnums=(0, 1))(a, b)
  for x, y in zip(g_low, g_exact):
    assert x.dtype == jnp.float32 and rel(x, y) < 2e-2


def test_bfloat16_linear_runs_every_product_of_its_gradient_on_bf16_operands():
  # The point of the low-precision path: XLA:CPU computes a bf16 x bf16 -> f32 product natively,
  # but turns nnx.Linear's bf16-result product, and jax's own transposes, into float32 products.
  layer = M.linear(64, 128, ("embed", "mlp"), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.PRNGKey(1), (256, 64))

  def loss(state, x):
    return jnp.sum(jnp.square(nnx.merge(graphdef, state)(x).astype(jnp.float32)))

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile().as_text()
  dots = _dot_operand_dtypes(hlo)
  assert len(dots) == 3, dots  # the product, the input's and the kernel's cotangents
  assert all(d == ("bf16", "bf16") for d in dots), dots
  # the same numbers as the float32 layer, to bf16 rounding
  ref = M.linear(64, 128, ("embed", "mlp"), rngs=nnx.Rngs(0), dtype=jnp.float32)
  y, y_ref = layer(x), ref(x)
  assert y.dtype == jnp.float32  # accumulated and returned in float32
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=3e-2, atol=3e-2)


def test_skip_product_keeps_float32_value_and_tangent_and_runs_zs_cotangent_on_bf16_operands():
  # The skip logits z E^T reach several hundred nats at low noise: their value and forward-mode
  # tangent stay float32 products; only training's cotangent products take bf16 operands.
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  z, e = jax.random.normal(keys[0], (64, 16)), jax.random.normal(keys[1], (40, 16))
  tz, te = jax.random.normal(keys[2], z.shape), jax.random.normal(keys[3], e.shape)
  low = lambda z, e: M.einsum_low_precision_cotangents(M.SKIP, z, e, jnp.bfloat16)  # noqa: E731
  exact = lambda z, e: jnp.einsum(M.SKIP, z, e, precision="highest")  # noqa: E731
  np.testing.assert_allclose(np.asarray(low(z, e)), np.asarray(exact(z, e)), rtol=1e-5, atol=1e-5)
  (_, t_low), (_, t_exact) = jax.jvp(low, (z, e), (tz, te)), jax.jvp(exact, (z, e), (tz, te))
  np.testing.assert_allclose(np.asarray(t_low), np.asarray(t_exact), rtol=1e-5, atol=1e-4)
  w = jax.random.normal(jax.random.PRNGKey(9), (64, 40))
  grad = lambda f: jax.grad(lambda z, e: jnp.sum(w * f(z, e)), argnums=(0, 1))  # noqa: E731
  rel = lambda x, y: float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))  # noqa: E731
  # z's cotangent on bf16 operands; E's too, but on CPU (a transposed left operand there) float32
  on_cpu = jax.default_backend() == "cpu"
  (gz, ge), (gz_exact, ge_exact) = grad(low)(z, e), grad(exact)(z, e)
  assert gz.dtype == jnp.float32 and 1e-5 < rel(gz, gz_exact) < 1e-2  # bf16-rounded operands
  assert ge.dtype == jnp.float32 and (rel(ge, ge_exact) < 1e-5 if on_cpu else 1e-5 < rel(ge, ge_exact) < 1e-2)
  dots = _dot_operand_dtypes(jax.jit(grad(low)).lower(z, e).compile().as_text())
  want = [("bf16", "bf16"), ("f32", "f32")] if on_cpu else [("bf16", "bf16")] * 2
  assert sorted(dots) == want, dots  # the forward's own product is not needed


def _vocab_dot_dtypes(hlo: str, vocab: int) -> list[tuple[str, str]]:
  """(lhs, rhs) dtypes of the compiled dots that have a vocabulary-sized operand dimension."""
  import re

  shapes = {m.group(1): (m.group(2), m.group(3).split(",")) for m in re.finditer(r"%([\w.\-]+) = (\w+)\[([\d,]*)\]", hlo)}
  out = []
  for a, b in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo):
    if str(vocab) in shapes[a][1] + shapes[b][1]:
      out.append((shapes[a][0], shapes[b][0]))
  return out


@pytest.mark.parametrize("dtype,want", [("float32", "f32"), ("bfloat16", "bf16")])
def test_training_pre_pass_is_the_stop_gradient_denoiser_with_its_vocab_products_in_the_compute_dtype(dtype, want):
  _, model = make(compute_dtype=dtype)
  randomize_zero_inits(model)
  z, g, _ = inputs()
  x_sc = model.self_cond_input(z, g)
  rel = float(jnp.linalg.norm(x_sc - model.denoise(model(z, g, None))) / jnp.linalg.norm(x_sc))
  assert rel < (1e-6 if dtype == "float32" else 2e-2)
  graphdef, state = nnx.split(model)
  hlo = jax.jit(lambda st, z: nnx.merge(graphdef, st).self_cond_input(z, g)).lower(state, z).compile().as_text()
  dots = _vocab_dot_dtypes(hlo, 50)
  assert len(dots) == 3 and all(d == (want, want) for d in dots), dots  # head, skip logits, E^T p
  assert float(jnp.abs(jax.grad(lambda z: jnp.sum(model.self_cond_input(z, g)))(z)).max()) == 0.0


def test_bfloat16_model_supports_forward_mode_as_the_likelihood_uses_it():
  _, model = make(compute_dtype="bfloat16")
  randomize_zero_inits(model)
  z, g, s = inputs()
  u = jax.random.normal(jax.random.PRNGKey(5), z.shape)
  _, t = jax.jvp(lambda z: model(z, g, s), (z,), (u,))
  _, model32 = make(compute_dtype="float32")
  randomize_zero_inits(model32)
  _, t32 = jax.jvp(lambda z: model32(z, g, s), (z,), (u,))
  assert t.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(t)))
  assert float(jnp.linalg.norm(t - t32) / jnp.linalg.norm(t32)) < 5e-2


def test_embedding_normalised_once_is_the_same_model_and_leaves_the_original():
  _, model = make()
  randomize_zero_inits(model)
  z, g, s = inputs()
  before = np.asarray(model.backbone.vocab_embed.embedding[...])
  copy = M.with_embedding_normalised_once(model)
  assert not copy.backbone.normalize_embedding and model.backbone.normalize_embedding
  np.testing.assert_array_equal(np.asarray(model.backbone.vocab_embed.embedding[...]), before)
  stored = np.asarray(copy.backbone.vocab_embed.embedding[...])
  np.testing.assert_allclose(np.linalg.norm(stored, axis=-1), np.sqrt(stored.shape[-1]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(copy(z, g, s)), np.asarray(model(z, g, s)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 5, 300), (2, 257), (4, M.ARGMAX_BLOCK), (2, 7), (3, 2 * M.ARGMAX_BLOCK)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32])
def test_vocab_argmax_is_jnp_argmax_with_ties_infinities_and_nan(shape, dtype):
  x = jax.random.normal(jax.random.PRNGKey(0), shape) * 3
  cases = {"values": x, "ties": jnp.round(x)}  # many equal maxima: the first index must win
  if dtype != jnp.int32:
    v = shape[-1]
    cases["nan after +inf"] = x.at[..., 1].set(jnp.inf).at[..., v // 2].set(jnp.nan)
    cases["+inf in the last block"] = x.at[..., v - 1].set(jnp.inf)
    cases["all -inf"] = jnp.full(shape, -jnp.inf)
  for name, case in cases.items():
    case = case.astype(dtype)
    got = jax.jit(M.vocab_argmax)(case)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(case, axis=-1)), err_msg=name)


def test_vocab_categorical_is_the_same_draw_as_jax_random_categorical():
  logits = jax.random.normal(jax.random.PRNGKey(1), (4, 9, 500)) * 2
  for seed in range(3):
    key = jax.random.PRNGKey(seed)
    np.testing.assert_array_equal(np.asarray(jax.jit(M.vocab_categorical)(key, logits)),
                                  np.asarray(jax.random.categorical(key, logits, axis=-1)))


def test_chosen_log_probs_are_the_log_softmax_at_the_tokens():
  logits = jax.random.normal(jax.random.PRNGKey(2), (3, 6, 40)).astype(jnp.bfloat16) * 4
  tokens = jax.random.randint(jax.random.PRNGKey(3), (3, 6), 0, 40)
  want = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1), tokens[..., None], -1)[..., 0]
  got = M.chosen_log_probs(logits, tokens)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_posterior_input_is_each_positions_own_posterior_mean_through_a_zero_started_projection():
  cfg, plain = make()
  cfg.model.posterior_input = True
  model = M.create_model(cfg, seed=0)
  z, gamma, s = inputs(d=cfg.model.hidden_size)
  # At init the projection is zero: the same function as the model without the input.
  np.testing.assert_array_equal(np.asarray(model(z, gamma, s)), np.asarray(plain(z, gamma, s)))
  assert not hasattr(plain.backbone, "posterior_proj")  # the official layout is unchanged without it
  # The feature: E^T softmax(c_skip(gamma) z E^T), the Gaussian posterior of a uniform prior, per position.
  e = np.asarray(model.embedding_matrix(), np.float64)
  c = np.exp((np.logaddexp(0, -np.asarray(gamma, np.float64)) - np.asarray(gamma, np.float64)) / 2)
  logits = c[:, None, None] * np.einsum("bld,vd->blv", np.asarray(z, np.float64), e)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  want = (p / p.sum(-1, keepdims=True)) @ e
  np.testing.assert_allclose(np.asarray(model.backbone.token_posterior_mean(z, gamma)), want, rtol=1e-4, atol=1e-4)
  # Once the projection has weights the network's output depends on it.
  proj = model.backbone.posterior_proj.kernel
  proj.set_value(jax.random.normal(jax.random.PRNGKey(5), proj.shape) * 0.1)
  randomize_zero_inits(model)
  randomize_zero_inits(plain)
  assert float(jnp.abs(model(z, gamma, s) - plain(z, gamma, s)).max()) > 1e-3
