import errno
import json
import os
import subprocess
import sys

import pytest

from langflow_jax import cli, reporting
from tests.conftest import ROOT


def run_cli(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "langflow_jax.cli", *args], cwd=cwd, capture_output=True,
                        text=True, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("args, message", [
    (["train", "--workdir", "x", "--config.train.stepz=1"], "unknown config key"),
    (["train", "--workdir", "x", "--config.train.steps=ten"], "expected an int"),
    (["train", "--workdir", "x", "--config", "nope"], "unknown config 'nope'"),
    (["train", "--workdir", "x", "--bogus"], "unrecognised argument '--bogus'"),
])
def test_user_errors_are_one_line_and_exit_2(capsys, args, message):
  code = cli.main(args)
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert len(err) == 1 and message in err[0] and err[0].startswith("langflow-jax: error:")


def test_train_end_to_end_subprocess(tmp_path):
  corpus = tmp_path / "mine.txt"
  corpus.write_text("Our own text, written for this test about budgets and tariffs.\n\n" * 60)
  proc = run_cli("train", "--config", "tiny", "--workdir", str(tmp_path / "run"),
                 f"--config.data.name=file:{corpus}", "--config.train.steps=3", "--config.train.log_every=1",
                 "--config.train.eval_every=3", "--config.train.checkpoint_every=3", "--config.train.batch_size=4",
                 "--config.data.seq_len=32", "--config.train.progress=false")
  assert proc.returncode == 0, proc.stderr
  summary = json.loads(proc.stdout)
  assert summary["final_step"] == 3
  assert (tmp_path / "run" / "checkpoints" / "3").is_dir()
  assert (tmp_path / "run" / "plots" / "loss.png").is_file()
  rows = reporting.read_metrics(tmp_path / "run")
  assert [r["step"] for r in rows if "train/ce" in r] == [1, 2, 3]


# --------------------------------------------------------------------------- the Errors table of docs/errors.md

SMALL_RUN = ["--config.model.hidden_size=32", "--config.model.cond_dim=16", "--config.model.n_blocks=1",
             "--config.model.n_heads=2", "--config.data.seq_len=32", "--config.train.batch_size=4",
             "--config.train.steps=4", "--config.train.eval_batches=1", "--config.train.plot=false",
             "--config.train.progress=false", "--config.data.holdout_every=4"]


def corpus_file(tmp_path, content: bytes | None):
  path = tmp_path / "corpus.txt"
  if content is not None:
    path.write_bytes(content)
  return path


TEXT = b"\n\n".join(b"the state of the union is strong and the people are free %d" % i for i in range(80))


@pytest.mark.parametrize("content, extra, message", [
    (None, [], "does not exist"),                                         # missing corpus file
    (b"", [], "is empty"),                                                 # empty file
    (b"caf\xe9 au lait " * 50, [], "is not UTF-8"),                        # non-UTF-8 text
    (b"too short", [], "fewer than one sequence"),                        # shorter than one sequence
    (TEXT, ["--config.data.seq_len=128"], "longer than model.max_length"),  # sequence > model length
    (TEXT, ["--config.train.steps=0"], "train.steps=0 must be positive"),
    (TEXT, ["--config.train.batch_size=-2"], "train.batch_size=-2 must be positive"),
    (TEXT, ["--config.eval.steps=0"], "eval.steps=0 (ODE steps) must be positive"),
    (TEXT, ["--config.eval.probes=-1"], "eval.probes=-1 (divergence probes) must be positive"),
    (TEXT, ["--config.sample.steps=0"], "sample.steps=0 must be positive"),
    (TEXT, ["--config.sample.sampler=eulr"], "sample.sampler='eulr' is unknown (did you mean euler?)"),
    (TEXT, ["--config.eval.solver=rk5"], "eval.solver='rk5' is unknown"),
    (TEXT, ["--config.schedule.name=gumbal"], "unknown schedule 'gumbal'"),
    (TEXT, ["--config.mesh.data=3"], "needs 3 devices, but 1 are available"),  # mesh vs devices
    (TEXT, ["--config.train.keep_checkpoints=0"], "train.keep_checkpoints=0 must be positive"),
    (TEXT, ["--config.sample.steps=20000"], "sample.steps=20000 is above the maximum of 16384"),
    (TEXT, ["--config.model.n_heads=3"], "must split into model.n_heads=3 heads"),
])
def test_errors_table_rows(tmp_path, capsys, content, extra, message):
  corpus = corpus_file(tmp_path, content)
  code = cli.main(["train", "--config", "tiny", "--workdir", str(tmp_path / "run"), *SMALL_RUN,
                   f"--config.data.name=file:{corpus}", *extra])
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("langflow-jax: error:")]
  assert code == 2 and len(err) == 1 and message in err[0] and " Fix: " in err[0], err
  # a run that does not start leaves nothing behind: the workdir is created after the checks
  assert not (tmp_path / "run").exists()


