"""The train state and the optimizer that updates it.

:class:`TrainState` is the pytree a checkpoint stores (``checkpoint.py``):
parameters, their EMA, the optimizer state, the step, the root key of every
per-step key and the model's non-trainable buffers. :func:`make_optimizer` is
AdamW with warm-up, decay and clipping (the schedule's parameters get their
own learning-rate scale); :func:`abstract_train_state` gives its shapes with
no arrays allocated, which is what a restore or an ahead-of-time compile
needs. The trainer (``train.py``) steps it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from langflow_jax.errors import ConfigError
from langflow_jax.methods import create_model

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array
  params: nnx.State
  ema_params: nnx.State
  opt_state: optax.OptState
  rng: Array  # raw uint32[2] key: the root of every per-step key
  buffers: nnx.State  # non-trainable model buffers (RoPE frequencies), saved as loaded


@dataclasses.dataclass
class ModelParts:
  """The static half of the model (graph and non-trainable buffers)."""

  graphdef: Any
  rest: nnx.State

  @classmethod
  def from_state(cls, graphdef: Any, state: "TrainState") -> "ModelParts":
    # A copy: the train step donates the state, buffers included.
    return cls(graphdef, jax.tree.map(jnp.copy, state.buffers))

  def merge(self, params: nnx.State) -> nnx.Module:
    return nnx.merge(self.graphdef, params, self.rest)


# --------------------------------------------------------------------------- optimizer


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up to ``lr``, then constant, cosine or linear decay."""
  warmup = max(int(cfg.warmup_steps), 0)
  decay_steps = max(total_steps - warmup, 1)
  end = cfg.lr * cfg.min_lr_ratio
  if cfg.decay == "constant":
    after = optax.constant_schedule(cfg.lr)
  elif cfg.decay == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
  elif cfg.decay == "linear":
    after = optax.linear_schedule(cfg.lr, end, decay_steps)
  else:
    raise ConfigError(f"unknown optimizer.decay '{cfg.decay}'.", "use constant, cosine or linear.")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def _param_labels(params: nnx.State, separate_embedding: bool = False) -> nnx.State:
  """'schedule' for the noise-schedule parameters, 'network' for the rest; with
  ``separate_embedding`` the token-embedding table (``vocab_embed``, every method) is 'embedding'."""
  def label(path, _):
    keys = [getattr(k, "key", None) for k in path]
    if keys and keys[0] == "schedule":
      return "schedule"
    return "embedding" if separate_embedding and "vocab_embed" in keys else "network"
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """AdamW (decay on matrices only) with clipping; the schedule, and the token
  embeddings when ``embedding_lr_scale`` is not 1, get their own lr scales."""
  lr = learning_rate_schedule(cfg, total_steps)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)

  def adamw(scale: float) -> optax.GradientTransformation:
    rate = lr if scale == 1.0 else (lambda step: lr(step) * scale)
    return optax.adamw(rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)

  groups = {"network": adamw(1.0),
            "schedule": optax.adam(lambda step: lr(step) * cfg.schedule_lr_scale, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)}
  # A group of its own only when it differs, so the optimizer state of runs
  # trained before this option existed still restores.
  separate = cfg.embedding_lr_scale != 1.0
  if separate:
    groups["embedding"] = adamw(cfg.embedding_lr_scale)
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(optax.multi_transform(groups, lambda params: _param_labels(params, separate)))
  return optax.chain(*parts)


def ema_update(ema: nnx.State, params: nnx.State, step: Array, decay: float) -> nnx.State:
  """EMA with the usual warm-up: the effective decay is min(decay, (1+t)/(10+t))."""
  t = step.astype(jnp.float32)
  d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


# --------------------------------------------------------------------------- state


def split_model(model: nnx.Module) -> tuple[ModelParts, nnx.State]:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return ModelParts(graphdef, rest), params


def fresh_train_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation) -> TrainState:
  """A newly initialised state (call under jit or eval_shape)."""
  return state_from_model(create_model(config, seed=config.train.seed), tx, config.train.seed)


def state_from_model(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """Step 0 with ``model``'s weights as both raw and EMA parameters."""
  parts, params = split_model(model)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=tx.init(params), rng=training_root_key(seed), buffers=parts.rest)


# nnx.Rngs(params=seed) draws its i-th init key as fold_in(PRNGKey(seed), i); the
# per-step keys fold_in(root, step) must not repeat those, so the root is salted.
TRAIN_KEY_SALT = 0x74726E  # "trn"


def training_root_key(seed: int) -> Array:
  return jax.random.fold_in(jax.random.PRNGKey(seed), TRAIN_KEY_SALT)


def abstract_train_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation):
  """(graphdef, abstract TrainState) with no arrays allocated."""
  abstract_state = jax.eval_shape(lambda: fresh_train_state(config, tx))
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: create_model(config, seed=config.train.seed)))
  return graphdef, abstract_state
