"""Device mesh, logical-axis sharding rules and global batches.

The distributed engine is JAX's own: ``jax.jit`` with ``NamedSharding`` on a
``Mesh`` of three axes,

* ``data``: pure data parallelism (parameters replicated),
* ``fsdp``: data parallelism with parameters and optimizer state sharded,
* ``tensor``: tensor parallelism over heads, MLP width and vocabulary.

Every parameter names its dimensions with logical axes (``model.py``);
``LOGICAL_RULES`` maps them to mesh axes, so FSDP, tensor parallelism and data
parallelism are config changes (``--config.mesh.fsdp=8``). A dimension that
does not divide by its mesh axis stays replicated.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from langflow_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (None: replicated). One table for the whole model.
LOGICAL_RULES: dict[str, str | None] = {
    "vocab": "tensor",       # embedding rows, output-head columns
    "embed": "fsdp",         # the model width D
    "embed2": None,          # the [z, s] input of the self-conditioning projection
    "qkv": "tensor",         # fused q/k/v outputs (head-major inside each third)
    "heads": "tensor",       # attention output rows
    "mlp": "tensor",         # MLP hidden width
    "modulation": "tensor",  # adaLN shift/scale/gate outputs
    "cond": None,            # gamma-conditioning width C
    "freq": None,            # sinusoidal features
    "norm": None,            # layer-norm scales
}


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Resolves one -1 entry to the remaining devices and checks the product."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} has more than one -1.",
                      "give at most one mesh axis as -1 (it takes the remaining devices).")
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} has a size below 1.", "use positive sizes or -1.")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} does not fit {num_devices} devices.",
                        f"make the fixed axes multiply to a divisor of {num_devices}.")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {math.prod(sizes)} devices, "
        f"but {num_devices} are available.",
        f"choose sizes whose product is {num_devices} (or set one axis to -1).")
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over ``devices`` (default: all), Auto axes."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
  """PartitionSpec for a value with ``axes``, replicating non-divisible dims."""
  spec = []
  for axis, dim in zip(axes, shape):
    mesh_axis = LOGICAL_RULES.get(axis) if axis is not None else None
    if axis is not None and axis not in LOGICAL_RULES:
      raise ValueError(f"logical axis '{axis}' has no sharding rule")
    if mesh_axis is not None and (mesh.shape[mesh_axis] == 1 or dim % mesh.shape[mesh_axis]):
      mesh_axis = None
    spec.append(mesh_axis)
  return P(*spec)


def _is_var(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree of parameters, optimizer state or a train state.

  Variables carrying ``logical_axes`` follow the rules; everything else
  (counters, keys, buffers) is replicated.
  """
  def leaf_sharding(x):
    if _is_var(x):
      if not hasattr(x.get_raw_value(), "shape"):
        return x  # e.g. optax's MaskedNode: no arrays, nothing to place
      axes = x.get_metadata().get("logical_axes")
      shape = tuple(x.shape)
      spec = logical_to_spec(tuple(axes), shape, mesh) if axes is not None and len(axes) == len(shape) else P()
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(leaf_sharding, tree, is_leaf=_is_var)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(global_batch: int, mesh: Mesh, what: str = "train.batch_size") -> None:
  dp = data_parallel_size(mesh)
  if global_batch % dp:
    raise ConfigError(f"{what}={global_batch} is not divisible by the data-parallel size {dp} "
                      f"(mesh data x fsdp).", f"use a multiple of {dp}.")


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows into global arrays sharded over the batch axes."""
  out = {}
  for k, v in local.items():
    sharding = batch_sharding(mesh, v.ndim)
    shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
  return out


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, NamedSharding(mesh, P()))


def maybe_initialize_distributed() -> None:
  """``jax.distributed.initialize()`` when launched as one of several processes.

  Multi-process launches (SLURM, TPU pods, or JAX_COORDINATOR_ADDRESS with
  JAX_NUM_PROCESSES and JAX_PROCESS_ID) are detected by JAX itself; on a single
  host with nothing set this is a no-op.
  """
  import os

  launched = any(k in os.environ for k in (
      "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
  if not launched or jax.distributed.is_initialized():
    return
  jax.distributed.initialize()


def param_summary(state: Any) -> list[tuple[str, tuple[int, ...], str]]:
  """(path, shape, partition spec) for every parameter: the startup sharding dump."""
  rows = []
  for path, var in nnx.to_flat_state(state):
    value = var[...] if _is_var(var) else var
    spec = getattr(getattr(value, "sharding", None), "spec", None)
    rows.append((".".join(map(str, path)), tuple(value.shape), str(spec) if spec is not None else "-"))
  return rows


def to_float32(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