def test_unwritable_workdir(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  code = cli.main(["train", "--config", "tiny", "--workdir", str(blocker / "run")])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "cannot write to workdir" in err[0] and "Fix: choose a writable" in err[0]
  assert blocker.read_text() == "not a directory"


def test_nan_loss_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
  corpus = corpus_file(tmp_path, TEXT)
  workdir = tmp_path / "run"
  code = cli.main(["train", "--config", "tiny", "--workdir", str(workdir), *SMALL_RUN,
                   f"--config.data.name=file:{corpus}", "--config.train.steps=30", "--config.train.log_every=1",
                   "--config.train.checkpoint_every=1", "--config.optimizer.lr=1e8",
                   "--config.optimizer.grad_clip=0", "--config.optimizer.warmup_steps=0"])
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("langflow-jax: error:")]
  assert code == 2 and len(err) == 1, err
  assert "training loss became" in err[0] and "Fix: lower --config.optimizer.lr" in err[0]
  last_good = int(err[0].split("the last good checkpoint is step ")[1].split(".")[0])
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] == last_good


def test_batch_not_divisible_by_data_parallel_size(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "langflow_jax.cli", "train", "--config", "tiny", "--workdir",
                         str(tmp_path / "run"), "--config.train.batch_size=3"], capture_output=True, text=True,
                        timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_NUM_CPU_DEVICES": "2"})
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(err) == 1, proc.stderr
  assert "train.batch_size=3 is not divisible by the data-parallel size 2" in err[0] and "multiple of 2" in err[0]


# --------------------------------------------------------------------------- failures of the machine


def _command_raising(exc):
  def command(args, overrides):
    raise exc
  return command


