"""Device mesh, logical-axis sharding rules, global batches and multi-host set-up.

The distributed engine is JAX's own: ``jax.jit`` with ``NamedSharding`` on a
``Mesh`` of three Auto axes,

* ``data``: pure data parallelism (parameters replicated),
* ``fsdp``: data parallelism with parameters and optimizer state sharded
  (every parameter with a dimension that divides: the rule's dimension
  first, else its largest free one),
* ``tensor``: tensor parallelism over heads, MLP width and vocabulary.

Every parameter names its dimensions with logical axes (``model.py``), and so
do the main activations (:func:`constrain`). ``LOGICAL_RULES`` maps both to
mesh axes, so FSDP, tensor parallelism and data parallelism are config
changes (``--config.mesh.fsdp=8``). A dimension that does not divide by its
mesh axes stays replicated, and a mesh axis is used at most once per value.

Running a function sharded (the recipe the trainer, the sampler and the
likelihood integrator follow)::

    mesh = parallel.make_mesh(config.mesh)               # validated against the devices
    model = parallel.shard_model(model, mesh)            # params placed by the rules
    graphdef, state = nnx.split(model)
    noise = parallel.shard_batch(noise_BxLxD, mesh)      # rows over data x fsdp
    fn = parallel.mesh_jit(f, mesh,                      # activations constrained inside
                           in_shardings=(parallel.tree_shardings(state, mesh),
                                         parallel.batch_sharding(mesh, 3)),
                           out_shardings=parallel.batch_sharding(mesh, 3))
    out = parallel.to_host(fn(state, noise))             # numpy, on every process

Inside ``f``, ``parallel.constrain(x, ("batch", "length", None))`` pins an
intermediate (e.g. noise drawn with ``jax.random`` inside the jit) to the
batch layout; with ``jax_threefry_partitionable`` (the default) random draws
are identical for every mesh. Outside ``mesh_jit`` :func:`constrain` is the
identity, so the same model code runs eagerly on one device.

Data: each process feeds only the rows of the global batch its devices hold
(:func:`data_shard` gives ``(index, count)`` for the loader) and
:func:`global_batch` assembles them into one global array. Processes that
share rows (tensor parallelism across hosts) load the same rows.

Several hosts: :func:`maybe_initialize_distributed` calls
``jax.distributed.initialize()`` when launched as one of several processes
(see docs/scaling.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from langflow_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

MeshAxes = str | tuple[str, ...] | None

# logical axis -> mesh axis or axes (None: replicated). One table for the whole model.
LOGICAL_RULES: dict[str, MeshAxes] = {
    # parameters
    "vocab": "tensor",       # embedding rows, output-head columns
    "embed": "fsdp",         # the model width D
    "embed2": None,          # the [z, s] input of the self-conditioning projection
    "qkv": "tensor",         # fused q/k/v outputs
    "heads": "tensor",       # attention output rows (head-major)
    "mlp": "tensor",         # MLP hidden width
    "modulation": "tensor",  # adaLN shift/scale/gate outputs
    "cond": "fsdp",          # gamma-conditioning width C
    "freq": None,            # sinusoidal features
    "norm": None,            # layer-norm scales
    # activations (see constrain)
    "batch": BATCH_AXES,     # sequences: data parallelism over data x fsdp
    "length": None,          # positions
    "act_heads": "tensor",   # attention heads
    "act_mlp": "tensor",     # MLP hidden units
    "act_vocab": "tensor",   # logits over the vocabulary
}


# --------------------------------------------------------------------------- mesh


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
  """A (data, fsdp, tensor) mesh over ``devices`` (default: all), Auto axes.

  ``jax.make_mesh`` orders the devices for the hardware's interconnect; the
  batch rows of one process stay contiguous as long as the fastest-varying
  axes (fsdp, tensor) do not cross hosts, which holds when they divide the
  number of local devices.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


# --------------------------------------------------------------------------- rules


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh | AbstractMesh) -> P:
  """PartitionSpec for a value with logical ``axes``.

  A dimension whose size does not divide by its mesh axes, or whose mesh axes
  an earlier dimension already uses, stays replicated.
  """
  spec, used = [], set()
  for axis, dim in zip(axes, shape):
    if axis is not None and axis not in LOGICAL_RULES:
      raise ValueError(f"logical axis '{axis}' has no sharding rule")
    rule = LOGICAL_RULES.get(axis) if axis is not None else None
    names = tuple(n for n in _mesh_axes_of(rule) if mesh.shape[n] > 1)
    size = math.prod(mesh.shape[n] for n in names)
    if not names or dim % size or used & set(names):
      spec.append(None)
      continue
    used |= set(names)
    spec.append(names[0] if len(names) == 1 else names)
  return P(*spec)


