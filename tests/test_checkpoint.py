"""Checkpoints: kill -9 and resume bit for bit, damaged steps, SIGTERM, other meshes,
keep policy, failed saves, fine-tuning, and the clear errors around them."""

import json
import logging
import os
import pathlib
import random
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from langflow_jax import checkpoint as C
from langflow_jax import cli, config as config_lib, reporting, train
from langflow_jax.data.tokenizer import ASSETS
from langflow_jax.errors import CheckpointError
from tests.conftest import ROOT

WORDS = ("the union state congress people nation law tax war peace trade bank money year government power "
         "public army navy treaty court debt credit labor farm").split()

# A small model on a small text file: fast to compile and to checkpoint.
SMALL = ["--config.model.hidden_size=32", "--config.model.cond_dim=16", "--config.model.n_blocks=1",
         "--config.model.n_heads=2", "--config.model.max_length=32", "--config.data.seq_len=32",
         "--config.data.holdout_every=4", "--config.train.batch_size=4", "--config.train.eval_batches=1",
         "--config.train.plot=false", "--config.train.progress=false", "--config.optimizer.warmup_steps=2",
         "--config.objective.skip_warmup_steps=0"]


def write_corpus(path: pathlib.Path, seed: int = 0, docs: int = 60) -> pathlib.Path:
  rng = random.Random(seed)
  path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(50)) + "." for _ in range(docs)))
  return path


def overrides(corpus, steps=4, every=2, *extra):
  return [*SMALL, f"--config.data.name=file:{corpus}", f"--config.train.steps={steps}",
          f"--config.train.checkpoint_every={every}", f"--config.train.log_every={every}",
          f"--config.train.eval_every={steps}", *extra]


def load(corpus, *extra, steps=4, every=2):
  return config_lib.load_config("tiny", [o[2:] for o in overrides(corpus, steps, every, *extra)])


def cli_env(tmp_path):
  # A shared XLA cache makes the repeated subprocess starts cheap (same executables).
  return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def train_cmd(workdir, corpus, *extra, steps=4, every=2):
  return [sys.executable, "-m", "langflow_jax.cli", "train", "--config", "tiny", "--workdir", str(workdir),
          *overrides(corpus, steps, every, *extra)]


def steps_on_disk(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def state_leaves(workdir):
  _, _, state, meta = train.load_state(workdir)
  return [np.asarray(x) for x in jax.tree.leaves(state)], meta


def main(args, capsys):
  code = cli.main(args)
  captured = capsys.readouterr()
  return code, captured.out, [l for l in captured.err.splitlines() if l.strip()]


def assert_one_line_error(code, err_lines, *needles):
  errors = [l for l in err_lines if l.startswith("langflow-jax: error:")]
  assert code == 2, err_lines
  assert len(errors) == 1 and " Fix: " in errors[0], err_lines
  assert not any("Traceback" in l for l in err_lines)
  for needle in needles:
    assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus") / "text.txt")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
  """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  train.train_and_evaluate(load(corpus), workdir)
  assert steps_on_disk(workdir) == [2, 4]
  return workdir


def copy_run(trained, tmp_path, name="run"):
  return pathlib.Path(shutil.copytree(trained, tmp_path / name))


# --------------------------------------------------------------------------- killing and resuming


def test_kill_and_resume_is_bit_identical(tmp_path, corpus):
  """SIGKILL at random points (mid-step, mid-save) three times; each rerun of the same
  command resumes, and the end state equals an uninterrupted run's bit for bit."""
  steps, env = 24, cli_env(tmp_path)
  reference = subprocess.run(train_cmd(tmp_path / "reference", corpus, steps=steps, every=1), env=env,
                             capture_output=True, text=True, timeout=900)
  assert reference.returncode == 0, reference.stderr
  rng = random.Random(int(time.time()))
  workdir, killed_at = tmp_path / "killed", []
  for _ in range(3):
    target = (steps_on_disk(workdir)[-1:] or [0])[0] + rng.randint(1, 3)
    proc = subprocess.Popen(train_cmd(workdir, corpus, steps=steps, every=1), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while (steps_on_disk(workdir)[-1:] or [0])[0] < target and time.time() < deadline:
      assert proc.poll() is None, "the run ended before it could be killed"
      time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.2))  # somewhere in a step or a save
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at.append(steps_on_disk(workdir)[-1])
  print(f"killed after checkpoints {killed_at}")
  assert killed_at[-1] < steps
  final = subprocess.run(train_cmd(workdir, corpus, steps=steps, every=1), env=env, capture_output=True,
                         text=True, timeout=900)
  assert final.returncode == 0, final.stderr
  assert "resuming" in final.stderr and json.loads(final.stdout)["final_step"] == steps
  want, _ = state_leaves(tmp_path / "reference")
  got, meta = state_leaves(workdir)
  assert meta["step"] == steps and meta["data_state"] == {"step": steps}
  assert len(got) == len(want)
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a, b)
  # metrics of the steps lost with each kill were rewritten, not duplicated
  rows = reporting.read_metrics(workdir)
  assert [r["step"] for r in rows if "train/ce" in r] == list(range(1, steps + 1))


