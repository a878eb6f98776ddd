"""What every script in experiments/ shares: its command line, timing, the machine line, the results files.

The reproduction scripts (``exp_*.py``; ``common.py`` adds their training runs
and caches) and the benchmarks (``bench_*.py``) build their flags on
:func:`parser`, time with :func:`timed` (the median of repeated calls after one
warm-up call that compiles), say where they ran with :func:`machine_note` and
write ``OUT/<name>.md`` and ``OUT/<name>.json`` beside their PNGs with
:func:`write_results`.

The scripts import this module by its bare name (``import harness``): Python
runs ``python experiments/x.py`` with experiments/ first on ``sys.path``, and
this module adds the checkout above it, so ``langflow_jax`` imports from the
checkout even where it is not installed. jax is imported only inside the
functions that need it: ``bench_scaling`` chooses the number of simulated
devices from its flags, before jax starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
if str(ROOT) not in sys.path:  # a checkout without `pip install -e .`
  sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- command line


def parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
  """The parser of a script: its docstring's first line as the description, the rest as the
  epilog, and ``--quick`` (every script has a smoke mode its test runs)."""
  p = argparse.ArgumentParser(description=doc.strip().split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=doc.strip().split("\n", 1)[-1])
  p.add_argument("--quick", action="store_true", help=quick_help)
  return p


def ints(text: str) -> list[int]:
  """A comma-separated list of integers (``--steps 8,16,32``)."""
  return [int(x) for x in text.split(",") if x.strip()]


def parse_with_defaults(p: argparse.ArgumentParser, argv: Sequence[str] | None, full: dict[str, Any],
                        quick: dict[str, Any], config_overrides: bool = False) -> argparse.Namespace:
  """Parses ``argv``; each flag left unset takes its value from ``quick`` under ``--quick`` and
  from ``full`` otherwise (flags declared with ``default=None``). With ``config_overrides``,
  ``--config.group.key=value`` arguments pass through as ``args.overrides`` (without the dashes)."""
  if config_overrides:
    args, rest = p.parse_known_args(argv)
    bad = [x for x in rest if not x.startswith("--config.")]
    if bad:
      p.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [x[2:] for x in rest]
  else:
    args = p.parse_args(argv)
  for k, v in (quick if args.quick else full).items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  return args


# --------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
  """Seconds of one call: the median of timed runs, or (``extrapolated``) a value a script fitted."""

  seconds: float
  compile_s: float | None = None  # the first call minus the median (None: no warm-up call)
  runs: int = 0
  extrapolated: bool = False
  times: tuple[float, ...] = ()  # every timed call, in order (for a total or a split by kind)

  def to_json(self) -> dict[str, Any]:
    """What a results file keeps (the calls' own times are the script's to summarise)."""
    return {"seconds": self.seconds, "compile_s": self.compile_s, "runs": self.runs,
            "extrapolated": self.extrapolated}


def timed(fn: Callable[[], Any], repeats: int = 1, max_run_s: float = math.inf) -> tuple[Any, Timing]:
  """(the last call's output, the timing): the median of ``repeats`` calls after one warm-up call
  that compiles, stopping early once a call exceeds ``max_run_s``. ``repeats=0``: the one call
  itself, compilation included (a step that runs once: preparing data, a first quality run)."""
  import jax

  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - start
  if repeats == 0:
    return out, Timing(first, None, 1, times=(first,))
  times: list[float] = []
  while len(times) < repeats:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
    if times[-1] > max_run_s:
      break
  median = statistics.median(times)
  return out, Timing(median, max(first - median, 0.0), len(times), times=tuple(times))


def xla_flops(stage) -> float:
  """XLA's FLOP count of a lowered or compiled jax function (NaN where the backend gives none)."""
  cost = stage.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


# --------------------------------------------------------------------------- output


_START = time.perf_counter()


def log(text: str) -> None:
  """A progress line on stderr with wall and CPU seconds since the start."""
  print(f"[{time.perf_counter() - _START:6.0f}s wall {time.process_time():6.0f}s cpu] {text}", file=sys.stderr,
        flush=True)


def fmt(x: float | None, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "n/a"
  return f"{x:.{digits}f}" if abs(x) < 1e5 else f"{x:.3g}"


def ratio_cell(x: float | None, h: float) -> str:
  """A figure beside its ratio to a reference, ``0.911 (1.21)``: nats/token against an entropy."""
  return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f} ({x / h:.2f})"


def carried_cell(row: dict | None, key: str, h: float) -> str:
  """:func:`ratio_cell` of ``row[key]``, starred when the study carried the row over from an
  earlier invocation (``row["carried"]``)."""
  row = row or {}
  text = ratio_cell(row.get(key), h)
  return text + " *" if row.get("carried") and text != "n/a" else text


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def load_average() -> str:
  try:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    return "n/a"


def machine_info() -> dict[str, Any]:
  """The device, the CPU model and count, jax and Python: what a timing depends on."""
  import jax

  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  device = jax.devices()[0]
  return {"device": f"{device.platform}: {getattr(device, 'device_kind', str(device))}", "cpu": cpu,
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "python": platform.python_version()}


def machine_note() -> str:
  """The machine line every report ends with; the load average is read when it is written."""
  m = machine_info()
  return (f"{m['cpu_count']} CPU cores ({m['cpu']}), jax {m['jax']} on {m['device']}; "
          f"load average (1, 5, 15 min) at the end: {load_average()}")


def jsonable(x: Any) -> Any:
  """``json.dumps(default=...)`` for numpy values and paths."""
  import numpy as np

  if isinstance(x, pathlib.PurePath):
    return str(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.generic, np.floating)):
    return x.item()
  raise TypeError(f"cannot store {type(x).__name__} as JSON")


def write_json(path: pathlib.Path, data: Any) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data, indent=1, default=jsonable) + "\n")
  return path


def write_results(out: pathlib.Path, name: str, paragraphs: Sequence[str], figures: Sequence[str],
                  data: dict[str, Any], quick: bool) -> dict[str, Any]:
  """Prints the report (``paragraphs``, a link to each figure, the machine line) and writes it to
  ``out/<name>.md``, with ``data`` as ``out/<name>.json`` (plus the table's and figures' paths,
  ``quick`` and the machine line). Returns what the JSON holds."""
  machine = machine_note()
  links = [f"![{pathlib.Path(f).stem}]({pathlib.Path(f).name})" for f in figures]
  text = "\n\n".join([*paragraphs, *links, f"Machine: {machine}. Timings on a shared machine are contended."])
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{name}.md"
  path.write_text(text.rstrip() + "\n")
  result = {"table": str(path), "figures": [str(f) for f in figures], **data, "quick": bool(quick),
            "machine": machine}
  write_json(out / f"{name}.json", result)
  print(text)
  log(f"wrote {path} and {name}.json")
  return result
