"""``langflow-jax``: one command line, one subcommand per task.

    langflow-jax train  --config tiny --workdir runs/demo [--config.train.steps=200 ...]
    langflow-jax config --config tiny [--config.x=y ...]     # print the resolved config
    langflow-jax demo   --workdir runs/demo                    # what `make demo` runs
    langflow-jax aot    --config owt --devices 64 [--memory-gb 80]  # memory per device, no hardware

Every subcommand is a thin wrapper around an importable function. Mistakes a
user can make end with one line on stderr naming the problem and the fix, and
exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable, Sequence

from langflow_jax.errors import ConfigError, UserError

EXIT_USER_ERROR = 2


def _split_overrides(extra: Sequence[str]) -> list[str]:
  """``--config.a=1`` and ``--config.a 1`` into ``config.a=1``; anything else is an error."""
  out, i = [], 0
  while i < len(extra):
    item = extra[i]
    if item.startswith("--config.") and "=" in item:
      out.append(item[2:])
    elif item.startswith("--config.") and i + 1 < len(extra):
      out.append(f"{item[2:]}={extra[i + 1]}")
      i += 1
    else:
      raise ConfigError(f"unrecognised argument '{item}'.", "see `langflow-jax <command> --help`.")
    i += 1
  return out


def _setup_logging(debug: bool) -> None:
  logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                      stream=sys.stderr)
  # Orbax and JAX log every checkpoint step at INFO through absl; keep them quiet.
  for name in ("absl", "jax", "orbax"):
    logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
  try:
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.DEBUG if debug else absl_logging.WARNING)
  except ImportError:
    pass


def _config_from_args(args, overrides):
  from langflow_jax import config as config_lib

  return config_lib.load_config(args.config, overrides)


def cmd_train(args, overrides) -> int:
  from langflow_jax import parallel, train

  parallel.maybe_initialize_distributed()
  config = _config_from_args(args, overrides)
  summary = train.train_and_evaluate(config, args.workdir)
  print(json.dumps({k: v for k, v in summary.items() if k != "plots"}, indent=2, default=str))
  return 0


def cmd_config(args, overrides) -> int:
  from langflow_jax import config as config_lib

  print(config_lib.describe(_config_from_args(args, overrides)))
  return 0


def cmd_demo(args, overrides) -> int:
  from langflow_jax import demo

  demo.run_demo(args.workdir, overrides)
  return 0


def cmd_aot(args, overrides) -> int:
  from langflow_jax import aot

  report = aot.run(args.config, overrides, args.devices)
  print(json.dumps(report.to_json()) if args.json else report.format(args.memory_gb))
  return 0


COMMANDS: dict[str, tuple[Callable, str]] = {
    "train": (cmd_train, "train a model (resumes from --workdir when it has checkpoints)"),
    "config": (cmd_config, "print the resolved config"),
    "demo": (cmd_demo, "train the tiny config, evaluate it and print samples"),
    "aot": (cmd_aot, "compile the train step for N simulated devices and report memory per device"),
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="langflow-jax", description=__doc__.split("\n")[0])
  parser.add_argument("--debug", action="store_true", help="show tracebacks and verbose logs")
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (func, help_text) in COMMANDS.items():
    p = sub.add_parser(name, help=help_text)
    p.set_defaults(func=func)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    if name in ("train", "config", "aot"):
      p.add_argument("--config", default="tiny", help="config name in configs/ or path to a .py file")
    if name in ("train", "demo"):
      p.add_argument("--workdir", required=(name == "train"), default="runs/demo",
                     help="run directory (checkpoints, metrics, plots)")
    if name == "aot":
      p.add_argument("--devices", type=int, required=True, help="number of devices of the target mesh")
      p.add_argument("--memory-gb", type=float, default=None, help="memory per device, to say whether it fits")
      p.add_argument("--json", action="store_true", help="print the report as one JSON line")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  debug = bool(getattr(args, "debug", False)) or os.environ.get("LANGFLOW_JAX_DEBUG") == "1"
  _setup_logging(debug)
  try:
    overrides = _split_overrides(extra)
    return args.func(args, overrides)
  except UserError as e:
    if debug:
      raise
    print(f"langflow-jax: error: {e}", file=sys.stderr)
    return EXIT_USER_ERROR
  except KeyboardInterrupt:
    print("langflow-jax: interrupted; rerun the same command to resume from the last checkpoint.",
          file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
