import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from langflow_jax import cli, parallel, reporting, train
from tests.conftest import ROOT, small_config


def test_overfits_one_fixed_batch():
  cfg = small_config(vocab_size=64, hidden_size=64, n_heads=4, cond_dim=32, n_blocks=2, max_length=16)
  cfg.data.seq_len = 16
  cfg.schedule.update(name="linear", gamma_min=-2.0, gamma_max=3.0)
  cfg.optimizer.update(lr=3e-3, warmup_steps=20, ema_decay=0.0)
  mesh = parallel.make_mesh(cfg.mesh)
  tx = train.make_optimizer(cfg.optimizer, 300)
  parts, state, shardings = train.init_train_state(cfg, mesh, tx)
  step = train.jit_train_step(train.make_train_step(cfg, parts, tx), shardings, mesh)
  ids = np.repeat(np.asarray(jax.random.randint(jax.random.PRNGKey(0), (1, 16), 0, 64), np.int32), 8, 0)
  batch = parallel.global_batch({"ids": ids, "mask": np.ones_like(ids, bool)}, mesh)
  losses = []
  for _ in range(300):
    state, m = step(state, batch)
    losses.append(float(m["terms"].ce_sum / m["terms"].num_tokens))
  first, last = np.mean(losses[:5]), np.mean(losses[-20:])
  print(f"overfit: CE {first:.3f} -> {last:.3f}")
  assert last < 0.15 and last < 0.35 * first


