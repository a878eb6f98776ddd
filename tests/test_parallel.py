"""Sharding: meshes, rules, equivalence with one device, two processes, AOT memory.

Multi-device checks run this file as a script in subprocesses with simulated
CPU devices (``JAX_NUM_CPU_DEVICES``), so the pytest process keeps one device.
One subprocess runs every mesh check (compiling is what costs time).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from langflow_jax import cli, parallel  # noqa: E402
from langflow_jax.errors import ConfigError  # noqa: E402
from tests.conftest import FAST_COMPILE, small_config  # noqa: E402

# (name, (data, fsdp, tensor), grad_accum): every mesh is compared with one device.
MESHES = [("one", (1, 1, 1), 2), ("data8", (8, 1, 1), 2), ("fsdp8", (1, 8, 1), 2), ("2x2x2", (2, 2, 2), 2)]
BATCH = 16


def _spec(x) -> tuple:
  """A value's partition spec padded with None to its rank."""
  spec = tuple(x.sharding.spec)
  return spec + (None,) * (x.ndim - len(spec))


def _subprocess_env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), PYTHONPATH=str(ROOT), **extra)
  # Compiling dominates these tests; unoptimised CPU code compiles ~2x faster.
  env["XLA_FLAGS"] = FAST_COMPILE
  return env


# --------------------------------------------------------------------------- in-process


def test_mesh_that_does_not_fit_is_a_config_error():
  cfg = small_config()
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  with pytest.raises(ConfigError, match=r"needs 8 devices, but 6 are available"):
    parallel.mesh_shape(cfg.mesh, 6)
  cfg.mesh.update(data=-1, fsdp=-1, tensor=1)
  with pytest.raises(ConfigError, match="more than one -1"):
    parallel.mesh_shape(cfg.mesh, 8)
  cfg.mesh.update(data=-1, fsdp=3, tensor=1)
  with pytest.raises(ConfigError, match="does not fit 8 devices"):
    parallel.mesh_shape(cfg.mesh, 8)
  cfg.mesh.update(data=-1, fsdp=2, tensor=2)
  assert parallel.mesh_shape(cfg.mesh, 8) == (2, 2, 2)


