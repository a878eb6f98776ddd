"""Input pipeline throughput: preparing (tokenize + pack + write) and feeding batches.

  python experiments/bench_input.py            # embedded corpus + a generated 1 GB text file
  python experiments/bench_input.py --quick    # 32 MB file, fewer batches (a smoke run)

Two numbers per corpus, in tokens/s:
* prepare: raw text to memory-mapped rows, once per dataset (``langflow-jax prepare``);
* feed: shuffled batches from those rows through ``BatchIterator`` (grain
  index shuffling, per-process rows, prefetch threads), what the train loop pulls.
The feed rate is compared with what the train step consumes
(``--train-tokens-per-s``, the ``bench`` config's step on this CPU is a few
thousand tokens/s); it must be at least 20x that.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile

import harness
from langflow_jax.data import pipeline, prepare, sources


def generate_text(path: pathlib.Path, size_bytes: int) -> int:
  """Writes embedded-corpus documents over and over (blank-line separated) up to ``size_bytes``."""
  docs = [d.encode("utf-8") for d in sources.embedded_documents()]
  written = 0
  with open(path, "wb") as f:
    while written < size_bytes:
      for d in docs:
        f.write(d + b"\n\n")
        written += len(d) + 2
        if written >= size_bytes:
          break
  return written


def bench_prepare(recipe: prepare.Recipe, out: pathlib.Path) -> tuple[pathlib.Path, dict]:
  directory, timing = harness.timed(lambda: prepare.prepare(recipe, out, ["train"]), repeats=0)  # once per dataset
  seconds = timing.seconds
  manifest = prepare.read_manifest(directory, "train")
  return directory, {"seconds": seconds, "tokens": manifest["tokens"], "rows": manifest["rows"],
                     "tokens_per_s": manifest["tokens"] / seconds}


def bench_feed(split: pipeline.PackedSplit, batch: int, steps: int, prefetch: int, threads: int) -> float:
  """Tokens/s of the batches the train loop pulls: the median batch after the first (the
  thread pool's start-up)."""
  it = pipeline.BatchIterator(split, batch, seed=0, prefetch=prefetch, threads=threads)
  b, timing = harness.timed(lambda: next(it), repeats=steps)
  assert b["ids"].shape == (batch, split.seq_len)
  return batch * split.seq_len / timing.seconds


def main(argv=None) -> int:
  parser = harness.parser(__doc__, "32 MB generated file, fewer batches")
  parser.add_argument("--size-mb", type=float, default=1024, help="size of the generated text file")
  parser.add_argument("--train-tokens-per-s", type=float, default=5000,
                      help="what the train step consumes (the lead's bench figure)")
  parser.add_argument("--workdir", help="where to write the file and the prepared rows (default: a temp dir)")
  args = parser.parse_args(argv)
  size_mb = 32 if args.quick else args.size_mb
  steps = 20 if args.quick else 200
  work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bench_input_"))
  work.mkdir(parents=True, exist_ok=True)
  os.environ["LANGFLOW_JAX_CACHE"] = str(work / "cache")
  print(f"[bench_input] work dir {work}; figures on a shared machine are contended")

  corpus_file = work / f"generated_{int(size_mb)}mb.txt"
  if not corpus_file.is_file():
    n, timing = harness.timed(lambda: generate_text(corpus_file, int(size_mb * 2**20)), repeats=0)
    print(f"[bench_input] generated {n / 2**20:.0f} MB of text in {timing.seconds:.1f} s")

  cases = [  # (label, recipe, feed batches (global batch, length))
      ("embedded sotu, sotu-bpe8k, L=128", prepare.Recipe("sotu", "sotu-bpe8k", 128), [(16, "bench"), (512, "lm1b")]),
      (f"generated {size_mb:.0f} MB, gpt2, L=1024", prepare.Recipe(f"file:{corpus_file}", "gpt2", 1024),
       [(16, "bench-size batch"), (512, "owt")]),
  ]
  worst = float("inf")
  for label, recipe, feeds in cases:
    directory, prep = bench_prepare(recipe, work / "prepared")
    print(f"[bench_input] {label}: prepare {prep['tokens'] / 1e6:.1f} M tokens -> {prep['rows']} rows in "
          f"{prep['seconds']:.1f} s = {prep['tokens_per_s'] / 1e6:.2f} M tokens/s")
    split, _ = prepare.open_split(directory, "train")
    for batch, what in feeds:
      for prefetch, threads in ((0, 1), (4, 2)):
        rate = bench_feed(split, batch, max(5, steps * 16 // batch), prefetch, threads)
        ratio = rate / args.train_tokens_per_s
        if batch == 16:
          worst = min(worst, ratio)
        print(f"[bench_input]   feed batch {batch} x {split.seq_len} ({what}), prefetch {prefetch}/{threads} threads: "
              f"{rate / 1e6:.2f} M tokens/s = {ratio:,.0f}x the train step's {args.train_tokens_per_s:,.0f} tokens/s")
  print(f"[bench_input] machine: {harness.machine_note()}")
  print(f"[bench_input] smallest feed/train ratio: {worst:,.0f}x (needs >= 20x): {'OK' if worst >= 20 else 'TOO SLOW'}")
  return 0 if worst >= 20 else 1


if __name__ == "__main__":
  sys.exit(main())