def _is_var(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _mesh_axes_of(entry: Any) -> tuple[str, ...]:
  return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def _with_fsdp(spec: P, shape: tuple[int, ...], mesh: Mesh | AbstractMesh) -> P:
  """Shards a parameter over ``fsdp`` on its largest free dividing dim if its rules did not.

  E.g. the adaLN kernels [C, 6D] once C=128 no longer divides by fsdp=256.
  """
  size = mesh.shape["fsdp"]
  entries = list(spec) + [None] * (len(shape) - len(spec))
  if size == 1 or any("fsdp" in _mesh_axes_of(e) for e in entries):
    return spec
  free = [i for i, (e, dim) in enumerate(zip(entries, shape)) if e is None and dim % size == 0]
  if not free:
    return spec
  entries[max(free, key=lambda i: shape[i])] = "fsdp"
  return P(*entries)


def tree_shardings(tree: Any, mesh: Mesh | AbstractMesh) -> Any:
  """NamedShardings for a pytree of parameters, optimizer state or a train state.

  Variables carrying ``logical_axes`` follow the rules, plus the FSDP
  fallback (optimizer moments and the EMA inherit the axes from the
  parameters); everything else (counters, keys, buffers) is replicated.
  """
  def leaf_sharding(x):
    if _is_var(x):
      if not hasattr(x.get_raw_value(), "shape"):
        return x  # e.g. optax's MaskedNode: no arrays, nothing to place
      axes = x.get_metadata().get("logical_axes")
      shape = tuple(x.shape)
      if axes is None or len(axes) != len(shape):
        return x.replace(NamedSharding(mesh, P()))
      return x.replace(NamedSharding(mesh, _with_fsdp(logical_to_spec(tuple(axes), shape, mesh), shape, mesh)))
    return NamedSharding(mesh, P())

  return jax.tree.map(leaf_sharding, tree, is_leaf=_is_var)


def _context_mesh() -> AbstractMesh | None:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return None
  return mesh


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Pins an activation to the layout its logical ``axes`` give on the current mesh.

  Without the constraints XLA may keep FSDP weights sharded and split the
  contraction instead, which replicates activations (the full batch of
  logits on every device). The identity outside :func:`mesh_jit`.
  """
  mesh = _context_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)))


def constrain_tree(tree: Any) -> Any:
  """:func:`constrain` for a tree of Variables (e.g. gradients) by their logical axes."""
  mesh = _context_mesh()
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, tree_shardings(tree, mesh))


def mesh_jit(fn: Callable, mesh: Mesh, **jit_kwargs) -> Callable:
  """``jax.jit(fn, **jit_kwargs)`` traced with ``mesh`` in context.

  Pass explicit ``in_shardings``/``out_shardings`` (and ``donate_argnums``
  where an input's buffers may be reused); :func:`constrain` calls inside
  ``fn`` then refer to ``mesh``. The result has ``.lower()`` like any jit.
  """
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return jax.jit(traced, **jit_kwargs)


# --------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(global_batch: int, mesh: Mesh, what: str = "train.batch_size", grad_accum: int = 1) -> None:
  """The batch (and each micro-batch) must split evenly over data x fsdp."""
  dp = data_parallel_size(mesh)
  if global_batch % (dp * grad_accum):
    micro = f" in {grad_accum} micro-batches (train.grad_accum)" if grad_accum > 1 else ""
    raise ConfigError(f"{what}={global_batch}{micro} is not divisible by the data-parallel size {dp} "
                      f"(mesh data x fsdp).", f"use a multiple of {dp * grad_accum}.")


@functools.lru_cache(maxsize=16)
def data_shard(mesh: Mesh) -> tuple[int, int]:
  """``(index, count)``: this process feeds row block ``index`` of ``count`` of every batch.

  The blocks are the batch rows held by the process's devices. Processes
  whose devices hold the same rows (a tensor axis across hosts) get the same
  index and must load the same rows.
  """
  fsdp = mesh.shape["fsdp"]
  me = jax.process_index()
  slots = sorted({i * fsdp + j for (i, j, _), d in np.ndenumerate(mesh.devices) if d.process_index == me})
  if not slots:
    raise ConfigError(f"process {me} owns no device of the mesh.", "build the mesh over all devices (jax.devices()).")
  n, dp = len(slots), data_parallel_size(mesh)
  if slots != list(range(slots[0], slots[0] + n)) or slots[0] % n or dp % n:
    raise ConfigError(
        f"the mesh gives process {me} the batch blocks {slots} of {dp}, which are not one contiguous block.",
        "make mesh.fsdp x mesh.tensor divide the number of devices per host, or fsdp a multiple of it.")
  return slots[0] // n, dp // n


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows (see :func:`data_shard`) into global arrays over the batch axes."""
  _, count = data_shard(mesh)
  out = {}
  for k, v in local.items():
    shape = (v.shape[0] * count,) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v, shape)
  return out


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
  """A host value that is the same on every process, as a global array with ``sharding``.

  Each process copies only its devices' shards. An array already placed so
  is returned as it is.
  """
  if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
    return x
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Global host arrays (the same on every process) split over the batch axes.

  For sampler noise, prompts or ids that every process can build itself; a
  leading dimension that does not divide by data x fsdp stays replicated.
  """
  def put(x):
    ndim = np.ndim(x)
    return put_global(x, rows_sharding(mesh, ndim, np.shape(x)[0]) if ndim else replicated(mesh))

  return jax.tree.map(put, tree)


def rows_sharding(mesh: Mesh, ndim: int, rows: int, batch_dim: int = 0) -> NamedSharding:
  """Values whose dim ``batch_dim`` holds ``rows`` sequences: that dim over data x fsdp
  where ``rows`` divides (else replicated, as :func:`shard_batch` places it), the rest replicated."""
  axes, shape = [None] * ndim, [1] * ndim
  axes[batch_dim], shape[batch_dim] = "batch", rows
  return NamedSharding(mesh, logical_to_spec(tuple(axes), tuple(shape), mesh))


@dataclasses.dataclass(frozen=True)
class Frozen:
  """A pytree (e.g. of shardings) as a hashable value, to key caches of compiled functions."""

  treedef: Any
  leaves: tuple

  @classmethod
  def of(cls, tree: Any) -> "Frozen":
    leaves, treedef = jax.tree.flatten(tree)
    return cls(treedef, tuple(leaves))

  def thaw(self) -> Any:
    return jax.tree.unflatten(self.treedef, self.leaves)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """The model with its variables placed on ``mesh`` by the rules (in place; returned)."""
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, tree_shardings(state, mesh)))
  return model


def to_host(tree: Any) -> Any:
  """Numpy copies of (possibly multi-host) global arrays, on every process."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils

      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(get, tree)


# --------------------------------------------------------------------------- several hosts


def distributed_init_args(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
  """Arguments for ``jax.distributed.initialize``, or None on a single process.

  * ``JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=n JAX_PROCESS_ID=i``:
    an explicit launch (JAX reads the address itself, not the other two);
  * SLURM or Open MPI with more than one task, or a multi-host TPU slice:
    JAX detects everything (``{}``);
  * ``LANGFLOW_JAX_DISTRIBUTED=1`` forces auto-detection (e.g. TPU VMs whose
    worker list only the metadata server knows), ``=0`` disables it.
  """
  env = os.environ if env is None else env
  forced = env.get("LANGFLOW_JAX_DISTRIBUTED", "").strip()
  if forced == "0":
    return None
  if env.get("JAX_COORDINATOR_ADDRESS"):
    try:
      n, i = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
    except (KeyError, ValueError) as e:
      raise ConfigError("JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES or JAX_PROCESS_ID is missing "
                        "or not an integer.",
                        "set JAX_NUM_PROCESSES=<processes> and JAX_PROCESS_ID=<0..n-1> on every process.") from e
    if not 0 <= i < n:
      raise ConfigError(f"JAX_PROCESS_ID={i} is not in [0, JAX_NUM_PROCESSES={n}).",
                        "number the processes 0..n-1.")
    return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"], "num_processes": n, "process_id": i}
  if forced == "1":
    return {}
  several = lambda key: env.get(key, "1").isdigit() and int(env.get(key, "1")) > 1
  # inside an srun step with several tasks (not a batch script that merely asked for them)
  slurm_tasks = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
  if (("SLURM_STEP_NODELIST" in env and several(slurm_tasks)) or several("OMPI_COMM_WORLD_SIZE")
      or "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env):
    return {}
  return None


def maybe_initialize_distributed() -> None:
  """``jax.distributed.initialize()`` when launched as one of several processes.

  Call it before anything touches a device. On one process with nothing set
  it does nothing, and a second call is harmless.
  """
  args = distributed_init_args()
  if args is None or jax.distributed.is_initialized():
    return
  jax.distributed.initialize(**args)


# --------------------------------------------------------------------------- memory


def per_device_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of ``tree`` (arrays or ShapeDtypeStructs) under ``shardings``."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shape = s.shard_shape(tuple(x.shape)) if x.shape else ()
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total
