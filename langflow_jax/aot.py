"""Ahead-of-time check: compile the train step for N devices, report memory per device.

    langflow-jax aot --config owt --devices 64 [--memory-gb 80] [--config.mesh.fsdp=-1 ...]

The train step of ``config`` is lowered and compiled for a mesh of N
devices without running anything and without real hardware: the devices are
simulated CPU devices (``jax_num_cpu_devices``), parameters and batches are
abstract (``jax.ShapeDtypeStruct`` with shardings). The report splits one
device's memory into parameters, EMA, optimizer state and batch (exact,
from the shardings) and XLA's own figures for the compiled program
(arguments, outputs, temporaries such as activations and gradients).

The compiled program is the CPU backend's; GPU and TPU compilers fuse and
schedule differently, so treat the temporaries as an estimate (typically
within a small factor) and the state figures as exact. That is enough to
learn of an OOM before renting hardware.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from langflow_jax import checkpoint as ckpt_lib
from langflow_jax import parallel, train
from langflow_jax.errors import ConfigError

GiB = 1024 ** 3
# Memory figures come from buffer assignment, which LLVM's optimisation level
# does not change; skipping it halves the compile time of the check.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _size(b: int) -> str:
  return f"{b / GiB:8.2f} GiB" if b >= GiB / 10 else f"{b / 2 ** 20:8.1f} MiB"


@dataclasses.dataclass
class MemoryReport:
  """Bytes per device for one config on one mesh."""

  config_name: str
  devices: int
  mesh: dict[str, int]
  batch_per_device: int
  params: int            # trainable parameters (one copy)
  ema: int
  opt_state: int
  batch: int             # ids + mask
  argument: int          # XLA: all inputs of the step
  output: int            # XLA: all outputs
  alias: int             # XLA: outputs written in place of donated inputs
  temp: int              # XLA: activations, gradients, workspaces
  generated_code: int
  compile_seconds: float
  grad_accum: int = 1

  @property
  def state(self) -> int:
    return self.params + self.ema + self.opt_state

  @property
  def peak(self) -> int:
    """Inputs + outputs not aliased to donated inputs + temporaries."""
    return self.argument + self.output - self.alias + self.temp + self.generated_code

  def to_json(self) -> dict[str, Any]:
    return dict(dataclasses.asdict(self), state=self.state, peak=self.peak)

  def format(self, memory_gb: float | None = None) -> str:
    g = _size
    mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
    micro = (f" in {self.grad_accum} micro-batches of {self.batch_per_device // self.grad_accum}"
             if self.grad_accum > 1 else "")
    lines = [
        f"train step of '{self.config_name}' on {self.devices} devices ({mesh}), "
        f"{self.batch_per_device} sequences per device{micro}; compiled in {self.compile_seconds:.0f} s",
        f"  parameters        {g(self.params)}",
        f"  EMA               {g(self.ema)}",
        f"  optimizer state   {g(self.opt_state)}",
        f"  batch             {g(self.batch)}",
        f"  temporaries       {g(self.temp)}   (activations, gradients; CPU compile, an estimate)",
        f"  peak per device   {g(self.peak)}",
    ]
    if memory_gb:
      verdict = "fits" if self.peak <= memory_gb * GiB else "DOES NOT FIT"
      lines.append(f"  {verdict} in {memory_gb:g} GiB per device ({100 * self.peak / (memory_gb * GiB):.0f}% used)")
    return "\n".join(lines)


def train_memory_report(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None,
                        config_name: str = "") -> MemoryReport:
  """Compiles ``config``'s train step on a mesh over ``devices`` (default: all) and measures it."""
  import time

  devices = list(jax.devices() if devices is None else devices)
  mesh = parallel.make_mesh(config.mesh, devices)
  batch_size = int(config.train.batch_size)
  parallel.check_batch(batch_size, mesh, grad_accum=config.train.grad_accum)
  tx = train.make_optimizer(config.optimizer, config.train.steps)
  graphdef, abstract_state = train.abstract_train_state(config, tx)
  shardings = parallel.tree_shardings(abstract_state, mesh)
  # the step closes over the (small) model buffers; jit computes only them
  parts = train.ModelParts(graphdef, jax.jit(lambda: train.fresh_train_state(config, tx).buffers)())
  step = train.jit_train_step(train.make_train_step(config, parts, tx), shardings, mesh)
  seq = (batch_size, int(config.data.seq_len))
  batch_sh = train.batch_shardings(mesh)
  batch = {"ids": jax.ShapeDtypeStruct(seq, jnp.int32, sharding=batch_sh["ids"]),
           "mask": jax.ShapeDtypeStruct(seq, jnp.bool_, sharding=batch_sh["mask"])}
  start = time.perf_counter()
  compiled = step.lower(ckpt_lib.with_shardings(abstract_state, shardings), batch).compile()
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  part = lambda name: parallel.per_device_bytes(getattr(abstract_state, name), getattr(shardings, name))
  return MemoryReport(
      config_name=config_name, devices=len(devices), mesh=dict(mesh.shape),
      batch_per_device=batch_size // parallel.data_parallel_size(mesh),
      params=part("params"), ema=part("ema_params"), opt_state=part("opt_state"),
      batch=parallel.per_device_bytes(batch, batch_sh),
      argument=int(stats.argument_size_in_bytes), output=int(stats.output_size_in_bytes),
      alias=int(stats.alias_size_in_bytes), temp=int(stats.temp_size_in_bytes),
      generated_code=int(stats.generated_code_size_in_bytes), compile_seconds=seconds,
      grad_accum=int(config.train.grad_accum))


def simulated_cpu_devices(n: int) -> list:
  """``n`` CPU devices; asks for them when the CPU backend has not started yet."""
  from jax._src import xla_bridge

  if not xla_bridge.backends_are_initialized():
    jax.config.update("jax_num_cpu_devices", n)
    if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()
  devices = jax.devices("cpu")
  if len(devices) < n:
    raise ConfigError(f"this process already started JAX with {len(devices)} CPU devices, fewer than {n}.",
                      "run the check in a fresh process (langflow-jax aot, or aot.report_in_subprocess).")
  return devices[:n]


def run(config_spec: str, overrides: Sequence[str], num_devices: int) -> MemoryReport:
  """The report for a config name (or file) with overrides, on ``num_devices`` simulated devices."""
  from langflow_jax import config as config_lib

  if num_devices < 1:
    raise ConfigError(f"--devices={num_devices} must be at least 1.", "give the device count of the target.")
  config = config_lib.load_config(config_spec, overrides)
  config_lib.validate(config)
  return train_memory_report(config, simulated_cpu_devices(num_devices), config_name=config_spec)


def report_in_subprocess(config_spec: str, overrides: Sequence[str], num_devices: int,
                         timeout: float | None = None) -> MemoryReport:
  """:func:`run` in a fresh CPU-only process (this one keeps its devices)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(num_devices))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  cmd = [sys.executable, "-m", "langflow_jax.cli", "aot", "--config", config_spec,
         "--devices", str(num_devices), "--json", *overrides]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  if proc.returncode:
    raise RuntimeError(f"AOT check failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
  data = json.loads(proc.stdout.strip().splitlines()[-1])
  data.pop("state"), data.pop("peak")
  return MemoryReport(**data)