@pytest.mark.parametrize("exc, message", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl"),
     "no space left on the disk (/runs/x/metrics.jsonl)."),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/x"), "permission denied (/runs/x)."),
    (ValueError("OUT_OF_RANGE: Error writing \"a/0\" in OCDBT database: Failed writing: ... [os_error_code='28']"),
     "no space left on the disk."),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.5GiB."),
     "the accelerator ran out of memory."),
])
def test_storage_and_memory_failures_are_one_line(monkeypatch, capsys, exc, message):
  monkeypatch.setitem(cli.COMMANDS, "config", (_command_raising(exc), "boom"))
  code = cli.main(["config"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and message in err[0] and " Fix: " in err[0], err


def test_bugs_keep_their_traceback(monkeypatch):
  monkeypatch.setitem(cli.COMMANDS, "config", (_command_raising(KeyError("a bug")), "boom"))
  with pytest.raises(KeyError, match="a bug"):
    cli.main(["config"])
  # and --debug shows the traceback of a user-fixable failure too
  monkeypatch.setattr(cli, "_setup_logging", lambda debug: None)  # keep pytest's log capture as it is
  monkeypatch.setitem(cli.COMMANDS, "config", (_command_raising(OSError(errno.ENOSPC, "full")), "boom"))
  with pytest.raises(OSError):
    cli.main(["--debug", "config"])


# --------------------------------------------------------------------------- eval and sample rows of the table


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A run directory holding one checkpoint of a fresh small model (nothing trained: these
  checks stop before any weights are used)."""
  import jax

  from langflow_jax import checkpoint as ckpt_lib
  from langflow_jax import train
  from tests.conftest import small_config

  root = tmp_path_factory.mktemp("saved")
  c = small_config()
  tx = train.make_optimizer(c.optimizer, c.train.steps)
  state = jax.jit(lambda: train.fresh_train_state(c, tx))()
  ckpt_lib.save_state(root / "run", 1, state, c)
  (root / "empty").mkdir()
  (root / "no_steps" / "checkpoints").mkdir(parents=True)
  return root


@pytest.mark.parametrize("args, message", [
    (["eval", "--config.eval.solver=rk5"], "eval.solver='rk5' is unknown (did you mean rk4?)"),
    (["eval", "--config.eval.estimator=hutch"], "eval.estimator='hutch' is unknown"),
    (["eval", "--config.eval.steps=0"], "eval.steps=0 (ODE steps) must be positive"),
    (["eval", "--config.eval.steps=-3"], "eval.steps=-3 (ODE steps) must be positive"),
    (["eval", "--config.eval.probes=0"], "eval.probes=0 (divergence probes) must be positive"),
    (["eval", "--config.eval.grid=cdf"], "eval.grid='cdf' is unknown"),
    (["eval", "--split", "test"], "eval.split='test' is unknown"),
    (["sample", "--sampler", "eulr"], "sample.sampler='eulr' is unknown (did you mean euler?)"),
    (["sample", "--config.sample.sampler=eulr"], "sample.sampler='eulr' is unknown (did you mean euler?)"),
    (["sample", "--steps", "0"], "sample.steps=0 must be positive"),
    (["sample", "--num", "-1"], "sample.num=-1 must be positive"),
    (["sample", "--best-of", "0"], "sample.best_of=0 must be positive"),
    (["sample", "--temperature", "0"], "sample.temperature=0.0 must be positive"),
    (["sample", "--score", "nope"], "unknown sample score 'nope'"),
    (["sample", "--prompt", ""], "the prompt is empty"),
    (["sample", "--prompt", "  "], "the prompt is empty"),
    (["sample", "--prompt", "word " * 50], "tokens long, but a sample has only 32 positions"),
    (["sample", "--prompt", "\udcff\udcfe abc"], "--prompt is not valid UTF-8 text (byte 0xff at byte 0)"),
    (["sample", "--infill", "caf\udce9 ___"], "--infill is not valid UTF-8 text (byte 0xe9 at byte 3)"),
    (["sample", "--steps", "10000000"], "sample.steps=10000000 is above the maximum of 16384"),
    (["sample", "--out", "/proc/x.json"], "cannot write --out /proc/x.json: no file can be created in /proc"),
    (["sample", "--out", "/"], "--out / is a directory"),
])
def test_eval_and_sample_errors_table_rows(saved_run, capsys, args, message):
  code = cli.main([args[0], "--workdir", str(saved_run / "run"), *args[1:]])
  captured = capsys.readouterr()
  err = [l for l in captured.err.splitlines() if l.startswith("langflow-jax: error:")]
  assert code == 2 and len(err) == 1 and message in err[0] and " Fix: " in err[0], err
  assert "[sample]" not in captured.out  # refused before any sampling


def test_prompt_not_utf8_on_the_command_line_is_one_line():
  """The bytes as a shell passes them ($'\\xff\\xfe abc'), refused before anything loads."""
  proc = subprocess.run([sys.executable, "-m", "langflow_jax.cli", "sample", "--workdir", "/nonexistent",
                         "--prompt", b"\xff\xfe abc"], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": str(ROOT), "LC_ALL": "C.UTF-8"})
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(err) == 1, proc.stderr
  assert "--prompt is not valid UTF-8 text (byte 0xff at byte 0)" in err[0] and "Fix: " in err[0]


@pytest.mark.parametrize("content, message", [
    ('{"a": 1}', "the top level has no key 'meta' (its keys: 'a')"),
    ("[1, 2]", "the top level is a list, not an object with the key 'meta'"),
    ('{"meta": {}, "samples": []}', "meta has no key 'config' (it is empty)"),
    ('{"meta": {"config": "{}"}, "samples": [{"text": "x"}]}', "samples[0] has no key 'ids'"),
    ("not json", "is not JSON"),
])
def test_genppl_on_a_file_that_is_not_a_sample_file(tmp_path, capsys, content, message):
  path = tmp_path / "s.json"
  path.write_text(content)
  code = cli.main(["genppl", "--samples", str(path)])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and message in err[0], err
  assert 'expected the JSON that `langflow-jax sample --out FILE` writes: {"meta": {"config": ...}' in err[0]
  assert " Fix: " in err[0]


def test_leftovers_of_an_abandoned_checkpoint_read_are_not_printed(capsys):
  """A damaged step fails one array read; the others end after Orbax closed their event loop
  and reach sys.unraisablehook (dozens of tracebacks). Without --debug they are dropped."""
  import gc
  import types

  class RaisesInDel:
    def __init__(self, exc):
      self.exc = exc

    def __del__(self):
      raise self.exc

  @types.coroutine
  def pause():
    yield

  async def read_array():  # an Orbax read, closed while pending: it raises its own error
    try:
      await pause()
    finally:
      raise Exception("Encountered error while reading array index")

  previous = sys.unraisablehook
  cli._setup_logging(False)
  try:
    RaisesInDel(RuntimeError("Event loop is closed"))  # unraisable as soon as it is dropped
    coro = types.FunctionType(read_array.__code__.replace(co_filename="/site-packages/orbax/serialization.py"),
                              globals(), None, None, read_array.__closure__)()
    coro.send(None)
    del coro
    gc.collect()
    assert capsys.readouterr().err == ""
    RaisesInDel(ValueError("ours"))
    assert "ValueError: ours" in capsys.readouterr().err  # anything else is printed as before
  finally:
    sys.unraisablehook = previous


@pytest.mark.parametrize("command", ["eval", "sample"])
@pytest.mark.parametrize("workdir, message", [
    ("missing", "does not exist"),
    ("empty", "has no checkpoints (it is empty or not a training run)"),
    ("no_steps", "has no complete checkpoint yet"),
])
def test_missing_or_empty_workdir_for_eval_and_sample(saved_run, capsys, command, workdir, message):
  code = cli.main([command, "--workdir", str(saved_run / workdir)])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and message in err[0] and " Fix: " in err[0], err


@pytest.mark.parametrize("command", ["eval", "sample", "sample-baseline", "train"])
def test_commands_start_the_distributed_runtime_first(monkeypatch, capsys, command):
  from langflow_jax import parallel
  from langflow_jax.errors import ConfigError

  def first(*_):
    raise ConfigError("distributed set-up reached.", "nothing.")

  monkeypatch.setattr(parallel, "maybe_initialize_distributed", first)
  assert cli.main([command, "--workdir", "/nonexistent/run"]) == 2
  assert "distributed set-up reached" in capsys.readouterr().err