def test_truncated_newest_checkpoint_falls_back_with_warning(tmp_path, corpus, trained, caplog):
  workdir = copy_run(trained, tmp_path)
  for f in (workdir / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  caplog.set_level(logging.INFO)
  config = load(corpus, steps=6)
  config.train.restore_from = str(tmp_path / "ignored")  # precedence: the workdir's checkpoints win
  summary = train.train_and_evaluate(config, workdir)
  warned = " ".join(r.getMessage() for r in caplog.records)
  assert "checkpoint step 4" in warned and "is unreadable" in warned
  assert "resuming from checkpoint step 2" in warned and "restore_from" in warned
  assert summary["start_step"] == 2 and summary["final_step"] == 6
  # the damaged step is kept aside for inspection, not deleted, and step 4 was written anew
  assert [p.name.split("-")[0] for p in (workdir / "checkpoints" / "damaged").iterdir()] == ["4"]
  assert steps_on_disk(workdir) == [2, 4, 6]


def test_every_checkpoint_damaged_is_one_clear_error_and_nothing_is_deleted(tmp_path, corpus, trained, capsys):
  workdir = copy_run(trained, tmp_path)
  for f in (workdir / "checkpoints").rglob("manifest.ocdbt"):
    f.write_bytes(b"")
  code, _, err = main(["train", "--config", "tiny", "--workdir", str(workdir),
                       *overrides(corpus, 6)], capsys)
  assert_one_line_error(code, err, "no readable checkpoint", "damaged")
  assert steps_on_disk(workdir) == [2, 4]
  with pytest.raises(CheckpointError, match="no readable checkpoint"):
    train.load_model(workdir)


def damage_state_files(step_dir: pathlib.Path, how: str) -> None:
  """Truncates to a third, or zero-fills, the larger array files of a step's state."""
  for f in (step_dir / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 1000:
      size = f.stat().st_size
      f.write_bytes(f.read_bytes()[: size // 3] if how == "truncate" else bytes(size))


def test_every_checkpoint_truncated_eval_prints_the_error_and_nothing_else(tmp_path, trained):
  workdir = copy_run(trained, tmp_path)
  for step in (2, 4):
    damage_state_files(workdir / "checkpoints" / str(step), "truncate")
  proc = subprocess.run([sys.executable, "-m", "langflow_jax.cli", "eval", "--workdir", str(workdir)],
                        env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
  err = [l for l in proc.stderr.splitlines() if l.strip()]
  assert_one_line_error(proc.returncode, err, "no readable checkpoint")
  assert len(err) < 10 and "pybind11" not in proc.stderr and "Event loop is closed" not in proc.stderr, \
      proc.stderr[-3000:]


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_zero_filled_newest_step_falls_back_with_one_short_warning(tmp_path, trained, command):
  workdir = copy_run(trained, tmp_path)
  damage_state_files(workdir / "checkpoints" / "4", "zero")
  args = ["--num", "1", "--steps", "2"] if command == "sample" else [
      "--config.eval.steps=2", "--config.eval.batch_size=2", "--config.eval.num_batches=1"]
  proc = subprocess.run([sys.executable, "-m", "langflow_jax.cli", command, "--workdir", str(workdir), *args],
                        env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
  err = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(err) < 10 and not any("Traceback" in l for l in err), proc.stderr[-3000:]
  assert "checkpoint step 4" in proc.stderr and "is unreadable" in proc.stderr
  assert "using checkpoint step 2" in proc.stderr and "pybind11" not in proc.stderr
  if command == "sample":
    assert "--- sample 0" in proc.stdout
  else:  # the card names the step that was evaluated
    assert "checkpoints/2" in proc.stdout and "checkpoints/4" not in proc.stdout, proc.stdout
  assert steps_on_disk(workdir) == [2, 4]  # read-only: nothing moved aside


@pytest.mark.parametrize("command", [["eval", "--checkpoint"], ["sample", "--workdir"]])
def test_a_step_that_does_not_exist_lists_the_steps_that_do(trained, capsys, command):
  code, _, err = main([*command, str(trained / "checkpoints" / "999")], capsys)
  assert_one_line_error(code, err, "checkpoint step 999 does not exist", "its steps are 2, 4",
                        f"{trained / 'checkpoints' / '4'} (the newest)")
  assert not any("damaged" in l or "unreadable" in l for l in err), err


def test_sigterm_saves_and_the_rerun_resumes(tmp_path, corpus, capsys):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(train_cmd(workdir, corpus, "--config.train.log_every=1", steps=500, every=100),
                          env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 600
  while not (metrics.is_file() and metrics.read_text().strip()) and time.time() < deadline:
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM == 143, err  # saved, but not finished: a scheduler can tell
  saved = json.loads(out)["final_step"]
  assert json.loads(out)["preempted"] == "SIGTERM"
  assert f"SIGTERM: saved checkpoint at step {saved}" in err and "rerun the same command" in err
  assert 0 < saved < 500 and steps_on_disk(workdir) == [saved]
  code, out, err = main(["train", "--config", "tiny", "--workdir", str(workdir),
                         *overrides(corpus, saved + 2, 100)], capsys)
  assert code == 0, err
  summary = json.loads(out)
  assert summary["start_step"] == saved and summary["final_step"] == saved + 2


# --------------------------------------------------------------------------- other meshes

MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from langflow_jax import checkpoint as C, config as config_lib, parallel, train
    workdir, reference, out = sys.argv[1:4]
    overrides = json.loads(sys.argv[4])
    assert jax.device_count() == 8

    def restore(config):
      mesh = parallel.make_mesh(config.mesh)
      tx = train.make_optimizer(config.optimizer, config.train.steps)
      _, abstract = train.abstract_train_state(config, tx)
      target = C.with_shardings(abstract, parallel.tree_shardings(abstract, mesh))
      state, _, step = C.Checkpointer(C.checkpoint_dir(workdir), read_only=True).restore(target)
      return state, step

    config = config_lib.load_config("tiny", overrides + ["config.train.steps=6"])
    state, step = restore(config)
    split = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
    with np.load(reference) as ref:
      same = all(np.array_equal(np.asarray(x), ref[f"a{i}"]) for i, x in enumerate(jax.tree.leaves(state)))
    train.train_and_evaluate(config, workdir)  # resume 4 -> 6 on 8 devices
    state, step6 = restore(config)
    np.savez(out, **{f"a{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))})
    print(json.dumps({"step": step, "same": same, "split": split > 0, "step6": step6}))
""")


def test_restore_onto_other_device_counts(tmp_path, corpus, trained):
  """1 device -> 8 (mesh data=2 x fsdp=2 x tensor=2), train there, -> back to 1."""
  workdir = copy_run(trained, tmp_path)
  reference, out = tmp_path / "ref4.npz", tmp_path / "got6.npz"
  leaves, _ = state_leaves(workdir)
  np.savez(reference, **{f"a{i}": x for i, x in enumerate(leaves)})
  mesh = ["config.mesh.data=2", "config.mesh.fsdp=2", "config.mesh.tensor=2"]
  args = [o[2:] for o in overrides(corpus)] + mesh
  proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(workdir), str(reference), str(out), json.dumps(args)],
                        env={**cli_env(tmp_path), "JAX_NUM_CPU_DEVICES": "8"}, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result == {"step": 4, "same": True, "split": True, "step6": 6}
  got, meta = state_leaves(workdir)  # the 8-device checkpoint, restored on one device
  assert meta["mesh"]["devices"] == 8 and meta["mesh"]["shape"] == {"data": 2, "fsdp": 2, "tensor": 2}
  with np.load(out) as saved:
    for i, x in enumerate(got):
      np.testing.assert_array_equal(x, saved[f"a{i}"])


# --------------------------------------------------------------------------- what is kept


def tiny_state(step):
  return {"w": jnp.full((64,), float(step)), "step": jnp.asarray(step)}


def test_keep_last_n_and_every_kth_and_interrupted_saves_are_ignored(tmp_path):
  directory = tmp_path / "checkpoints"
  ckpt = C.Checkpointer(directory, keep=2, keep_period=4)
  for step in range(1, 11):
    ckpt.save(step, tiny_state(step), {"data_state": {"step": step}})
  ckpt.close()
  assert C.Checkpointer(directory, read_only=True).all_steps() == [4, 8, 9, 10]
  assert not (directory / C.DELETED_DIR).exists() or not any((directory / C.DELETED_DIR).iterdir())
  # the leftovers of a save killed half way are never listed, and the next writer removes them
  (directory / "11.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
  assert C.Checkpointer(directory, read_only=True).all_steps() == [4, 8, 9, 10]
  ckpt = C.Checkpointer(directory, keep=2, keep_period=4)
  ckpt.save(11, tiny_state(11), {})
  ckpt.close()
  assert not (directory / "11.orbax-checkpoint-tmp").exists()
  meta = C.Checkpointer(directory, read_only=True).read_meta()
  assert meta["step"] == 11 and meta["version"] and "git_commit" in meta


def test_failed_save_is_a_clear_error_and_keeps_the_previous_step(tmp_path):
  """A save that cannot be written (here: a file-size limit, as a full disk would) stops
  with a CheckpointError naming the reason and the last complete step. With keep=1 this
  also checks Orbax's order: an old step is deleted only once a newer one is complete."""
  directory = tmp_path / "checkpoints"
  ckpt = C.Checkpointer(directory, keep=1)
  ckpt.save(1, tiny_state(1), {})
  ckpt.wait()
  big = {"w": jax.random.normal(jax.random.PRNGKey(0), (200_000,)), "step": jnp.asarray(2)}  # incompressible
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
  try:
    with pytest.raises(CheckpointError) as err:
      ckpt.save(2, big, {})
      ckpt.wait()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  message = str(err.value)
  assert "saving checkpoint step 2" in message and "size limit" in message
  assert "the last complete checkpoint is step 1" in message and "Fix:" in message
  ckpt.close()
  again = C.Checkpointer(directory, read_only=True)
  assert again.all_steps() == [1]
  state, _, _ = again.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), tiny_state(1)))
  np.testing.assert_array_equal(np.asarray(state["w"]), np.ones(64))


# --------------------------------------------------------------------------- fine-tuning and mismatches


def test_restore_from_starts_from_weights_with_a_fresh_optimizer(tmp_path, trained, capsys, caplog):
  own_text = write_corpus(tmp_path / "mine.txt", seed=7)
  workdir = tmp_path / "finetune"
  # lr so small that one update leaves the weights as they were (to float32 precision)
  args = ["train", "--config", "tiny", "--workdir", str(workdir), "--restore_from", str(trained),
          *overrides(own_text, 1, 1), "--config.optimizer.lr=1e-30"]
  caplog.set_level(logging.INFO)
  code, out, err = main(args, capsys)
  assert code == 0, err
  assert json.loads(out)["start_step"] == 0 and "starting from the weights of" in caplog.text
  _, _, base_state, _ = train.load_state(trained)
  _, _, state, meta = train.load_state(workdir)
  assert int(state.step) == 1 and meta["restored_from"].endswith("checkpoints/4")
  for a, b in zip(jax.tree.leaves(base_state.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-20)
  counts = [int(x) for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0] if "count" in str(p)]
  assert counts and set(counts) == {1}  # a fresh optimizer, one step old


def test_restore_from_a_different_model_is_one_clear_error(tmp_path, corpus, trained, capsys):
  code, _, err = main(["train", "--config", "tiny", "--workdir", str(tmp_path / "new"), "--restore_from",
                       str(trained), *overrides(corpus), "--config.model.hidden_size=64"], capsys)
  assert_one_line_error(code, err, "does not fit this config", "model.hidden_size (32 in the checkpoint, 64 here)",
                        "fine-tune with the model config")
  code, _, err = main(["train", "--config", "tiny", "--workdir", str(tmp_path / "new2"), "--restore_from",
                       str(tmp_path / "nowhere"), *overrides(corpus)], capsys)
  assert_one_line_error(code, err, "nowhere does not exist")


def test_resume_with_a_different_config_is_one_clear_error(tmp_path, corpus, trained, capsys):
  workdir = copy_run(trained, tmp_path)
  code, _, err = main(["train", "--config", "tiny", "--workdir", str(workdir), *overrides(corpus, 6),
                       "--config.model.n_blocks=2"], capsys)
  assert_one_line_error(code, err, "does not fit this config", "model.n_blocks (1 in the checkpoint, 2 here)",
                        "resume with the config the run was trained with")
  assert steps_on_disk(workdir) == [2, 4]


def test_tokenizer_different_from_the_checkpoint_is_one_clear_error(tmp_path, corpus, trained, capsys):
  # the same size, two tokens swapped: shapes fit, but every id would mean something else
  spec = json.loads((ASSETS / "sotu_bpe8k.json").read_text())
  vocab = spec["model"]["vocab"]
  a, b = [t for t, i in vocab.items() if i in (300, 301)]
  vocab[a], vocab[b] = vocab[b], vocab[a]
  other = tmp_path / "other_bpe.json"
  other.write_text(json.dumps(spec))
  workdir = copy_run(trained, tmp_path)
  code, _, err = main(["train", "--config", "tiny", "--workdir", str(workdir), *overrides(corpus, 6),
                       f"--config.data.tokenizer={other}"], capsys)
  assert_one_line_error(code, err, "trained with tokenizer 'sotu-bpe8k'", "different vocabulary",
                        "--config.data.tokenizer=sotu-bpe8k")
  config = C.saved_config(trained)
  config.data.tokenizer = str(other)
  with pytest.raises(CheckpointError, match="different vocabulary"):
    train.load_model(trained, config=config)


def test_missing_or_empty_workdir_for_eval_and_sample(tmp_path, trained):
  with pytest.raises(CheckpointError, match="does not exist.*Fix: pass the --workdir of a training run"):
    C.saved_config(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="has no checkpoints.*Fix: train first"):
    train.load_model(tmp_path / "empty")
  (tmp_path / "started" / "checkpoints").mkdir(parents=True)
  with pytest.raises(CheckpointError, match="has no complete checkpoint yet"):
    C.saved_config(tmp_path / "started")
  # what eval and sample read: the config and EMA model of a run, also from one step directory
  config, model = train.load_model(trained)
  assert config.model.hidden_size == 32 and config.train.steps == 4
  config2, _ = train.load_model(trained / "checkpoints" / "2")
  assert config2.to_dict() == config.to_dict()
