import json
import subprocess
import sys

import pytest

from langflow_jax import cli
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
  rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train/ce" in r] == [1, 2, 3]