def test_cli_reports_a_mesh_that_does_not_fit_the_devices(tmp_path, capsys):
  code = cli.main(["train", "--workdir", str(tmp_path / "run"), "--config.mesh.data=3"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1
  assert "mesh data=3 x fsdp=1 x tensor=1 needs 3 devices, but 1 are available" in err[0]


def test_rules_skip_non_dividing_dims_and_reused_mesh_axes():
  from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

  mesh = AbstractMesh((2, 4, 2), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  assert parallel.logical_to_spec(("embed", "mlp"), (32, 128), mesh) == P("fsdp", "tensor")
  assert parallel.logical_to_spec(("embed", "mlp"), (30, 128), mesh) == P(None, "tensor")
  assert parallel.logical_to_spec(("cond", "cond"), (16, 16), mesh) == P("fsdp", None)
  assert parallel.logical_to_spec(("batch", "length", "act_vocab"), (16, 8, 6), mesh) == \
      P(("data", "fsdp"), None, "tensor")
  assert parallel.logical_to_spec(("batch", None), (4, 8), mesh) == P(None, None)
  with pytest.raises(ValueError, match="no sharding rule"):
    parallel.logical_to_spec(("nonsense",), (4,), mesh)


def test_fsdp_shards_every_parameter_that_has_a_dividing_dim():
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

  mesh = AbstractMesh((1, 4, 1), parallel.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  tree = {"ada": nnx.Param(jnp.zeros((6, 8)), logical_axes=("cond", "modulation")),  # C=6 does not divide
          "mlp": nnx.Param(jnp.zeros((8, 12)), logical_axes=("embed", "mlp")),
          "odd": nnx.Param(jnp.zeros((3, 5)), logical_axes=("cond", "mlp")),
          "buffer": nnx.Variable(jnp.zeros((8,)))}                                # no axes: replicated
  specs = {k: v.get_raw_value().spec for k, v in parallel.tree_shardings(tree, mesh).items()}
  assert specs == {"ada": P(None, "fsdp"), "mlp": P("fsdp", None), "odd": P(None, None), "buffer": P()}


def test_batch_that_does_not_split_over_the_mesh_is_a_config_error():
  import jax

  mesh = parallel.make_mesh(small_config().mesh, jax.devices()[:1])
  parallel.check_batch(16, mesh, grad_accum=4)
  fake = type("M", (), {"shape": {"data": 2, "fsdp": 4, "tensor": 1}})()
  with pytest.raises(ConfigError, match="in 4 micro-batches"):
    parallel.check_batch(16, fake, grad_accum=4)


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}, None),  # one task: all local GPUs
    ({"SLURM_STEP_NODELIST": "n[1-4]", "SLURM_NTASKS": "4"}, {}),
    ({"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}, None),  # batch step
    ({"OMPI_COMM_WORLD_SIZE": "2"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"LANGFLOW_JAX_DISTRIBUTED": "1"}, {}),
    ({"LANGFLOW_JAX_DISTRIBUTED": "0", "SLURM_STEP_NODELIST": "n[1-4]", "SLURM_NTASKS": "4"}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     {"coordinator_address": "h:1234", "num_processes": 2, "process_id": 1}),
])
def test_distributed_launch_is_detected_from_the_environment(env, expected):
  assert parallel.distributed_init_args(env) == expected


def test_incomplete_explicit_launch_is_a_config_error():
  with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES"):
    parallel.distributed_init_args({"JAX_COORDINATOR_ADDRESS": "h:1234"})
  with pytest.raises(ConfigError, match="JAX_PROCESS_ID=2"):
    parallel.distributed_init_args({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                                    "JAX_PROCESS_ID": "2"})


# --------------------------------------------------------------------------- 8 simulated devices


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
  out = tmp_path_factory.mktemp("meshes")
  proc = subprocess.run([sys.executable, __file__, "meshes", str(out)], env=_subprocess_env(8), cwd=ROOT,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  with np.load(out / "grads.npz") as f:
    grads = {k: f[k] for k in f.files}
  return grads, json.loads((out / "report.json").read_text())


def test_meshes_give_the_same_loss_and_gradients_as_one_device(mesh_results):
  grads, report = mesh_results
  ref_terms = report["terms"]["one"]
  assert ref_terms["num_tokens"] > 0 and np.isfinite(ref_terms["ce_sum"])
  names = sorted({k.split("/")[0] for k in grads} - {"one"})
  assert names == sorted(n for n, _, _ in MESHES if n != "one")
  for name in names:
    for key, value in report["terms"][name].items():
      np.testing.assert_allclose(value, ref_terms[key], rtol=2e-5, err_msg=f"{name} {key}")
    np.testing.assert_allclose(report["gamma"][name], report["gamma"]["one"], rtol=1e-5, err_msg=name)
    leaves = [k.split("/", 1)[1] for k in grads if k.startswith("one/")]
    assert len(leaves) > 10
    for leaf in leaves:
      ref, got = grads[f"one/{leaf}"], grads[f"{name}/{leaf}"]
      scale = float(np.max(np.abs(ref))) + 1e-12
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{name} {leaf}")


def test_parameters_and_optimizer_state_are_sharded_by_the_rules(mesh_results):
  _, report = mesh_results
  specs = report["specs"]
  # (data=2, fsdp=2, tensor=2): FSDP over the width, tensor over heads/MLP/vocab
  expected = {
      "backbone.blocks.0.attn_qkv.kernel": ["fsdp", "tensor"],
      "backbone.blocks.0.attn_out.kernel": ["tensor", "fsdp"],
      "backbone.blocks.0.mlp_1.kernel": ["fsdp", "tensor"],
      "backbone.blocks.0.mlp_1.bias": ["tensor"],
      "backbone.blocks.0.mlp_2.kernel": ["tensor", "fsdp"],
      "backbone.blocks.0.ada.kernel": ["fsdp", "tensor"],
      "backbone.vocab_embed.embedding": ["tensor", "fsdp"],
      "backbone.output_layer.linear.kernel": ["fsdp", "tensor"],
      "backbone.self_cond_proj.kernel": [None, "fsdp"],
      "backbone.blocks.0.norm1.scale": ["fsdp"],  # no rule: the FSDP fallback
      "schedule.loc": [],
  }
  for part in ("params", "ema_params", "mu", "nu"):
    got = specs["2x2x2"][part]
    for path, spec in expected.items():
      if part in ("params", "ema_params") or not path.startswith("schedule"):  # own optimizer
        assert got[path] == spec, (part, path, got[path])
  # the local shard really is a quarter of the qkv kernel (32 x 96 over fsdp x tensor)
  assert report["shard_shapes"]["2x2x2"]["backbone.blocks.0.attn_qkv.kernel"] == [16, 48]
  # pure FSDP: every matrix sharded 8 ways on one dimension, nothing on tensor
  fsdp = specs["fsdp8"]["params"]
  assert fsdp["backbone.blocks.0.mlp_1.kernel"] == ["fsdp", None]
  assert fsdp["backbone.vocab_embed.embedding"] == [None, "fsdp"]
  # pure data parallelism: everything replicated
  assert all(all(a is None for a in s) for s in specs["data8"]["params"].values())


def test_aot_memory_report_is_consistent_with_the_shardings(mesh_results):
  _, report = mesh_results
  r, n = report["aot"], report["num_params_bytes"]
  assert r["devices"] == 8 and r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert n / 8 <= r["params"] < n / 4                    # mostly 1/8 (norms, scalars replicated)
  assert r["ema"] == r["params"]
  assert 1.9 * r["params"] <= r["opt_state"] <= 2.1 * r["params"] + 4096  # Adam mu and nu
  assert r["batch"] == (BATCH // 8) * 32 * (4 + 1)       # int32 ids + bool mask per device
  assert r["temp"] > 0 and r["alias"] >= r["state"]      # the donated state is updated in place
  assert r["argument"] >= r["state"] + r["batch"]
  assert r["peak"] >= r["state"] + r["temp"]
  assert "peak per device" in report["aot_text"] and "DOES NOT FIT in 0.001 GiB" in report["aot_text"]


def test_helpers_run_a_model_sharded_like_one_device(mesh_results):
  _, report = mesh_results
  h = report["helpers"]
  assert h["max_abs"] > 0.1 and h["max_abs_diff"] <= 1e-4 * h["max_abs"]
  assert h["noise_matches"]  # random draws do not depend on the mesh
  assert h["embedding_spec"] == ["tensor", "fsdp"]
  assert h["z_spec"] == [["data", "fsdp"], None, None] and h["out_spec"] == [["data", "fsdp"], None, None]


def test_meshes_sample_the_same_tokens_as_one_device(mesh_results):
  _, report = mesh_results
  runs = report["sampling"]
  ref = runs["one"]
  assert len(set(map(tuple, np.asarray(ref["tokens"])[:, 1:4].tolist()))) > 1  # not a degenerate sampler
  for name, spec in (("data8", ["data"]), ("fsdp8", ["fsdp"]), ("2x2x2", [["data", "fsdp"]])):
    got = runs[name]
    assert got["z_spec"] == spec + [None, None], (name, got["z_spec"])  # the rows really are split
    np.testing.assert_array_equal(got["tokens"], ref["tokens"], err_msg=name)
    np.testing.assert_array_equal(got["trace"], ref["trace"], err_msg=name)  # every step's argmax
    np.testing.assert_allclose(got["final_z"], ref["final_z"], rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(got["scores"], ref["scores"], rtol=1e-5, err_msg=name)
    assert got["best"] == ref["best"], name


def test_meshes_give_the_same_bound_as_one_device(mesh_results):
  _, report = mesh_results
  runs = report["sampling"]
  ref = runs["one"]
  assert len(ref["seq_totals"]) == 12 and all(np.isfinite(ref["seq_totals"]))  # padding rows left out
  for name in ("data8", "fsdp8", "2x2x2"):
    got = runs[name]
    np.testing.assert_allclose(got["seq_totals"], ref["seq_totals"], rtol=2e-5, err_msg=name)
    for term, value in got["sums"].items():
      np.testing.assert_allclose(value, ref["sums"][term], rtol=2e-5, err_msg=f"{name} {term}")


def test_aot_cli_reports_a_mesh_that_does_not_fit_in_one_line():
  proc = subprocess.run([sys.executable, "-m", "langflow_jax.cli", "aot", "--config", "tiny", "--devices", "3",
                         "--config.mesh.tensor=2"], env=_subprocess_env(1), cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  err = [l for l in proc.stderr.strip().splitlines() if l.startswith("langflow-jax")]
  assert proc.returncode == 2 and err == [
      "langflow-jax: error: mesh {'data': -1, 'fsdp': 1, 'tensor': 2} does not fit 3 devices. "
      "Fix: make the fixed axes multiply to a divisor of 3."]


# --------------------------------------------------------------------------- two processes


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_train_and_agree_on_the_loss(tmp_path):
  port = _free_port()
  procs = []
  for pid in range(2):
    env = _subprocess_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                          JAX_PROCESS_ID=str(pid), LANGFLOW_JAX_CACHE=str(tmp_path / "cache"))
    procs.append(subprocess.Popen([sys.executable, __file__, "two_processes", str(tmp_path / "run")],
                                  env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, stderr[-5000:]
    outs.append(json.loads(stdout.strip().splitlines()[-1]))
  a, b = outs
  assert (a["process"], b["process"]) == (0, 1) and a["devices"] == b["devices"] == 4
  assert a["data_shard"] == [0, 2] and b["data_shard"] == [1, 2]
  assert a["final_step"] == b["final_step"] == 3
  assert np.isfinite(a["loss"]) and a["loss"] == b["loss"] and a["eval_ce"] == b["eval_ce"]
  for out in outs:  # each process fed its own rows; together they are the one-process batch
    assert out["batch_matches_single_process"]
    assert out["tensor_across_processes_shard"] == [0, 1] and out["tensor_batch_matches"]
  assert (tmp_path / "run" / "checkpoints" / "3").is_dir()
  # eval and sample across both processes: each got every row, as one device computes them
  assert a["eval_sequences"] == b["eval_sequences"] == 8 and np.isfinite(a["bound"]) and a["bound"] == b["bound"]
  assert a["samples"] == b["samples"] and len(a["samples"]) == 4
  for out in outs:
    assert out["bound_matches_one_device"] and out["samples_match_one_device"]
  assert [p.name for p in (tmp_path / "run" / "eval").iterdir()] == ["sotu_heldout_euler2.json"]  # process 0 wrote


# --------------------------------------------------------------------------- subprocess bodies


def _flat_specs(tree) -> dict[str, list]:
  from flax import nnx

  flat = ((".".join(map(str, path)), var.get_raw_value()) for path, var in nnx.to_flat_state(tree))
  return {path: list(_spec(x)) for path, x in flat if hasattr(x, "sharding")}  # skips optax's MaskedNode


def _moments(opt_state, name):
  """The Adam ``mu`` or ``nu`` of the network parameters."""
  import jax

  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, name)) if hasattr(s, name)]
  return getattr(found[0], name)


def _meshes_worker(out: pathlib.Path) -> None:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from langflow_jax import aot, train

  assert jax.device_count() == 8, jax.devices()
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 8192, (BATCH, 32)).astype(np.int32)
  mask = np.ones_like(ids, bool)
  mask[3, 20:] = False
  key, skip_scale = jax.random.PRNGKey(3), jnp.float32(0.7)
  grads_out, report = {}, {"terms": {}, "gamma": {}, "specs": {}, "shard_shapes": {}, "aot": {}}
  ref_params = None
  for name, (d, f, t), accum in MESHES:
    cfg = small_config()
    cfg.train.update(batch_size=BATCH, grad_accum=accum)
    cfg.objective.self_cond_prob = 1.0  # exercise the self-conditioning pass
    cfg.mesh.update(data=d, fsdp=f, tensor=t)
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:d * f * t])
    tx = train.make_optimizer(cfg.optimizer, 10)
    if name in ("one", "2x2x2"):  # sharded init (jit with out_shardings)
      parts, state, shardings = train.init_train_state(cfg, mesh, tx)
    else:  # the same values placed by the rules
      graphdef, abstract_state = train.abstract_train_state(cfg, tx)
      shardings = parallel.tree_shardings(abstract_state, mesh)
      state = jax.device_put(ref_state, shardings)
      parts = train.ModelParts.from_state(graphdef, state)
    if name == "one":
      ref_state = jax.device_get(state)
    else:  # the sharded init draws the same parameters
      for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rep = parallel.replicated(mesh)
    grad_fn = parallel.mesh_jit(train.make_grad_fn(cfg, parts), mesh,
                                in_shardings=(shardings.params, train.batch_shardings(mesh), rep, rep),
                                out_shardings=(shardings.params, rep, rep, rep))
    batch = parallel.global_batch({"ids": ids, "mask": mask}, mesh)
    grads, terms, gamma, _ = grad_fn(state.params, batch, key, skip_scale)
    if name == "one":
      ref_params = state.params
    for path, g in nnx.to_flat_state(grads):
      grads_out[f"{name}/{'.'.join(map(str, path))}"] = np.asarray(g[...])
    report["terms"][name] = {k: float(v) for k, v in vars(jax.device_get(terms)).items()}
    report["gamma"][name] = np.asarray(gamma).tolist()
    report["specs"][name] = {"params": _flat_specs(state.params), "ema_params": _flat_specs(state.ema_params),
                             "mu": _flat_specs(_moments(state.opt_state, "mu")),
                             "nu": _flat_specs(_moments(state.opt_state, "nu"))}
    report["shard_shapes"][name] = {".".join(map(str, p)): list(v[...].addressable_shards[0].data.shape)
                                    for p, v in nnx.to_flat_state(state.params)}
    if name == "fsdp8":  # the whole train step, compiled ahead of time
      mem = aot.train_memory_report(cfg, jax.devices(), config_name="small")
      report["aot"], report["aot_text"] = mem.to_json(), mem.format(memory_gb=0.001)
  report["num_params_bytes"] = sum(int(x.size) * 4 for x in jax.tree.leaves(ref_params))
  report["helpers"] = _helpers_check(cfg)
  report["sampling"] = _sampling_and_bound_check()
  np.savez(out / "grads.npz", **grads_out)
  (out / "report.json").write_text(json.dumps(report))


def _helpers_check(cfg) -> dict:
  """The recipe the sampler and likelihood follow: shard_model, shard_batch, mesh_jit, to_host."""
  import jax
  from flax import nnx

  from langflow_jax.model import create_model

  z = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (BATCH, 32, 32)))
  gamma = np.linspace(-2.0, 4.0, BATCH, dtype=np.float32)
  model = create_model(cfg, seed=1)
  nnx.update(model, jax.tree.map(lambda x: x + 0.01, nnx.state(model, nnx.Param)))  # non-zero heads
  graphdef, state = nnx.split(model)
  reference = np.asarray(jax.jit(lambda s, z, g: nnx.merge(graphdef, s)(z, g))(state, z, gamma))
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = parallel.make_mesh(cfg.mesh)
  graphdef, state = nnx.split(parallel.shard_model(model, mesh))
  z_sharded, gamma_sharded = parallel.shard_batch((z, gamma), mesh)

  def logits(state, z, gamma):  # noise drawn inside, pinned to the batch layout
    extra = parallel.constrain(jax.random.normal(jax.random.PRNGKey(6), z.shape), ("batch", "length", None))
    return nnx.merge(graphdef, state)(z, gamma), extra

  fn = parallel.mesh_jit(logits, mesh, in_shardings=(parallel.tree_shardings(state, mesh),
                                                     parallel.batch_sharding(mesh, 3),
                                                     parallel.batch_sharding(mesh, 1)),
                         out_shardings=parallel.batch_sharding(mesh, 3))
  out, extra = fn(state, z_sharded, gamma_sharded)
  embedding = state["backbone"]["vocab_embed"]["embedding"][...]
  return {"max_abs_diff": float(np.max(np.abs(parallel.to_host(out) - reference))),
          "max_abs": float(np.max(np.abs(reference))),
          "noise_matches": bool(np.array_equal(parallel.to_host(extra),
                                               np.asarray(jax.random.normal(jax.random.PRNGKey(6), z.shape)))),
          "embedding_spec": list(_spec(embedding)), "z_spec": list(_spec(z_sharded)),
          "out_spec": list(_spec(out))}


