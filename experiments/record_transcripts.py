"""Records what `make demo` and the sampling commands print, for the transcripts in the docs.

    python experiments/record_transcripts.py              # trains in a scratch directory (minutes)
    python experiments/record_transcripts.py --scratch DIR

Runs, in ``--scratch`` (a fresh temporary directory by default, so that the
printed paths read ``runs/demo`` as they do after ``make demo``), the
commands of ``COMMANDS``: the demo (train the ``tiny`` config, bound,
samples), three ``sample`` calls and ``genppl`` on the demo model. Writes
``experiments/results/transcripts.json``: every command with its stdout, the
demo's evaluation JSON (``runs/demo/eval/*.json``), the commit and the
machine. ``experiments/render_docs.py`` puts them into README.md and docs/.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time

import harness

ROOT = pathlib.Path(__file__).resolve().parent.parent

COMMANDS = (
    "langflow-jax demo --workdir runs/demo",
    "langflow-jax sample --workdir runs/demo --num 2 --infill 'The ___ of the ___ .' --seed 2",
    "langflow-jax sample --workdir runs/demo --num 2 --prompt 'The Congress shall' --best-of 4 --score denoise "
    "--seed 3 --out runs/demo/samples.json",
    "langflow-jax sample --workdir runs/demo --num 1 --prompt 'The Congress shall' --show-steps --seed 4",
    "langflow-jax genppl --samples runs/demo/samples.json",
)


def git_commit() -> str:
  out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
  dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "langflow_jax", "configs"],
                         capture_output=True, text=True).stdout.strip()
  return out.stdout.strip() + (" (with uncommitted changes in langflow_jax/ or configs/)" if dirty else "")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--scratch", type=pathlib.Path, default=None, help="working directory (default: a new temp dir)")
  parser.add_argument("--out", type=pathlib.Path, default=ROOT / "experiments" / "results" / "transcripts.json")
  args = parser.parse_args(argv)
  scratch = args.scratch or pathlib.Path(tempfile.mkdtemp(prefix="langflow_transcripts_"))
  scratch.mkdir(parents=True, exist_ok=True)
  exe = pathlib.Path(sys.executable).with_name("langflow-jax")
  commit = git_commit()  # of the code the commands run; checked again at the end
  runs = []
  for command in COMMANDS:
    argv_ = shlex.split(command)
    harness.log(f"$ {command}")
    start = time.perf_counter()
    proc = subprocess.run([str(exe), *argv_[1:]], cwd=scratch, capture_output=True, text=True)
    if proc.returncode:
      sys.exit(f"{command} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    runs.append({"command": command, "stdout": proc.stdout, "seconds": time.perf_counter() - start})
  evals = sorted((scratch / "runs" / "demo" / "eval").glob("*.json"))
  if git_commit() != commit:
    sys.exit(f"the checkout changed while recording (from {commit} to {git_commit()}): record again")
  out = {"commit": commit, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": harness.machine_note(),
         "runs": runs, "demo_eval": json.loads(evals[0].read_text()) if evals else None}
  args.out.write_text(json.dumps(out, indent=1) + "\n")
  harness.log(f"wrote {args.out}")
  return out


if __name__ == "__main__":
  main()