def test_grad_accumulation_equals_full_batch(monkeypatch):
  from langflow_jax import methods
  from langflow_jax import objective as O

  class Deterministic(methods.LangFlowMethod):
    """A LangFlow trained on clean embeddings at a fixed noise level: no randomness, so
    micro-batching is the only difference between the two runs."""

    name = "deterministic"

    def objective(self, model, ids, mask, key, *, cfg, skip_scale=1.0, train=True):
      gamma = jnp.full((ids.shape[0],), 2.0)
      logits = model(model.embed(ids), gamma, skip_scale=skip_scale)
      ce = O.token_cross_entropy(logits, ids) * mask
      t = O.LossTerms(ce.sum(), mask.sum().astype(jnp.float32), jnp.float32(0), jnp.float32(ids.shape[0]),
                      jnp.float32(0))
      return O.ObjectiveOutput(t, gamma, ce.sum(-1) / 32)

  monkeypatch.setitem(methods.METHODS, "deterministic", Deterministic())
  cfg = small_config(vocab_size=64)
  cfg.objective.name = "deterministic"
  mesh = parallel.make_mesh(cfg.mesh)
  ids = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (8, 32), 0, 64), np.int32)
  mask = np.ones_like(ids, bool)
  mask[5, 10:] = False  # unequal token counts per micro-batch
  batch = parallel.global_batch({"ids": ids, "mask": mask}, mesh)
  params = []
  for accum in (1, 4):
    cfg.train.grad_accum = accum
    tx = train.make_optimizer(cfg.optimizer, 10)
    parts, state, sh = train.init_train_state(cfg, mesh, tx)
    new_state, metrics = jax.jit(train.make_train_step(cfg, parts, tx))(state, batch)
    params.append((new_state.params, float(metrics["grad_norm"]), float(metrics["terms"].ce_sum)))
  (p1, g1, c1), (p4, g4, c4) = params
  np.testing.assert_allclose(g4, g1, rtol=1e-5)
  # float32 sums in another order (4 partial sums): ~1e-5 apart; a mis-weighted micro-batch is ~1e-2
  np.testing.assert_allclose(c4, c1, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def run(tmp_path, name, **overrides):
  cfg = small_config()
  for k, v in overrides.items():
    group, key = k.split("__")
    cfg[group][key] = v
  return cfg, train.train_and_evaluate(cfg, tmp_path / name)


def test_same_seed_same_losses_bit_for_bit(tmp_path):
  cfg, _ = run(tmp_path, "a")
  _, _ = run(tmp_path, "b")
  a = reporting.read_metrics(tmp_path / "a")
  b = reporting.read_metrics(tmp_path / "b")
  strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/") and "per_s" not in k} for r in rows]
  assert strip(a) == strip(b)
  assert any("train/ce" in r for r in a) and any("eval/ce" in r for r in a)


HOLD_LOCK = ("import pathlib, sys, time\nfrom langflow_jax import train\n"
             "train._RunLock(pathlib.Path(sys.argv[1])).__enter__()\nprint('locked', flush=True)\ntime.sleep(600)\n")


def test_one_training_process_per_workdir_and_a_killed_holder_frees_it(tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(workdir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
  try:
    assert holder.stdout.readline().strip() == "locked"
    code = cli.main(["train", "--config", "tiny", "--workdir", str(workdir), "--config.model.hidden_size=32",
                     "--config.model.cond_dim=16", "--config.model.n_blocks=1", "--config.model.n_heads=2",
                     "--config.data.seq_len=32", "--config.train.batch_size=4", "--config.train.steps=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"another training process (pid {holder.pid} on " in err[0] and f"kill {holder.pid}" in err[0], err
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # the kernel released the dead holder's lock; its pid is still in the file, and does not matter
  assert (workdir / train.LOCK_FILE).read_text().split()[0] == str(holder.pid)
  with train._RunLock(workdir):
    assert (workdir / train.LOCK_FILE).read_text().split()[0] == str(os.getpid())
  assert (workdir / train.LOCK_FILE).read_text() == ""  # released at the end of a run


def test_training_keys_never_repeat_parameter_init_keys():
  # nnx.Rngs(params=seed) uses fold_in(PRNGKey(seed), i) for its i-th init key
  root = train.training_root_key(0)
  init_keys = {tuple(np.asarray(jax.random.fold_in(jax.random.PRNGKey(0), i))) for i in range(256)}
  step_keys = {tuple(np.asarray(jax.random.fold_in(root, s))) for s in range(256)}
  assert not init_keys & step_keys


def test_embedding_lr_scale_moves_only_the_embedding_rate_and_keeps_old_optimizer_states():
  from langflow_jax import methods
  from langflow_jax.train_state import split_model

  for name in ("langflow", "ar", "mdlm"):
    cfg = small_config(vocab_size=32, hidden_size=32, n_heads=2, cond_dim=16, n_blocks=1, max_length=8)
    cfg.objective.name = name
    cfg.optimizer.update(warmup_steps=0, lr=1e-2)
    _, params = split_model(methods.create_model(cfg, 0))
    grads = jax.tree.map(jnp.ones_like, params)

    def updates(scale):
      cfg.optimizer.embedding_lr_scale = scale
      tx = train.make_optimizer(cfg.optimizer, 10)
      state = tx.init(params)
      return jax.tree_util.tree_flatten_with_path(tx.update(grads, state, params)[0])[0], state

    (base, base_state), (scaled, _) = updates(1.0), updates(0.25)
    embedding = [jax.tree_util.keystr(p) for p, _ in base if "vocab_embed" in jax.tree_util.keystr(p)]
    assert embedding, name
    for (path, a), (_, b) in zip(base, scaled):
      ratio = 0.25 if jax.tree_util.keystr(path) in embedding else 1.0
      np.testing.assert_allclose(np.asarray(b), ratio * np.asarray(a), rtol=1e-6, err_msg=name)
    # scale 1 keeps the optimizer-state tree of runs trained before the option existed
    groups = [set(s.inner_states) for s in base_state if hasattr(s, "inner_states")]
    assert groups == [{"network", "schedule"}], groups


def test_fresh_runs_start_the_head_bias_and_schedule_entropy_from_the_training_split(tmp_path):
  from langflow_jax.data import pipeline

  cfg = small_config()
  cfg.objective.output_bias_init = "unigram"
  cfg.schedule.entropy_init = "unigram"
  cfg.train.update(steps=1, eval_every=1, checkpoint_every=1)
  cfg.optimizer.update(lr=1e-30, warmup_steps=0)  # one update that leaves the weights where they started
  train.train_and_evaluate(cfg, tmp_path / "run")
  _, _, state, _ = train.load_state(tmp_path / "run")
  log_prior_V = pipeline.unigram_log_prior(pipeline.load_split(cfg.data, "train"), cfg.model.vocab_size)
  p_V = np.exp(log_prior_V.astype(np.float64))
  for params in (state.params, state.ema_params):
    assert abs(float(params["schedule"]["entropy"][...]) - float(-np.sum(p_V * log_prior_V))) < 1e-4
    bias = np.asarray(params["backbone"]["output_layer"]["linear"]["bias"][...])
    np.testing.assert_allclose(bias, log_prior_V - log_prior_V.mean(), atol=1e-5)
  assert abs(float(state.params["schedule"]["entropy"][...]) - cfg.schedule.entropy) > 0.2  # not the config's 6.0