def _sampling_and_bound_check() -> dict:
  """Best-of-n (sampled and scored) and the eval bound on each mesh and on one device.

  One device is the plain jitted path (``mesh=None``) the parity tests check
  against the official code; the meshes run the sharded path.
  """
  import jax
  from flax import nnx

  from langflow_jax import evaluate, likelihood as lk, sampling
  from langflow_jax.data.prepare import PackedSplit
  from langflow_jax.model import create_model

  cfg = small_config()
  model = create_model(cfg, seed=3)
  rng = np.random.default_rng(0)  # random heads: positions interact
  nnx.update(model.backbone, jax.tree.map(lambda p: p + 0.2 * rng.standard_normal(p.shape).astype(np.float32),
                                 nnx.state(model.backbone, nnx.Param)))
  options = sampling.SamplerOptions(sampler="stochastic", steps=4, churn=5.0, trace=True)  # noise drawn inside
  cond = sampling.positions_conditioning(32, {0: 1, 5: 17, 20: 400}, num=4)  # 4 requests x 2 candidates
  ids = rng.integers(0, 8192, (12, 32)).astype(np.int32)
  mask = np.ones_like(ids, bool)
  mask[2, 9:] = False
  split = PackedSplit(ids, mask)  # 2 batches of 8, the second padded with 4 empty rows
  opts = lk.BoundOptions(solver="heun", steps=2)
  out = {}
  for name, (d, f, t), _ in MESHES:
    mesh = None if name == "one" else parallel.make_mesh(_mesh_cfg(d, f, t))
    res = sampling.best_of_n(model, jax.random.PRNGKey(11), 2, options, cond=cond, score="denoise", mesh=mesh)
    host = parallel.to_host(res)
    totals = evaluate.run_bound(model, split, opts, batch_size=8, num_batches=0, seed=1, mesh=mesh)
    out[name] = {"tokens": host.candidates.tokens_BxL.tolist(), "trace": host.candidates.trace_NxBxL.tolist(),
                 "final_z": host.candidates.final_z_BxLxD.tolist(), "scores": host.scores_RxN.tolist(),
                 "best": host.best_R.tolist(), "seq_totals": totals.seq_totals, "sums": totals.sums,
                 "z_spec": None if mesh is None else list(_spec(res.candidates.final_z_BxLxD))}
  return out


def _mesh_cfg(d: int, f: int, t: int):
  cfg = small_config()
  cfg.mesh.update(data=d, fsdp=f, tensor=t)
  return cfg.mesh


def _two_processes_eval_and_sample(workdir: str) -> dict:
  """``eval`` and ``sample`` of the run on the 4 devices of both processes (data=2 x fsdp=2,
  each process loading its own eval rows), against this process alone on one device."""
  import jax

  from langflow_jax import evaluate, sample, sampling, train
  from langflow_jax import likelihood as lk
  from langflow_jax.data import pipeline

  mesh_args = ["config.mesh.data=2", "config.mesh.fsdp=2", "config.mesh.tensor=1"]
  eval_args = ["config.eval.solver=euler", "config.eval.steps=2", "config.eval.batch_size=8",
               "config.eval.num_batches=1", *mesh_args]
  result = evaluate.evaluate_workdir(workdir, eval_args, write=True)
  samples = sample.generate_from_workdir(workdir, num=4, steps=3, overrides=[*mesh_args, "config.sample.score=ce"],
                                           print_fn=None)
  config, local = train.load_model(workdir)  # this process's first device only
  split = pipeline.load_split(config.data, "heldout")
  totals = evaluate.run_bound(local, split, lk.BoundOptions(solver="euler", steps=2), batch_size=8, num_batches=1,
                              seed=config.eval.seed)
  k_sample, _ = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.sample.seed), 0))
  alone = sampling.sample(local, k_sample, sampling.SamplerOptions.from_config(config.sample, steps=3), num=4,
                          seq_len=config.data.seq_len)
  return {"bound": result.nats_per_token,
          "bound_matches_one_device": bool(np.isclose(result.nats_per_token, sum(totals.per_token().values()),
                                                      rtol=1e-5)),
          "eval_sequences": result.num_sequences,
          "samples": [s["ids"] for s in samples["samples"]],
          "samples_match_one_device": [s["ids"] for s in samples["samples"]] == np.asarray(alone.tokens_BxL).tolist()}


def _two_processes_worker(workdir: str) -> None:
  parallel.maybe_initialize_distributed()  # from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
  import jax

  from langflow_jax import train
  from langflow_jax.data import pipeline

  cfg = small_config()
  cfg.mesh.update(data=2, fsdp=2, tensor=1)
  cfg.train.update(steps=3, log_every=1, eval_every=3, checkpoint_every=3)
  cfg.objective.self_cond_prob = 0.0  # a smaller program to compile
  summary = train.train_and_evaluate(cfg, workdir)

  split = pipeline.load_split(cfg.data, "train")
  expected = pipeline.BatchIterator(split, cfg.train.batch_size, cfg.data.seed).batch_at(5)["ids"]

  def assembled(mesh):
    index, count = parallel.data_shard(mesh)
    it = pipeline.BatchIterator(split, cfg.train.batch_size, cfg.data.seed, process_index=index,
                                process_count=count)
    return (index, count), parallel.to_host(parallel.global_batch(it.batch_at(5), mesh))["ids"]

  shard, ids = assembled(parallel.make_mesh(cfg.mesh))
  # tensor axis across the processes: both hold every row, so both load the whole batch
  mine, theirs = (sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id) for p in (0, 1))
  devices = [mine[0], theirs[0], mine[1], theirs[1]]
  cfg.mesh.update(data=1, fsdp=2, tensor=2)
  tensor_mesh = parallel.make_mesh(cfg.mesh, devices)
  assert {d.process_index for d in tensor_mesh.devices[0, 0]} == {0, 1}
  tensor_shard, tensor_ids = assembled(tensor_mesh)
  shared = _two_processes_eval_and_sample(workdir)
  print(json.dumps({
      **shared,
      "process": jax.process_index(), "devices": jax.device_count(), "data_shard": list(shard),
      "final_step": summary["final_step"], "loss": summary["train"]["loss"],
      "eval_ce": summary["eval"]["eval/ce"],
      "batch_matches_single_process": bool(np.array_equal(ids, expected)),
      "tensor_across_processes_shard": list(tensor_shard),
      "tensor_batch_matches": bool(np.array_equal(tensor_ids, expected)),
  }))
  jax.distributed.shutdown()


if __name__ == "__main__":
  {"meshes": lambda: _meshes_worker(pathlib.Path(sys.argv[2])),
   "two_processes": lambda: _two_processes_worker(sys.argv[2])}[sys.argv[1]]()
