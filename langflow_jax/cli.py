"""``langflow-jax``: one command line, one subcommand per task.

    langflow-jax train  --config tiny --workdir runs/demo [--config.train.steps=200 ...]
    langflow-jax distill --teacher runs/demo --workdir runs/student [--config.distill.method=progressive]
    langflow-jax config --config tiny [--config.x=y ...]     # print the resolved config
    langflow-jax demo   --workdir runs/demo                    # what `make demo` runs
    langflow-jax convert --from DIR --workdir runs/official    # import official weights (or --from hf:OWNER/NAME)
    langflow-jax export --workdir RUN --out DIR                # write the official layout
    langflow-jax prepare owt --out DATA                        # tokenize a corpus once to local shards
    langflow-jax sample-baseline --workdir runs/ar [--prompt TEXT]  # samples of the AR or MDLM baseline
    langflow-jax sample --workdir runs/demo --num 8 --steps 128 [--prompt TEXT | --infill TEXT]
    langflow-jax genppl --samples samples.json                 # Gen. PPL + entropy of a sample file
    langflow-jax eval   --workdir runs/demo [--data file:my.txt] [--plot]   # likelihood (bound, NLL, NELBO)
    langflow-jax aot    --config owt --devices 64 [--memory-gb 80]  # memory per device, no hardware
    langflow-jax serve  --workdir RUN [--port 8000 --slots 16 --steps 32]  # OpenAI-compatible HTTP server

Every subcommand is a thin wrapper around an importable function. Mistakes a
user can make (and a full disk, missing permissions or device memory) end with
one line on stderr naming the problem and the fix, and exit status 2;
``--debug`` shows the traceback instead. Other exceptions are bugs and keep
their traceback. ``train`` stopped by SIGTERM (Ctrl-C) exits 143 (130) once its
checkpoint is saved, so that a scheduler can tell it from a finished run (0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Callable, Sequence

from langflow_jax.errors import ConfigError, UserError, environment_error

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
  # Orbax also logs a failed background save as several ERROR tracebacks before
  # the same error reaches us as an exception: without --debug only that one
  # reported line is shown.
  for name in ("jax", "orbax"):
    logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
  try:
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.DEBUG if debug else absl_logging.WARNING)
  except ImportError:
    pass
  # After set_verbosity, which sets the absl logger's level itself. Orbax also
  # logs each unreadable metadata file of a damaged checkpoint at ERROR (with
  # the file's bytes); our own warning names the step instead.
  logging.getLogger("absl").setLevel(logging.DEBUG if debug else logging.CRITICAL)
  # The CLI runs no asyncio code of its own; Orbax's and TensorStore's reads do.
  logging.getLogger("asyncio").setLevel(logging.DEBUG if debug else logging.CRITICAL)
  sys.unraisablehook = sys.__unraisablehook__ if debug else _quiet_unraisable


def _orbax_noise(unraisable) -> bool:
  """An exception Python could not raise anywhere that comes from a checkpoint read that
  was abandoned: a damaged step fails one array read, and the reads of the other arrays
  finish after Orbax closed their event loop (``RuntimeError: Event loop is closed``) or
  are garbage-collected with their own error (``Exception ignored in: <coroutine ...>``)."""
  exc = unraisable.exc_value
  if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
    return True
  code = getattr(unraisable.object, "cr_code", None)
  return code is not None and any(part in code.co_filename for part in ("orbax", "tensorstore"))


def _quiet_unraisable(unraisable) -> None:
  """``sys.unraisablehook`` without ``--debug``: the leftovers of an abandoned checkpoint
  read (dozens of tracebacks per damaged step) are dropped; the one warning or error
  about the step is what the user sees. Everything else is printed as usual."""
  if _orbax_noise(unraisable):
    logging.getLogger(__name__).debug("ignored after an abandoned checkpoint read: %r", unraisable.exc_value)
    return
  sys.__unraisablehook__(unraisable)


# Arguments that are text to tokenize (file paths may be any bytes; these must be UTF-8).
TEXT_ARGUMENTS = ("prompt", "infill")


def _check_text_arguments(args) -> None:
  """Python decodes a command line that is not UTF-8 into lone surrogates; say so at once."""
  for name in TEXT_ARGUMENTS:
    value = getattr(args, name, None)
    if not isinstance(value, str):
      continue
    try:
      value.encode("utf-8")
    except UnicodeEncodeError as e:
      bad = ord(value[e.start])
      byte = f"byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"character U+{bad:04X}"
      offset = len(value[:e.start].encode("utf-8", "surrogateescape"))
      raise UserError(f"--{name} is not valid UTF-8 text ({byte} at byte {offset}).",
                      "pass UTF-8 text: convert it (e.g. `iconv -f latin1 -t utf-8`) or use a UTF-8 "
                      "terminal locale (e.g. LANG=C.UTF-8).") from e


def _config_from_args(args, overrides):
  from langflow_jax import config as config_lib

  return config_lib.load_config(args.config, overrides)


def cmd_train(args, overrides) -> int:
  from langflow_jax import parallel, train

  parallel.maybe_initialize_distributed()
  if args.restore_from:
    overrides = [*overrides, f"config.train.restore_from={args.restore_from}"]
  config = _config_from_args(args, overrides)
  summary = train.train_and_evaluate(config, args.workdir)
  print(json.dumps({k: v for k, v in summary.items() if k != "plots"}, indent=2, default=str))
  return preempted_exit_status(summary.get("preempted"))


def cmd_distill(args, overrides) -> int:
  from langflow_jax import distill, parallel

  parallel.maybe_initialize_distributed()
  summary = distill.distill_workdir(args.teacher, args.workdir, overrides)
  print(json.dumps({k: v for k, v in summary.items() if k != "plots"}, indent=2, default=str))
  return preempted_exit_status(summary.get("preempted"))


def preempted_exit_status(preempted: str | None) -> int:
  """0 for a finished run; 128 + the signal number (143 for SIGTERM, 130 for Ctrl-C) for
  one that saved a checkpoint and stopped early, so that a scheduler can tell them apart."""
  return 128 + int(getattr(signal, preempted)) if preempted else 0


def cmd_config(args, overrides) -> int:
  from langflow_jax import config as config_lib

  print(config_lib.describe(_config_from_args(args, overrides)))
  return 0


def cmd_demo(args, overrides) -> int:
  from langflow_jax import demo

  demo.run_demo(args.workdir, overrides)
  return 0


def cmd_convert(args, overrides) -> int:
  from langflow_jax import convert

  out = convert.convert_official(args.source, args.workdir)
  print(f"converted {args.source} -> {out} (use: langflow-jax eval --workdir {out})")
  return 0


def cmd_export(args, overrides) -> int:
  from langflow_jax import convert

  out = convert.export_official(args.workdir, args.out, use_ema=not args.raw)
  print(f"wrote {out}/config.json and {out}/model.safetensors")
  return 0


def cmd_prepare(args, overrides) -> int:
  from langflow_jax.data import prepare

  if overrides:
    raise ConfigError(f"prepare takes no --config overrides (got {overrides[0]}).", "see `langflow-jax prepare --help`.")
  result = prepare.prepare_named(
      args.name, args.out, tokenizer=args.tokenizer, seq_len=args.seq_len, wrap=not args.no_wrap,
      insert_eos=not args.no_eos, official_groups=args.official_groups,
      splits=args.splits.split(",") if args.splits else None, local=args.source, holdout_every=args.holdout_every,
      hf_path=args.hf_path, hf_revision=args.hf_revision, tfds_dir=args.tfds_dir, force=args.force)
  print(json.dumps(result, indent=2))
  return 0


def _prepare_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("name", help="lm1b | owt | lm1b-gpt2 | ptb | wikitext2 | wikitext103 | lambada | ag_news | pubmed "
                              "| arxiv | sotu | file:PATH")
  p.add_argument("--out", required=True, help="directory to write <name>-<tokenizer>-L<len>-<wrap|pad>/ into")
  p.add_argument("--tokenizer", help="default: the corpus's protocol (bert-base-uncased for lm1b, else gpt2)")
  p.add_argument("--seq-len", type=int, help="default: the protocol's (128 for lm1b, else 1024)")
  p.add_argument("--no-wrap", action="store_true", help="one padded row per document instead of packing")
  p.add_argument("--no-eos", action="store_true", help="no EOS between packed documents (insert_eos=False)")
  p.add_argument("--official-groups", action="store_true",
                 help="drop the packing remainder per 1000 documents x 16 shards, as the official datasets.map")
  p.add_argument("--splits", help="comma-separated: train,heldout (default: all the corpus has)")
  p.add_argument("--from", dest="source", help="local raw files (parquet/jsonl/txt, a save_to_disk dir, or "
                                                "LM1B's extracted tarball) instead of TFDS / the HF hub")
  p.add_argument("--holdout-every", type=int, default=10, help="sotu / file: every k-th document is held out")
  p.add_argument("--hf-path", help="another HF dataset id or local dir with the same columns")
  p.add_argument("--hf-revision", help="e.g. refs/convert/parquet for hub datasets that were loading scripts")
  p.add_argument("--tfds-dir", help="TFDS data_dir for lm1b (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  p.add_argument("--force", action="store_true", help="rewrite splits that are already complete")


def cmd_sample_baseline(args, overrides) -> int:
  from langflow_jax import checkpoint, config as config_lib, methods, parallel
  from langflow_jax.data.tokenizer import load_tokenizer

  parallel.maybe_initialize_distributed()
  config = checkpoint.saved_config(args.workdir)
  config_lib.apply_overrides(config, overrides)
  method = methods.for_config(config)
  _, model = checkpoint.load_model(args.workdir, use_ema=config.sample.use_ema, config=config)
  length = config.sample.seq_len or config.data.seq_len
  texts = method.sample_texts(model, load_tokenizer(config.data.tokenizer), config.sample, length, args.prompt)
  for i, text in enumerate(texts):
    print(f"--- sample {i}\n{text}")
  return 0


def cmd_sample(args, overrides) -> int:
  from langflow_jax import parallel, sample

  parallel.maybe_initialize_distributed()
  sample.generate_from_workdir(
      args.workdir, num=args.num, steps=args.steps, prompt=args.prompt, infill=args.infill,
      best_of=args.best_of, show_steps=args.show_steps, sampler=args.sampler, temperature=args.temperature,
      seed=args.seed, out=args.out, score=args.score, overrides=overrides)
  return 0


def cmd_genppl(args, overrides) -> int:
  from langflow_jax import genppl

  if overrides:
    raise ConfigError("genppl takes no --config overrides.", "pass --samples and --scorer only.")
  result = genppl.gen_ppl_report(args.samples, args.scorer, reference=not args.no_reference)
  if args.json:
    print(json.dumps(result, indent=2))
  return 0


def _add_sample_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--num", type=int, help="number of samples (default: config sample.num)")
  p.add_argument("--steps", type=int, help="sampler steps = network evaluations (default: sample.steps)")
  p.add_argument("--prompt", help="keep this text fixed as a prefix")
  p.add_argument("--infill", help="fill the gaps of a template: ___ is sample.gap_tokens tokens, ___5 five")
  p.add_argument("--best-of", type=int, dest="best_of", help="candidates per sample; the best by sample.score wins")
  p.add_argument("--show-steps", action="store_true", dest="show_steps",
                 help="print the draft, refined and final passes")
  p.add_argument("--sampler", help="euler (official) | heun | stochastic | multistep")
  p.add_argument("--temperature", type=float, help="temperature on the predicted probabilities")
  p.add_argument("--score", help="best-of score: denoise | ce | bound (default: sample.score)")
  p.add_argument("--seed", type=int, help="random seed (default: sample.seed)")
  p.add_argument("--out", help="write the samples (ids, text, scores, settings) to this JSON file")


def cmd_eval(args, overrides) -> int:
  from langflow_jax import evaluate, parallel

  parallel.maybe_initialize_distributed()
  if args.mode is not None:
    overrides = [*overrides, f"config.eval.mode={args.mode}"]
  result = evaluate.evaluate_workdir(args.workdir, overrides, checkpoint=args.checkpoint, data=args.data,
                                     split=args.split, name=args.name, plot=args.plot, progress=True)
  print(result.report())
  return 0


def cmd_aot(args, overrides) -> int:
  from langflow_jax import aot

  report = aot.run(args.config, overrides, args.devices)
  print(json.dumps(report.to_json()) if args.json else report.format(args.memory_gb))
  return 0


def cmd_serve(args, overrides) -> int:
  from langflow_jax import serve

  serve.serve_workdir(args.workdir, host=args.host, port=args.port, slots=args.slots, steps=args.steps,
                      max_steps=args.max_steps, queue=args.queue, scheduler=args.scheduler,
                      fuse_passes=args.fuse_passes, warmup=not args.no_warmup, overrides=overrides)
  return 0


COMMANDS: dict[str, tuple[Callable, str]] = {
    "train": (cmd_train, "train a model (resumes from --workdir when it has checkpoints)"),
    "distill": (cmd_distill, "train a few-step student of a LangFlow run (resumes like train)"),
    "config": (cmd_config, "print the resolved config"),
    "demo": (cmd_demo, "train the tiny config, evaluate it and print samples"),
    "convert": (cmd_convert, "import an official release (config.json + model.safetensors) as a run"),
    "export": (cmd_export, "write a run's weights in the official layout"),
    "prepare": (cmd_prepare, "tokenize and pack a corpus once into local shards (prepared:DIR)"),
    "sample-baseline": (cmd_sample_baseline, "sample from a trained AR or MDLM baseline (--config.sample.x=y)"),
    "sample": (cmd_sample, "generate text from a trained run (prompts, infill, best-of-n)"),
    "genppl": (cmd_genppl, "generative perplexity and entropy of a sample file"),
    "eval": (cmd_eval, "a run's likelihood with its protocol card: LangFlow's ODE bound (nats/token, terms), "
                       "the AR baseline's exact NLL, MDLM's NELBO"),
    "aot": (cmd_aot, "compile the train step for N simulated devices and report memory per device"),
    "serve": (cmd_serve, "serve a run over HTTP: OpenAI-compatible /v1/completions, streamed passes, best-of-n"),
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
    if name == "prepare":
      _prepare_arguments(p)
    if name in ("train", "demo", "convert", "export"):
      p.add_argument("--workdir", required=(name != "demo"), default="runs/demo",
                     help="run directory (checkpoints, metrics, plots)")
    if name == "convert":
      p.add_argument("--from", dest="source", required=True,
                     help="directory with the official config.json and model.safetensors, or a hub release "
                          "hf:OWNER/NAME[@REVISION] (e.g. hf:Continuous-Rivals-Discrete/langflow-owt; read "
                          "through the Hugging Face cache, HF_HUB_OFFLINE=1 reads only the cache)")
    if name == "export":
      p.add_argument("--out", required=True, help="output directory for config.json + model.safetensors")
      p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA ones")
    if name == "sample-baseline":
      p.add_argument("--workdir", required=True, help="run directory of an ar or mdlm training run")
      p.add_argument("--prompt", default="", help="text every sample continues (after BOS; mdlm: none "
                                                  "samples unconditionally)")
    if name == "distill":
      p.add_argument("--teacher", required=True, help="run directory of the trained LangFlow teacher")
      p.add_argument("--workdir", required=True, help="run directory of the student")
    if name == "train":
      p.add_argument("--restore_from", default="", metavar="RUN_DIR",
                     help="start from another run's weights (fresh optimizer, step 0) unless --workdir "
                          "already has checkpoints; same as --config.train.restore_from")
    if name == "sample":
      p.add_argument("--workdir", default="runs/demo", help="run directory of a trained model")
      _add_sample_args(p)
    if name == "genppl":
      p.add_argument("--samples", required=True, help="a file written by `langflow-jax sample --out`")
      p.add_argument("--scorer", default="bigram", help="autoregressive scorer: bigram (default, the run's training split) | gpt2:DIR "
                          "(a local Hugging Face GPT-2 directory) | ar:RUN_DIR (a trained AR baseline run)")
      p.add_argument("--no-reference", action="store_true", dest="no_reference",
                     help="skip scoring held-out data for scale")
      p.add_argument("--json", action="store_true", help="also print the result as JSON")
    if name == "eval":
      p.add_argument("--workdir", default=None, help="run directory to evaluate (newest checkpoint)")
      p.add_argument("--checkpoint", default=None,
                     help="RUN/checkpoints/<step>, or an official release directory")
      p.add_argument("--data", default=None, help="dataset instead of the run's, e.g. file:my.txt (whole file)")
      p.add_argument("--split", default=None, help="train | heldout | all (default eval.split; all with --data)")
      p.add_argument("--name", default=None, help="name of the JSON/PNG written under eval/")
      p.add_argument("--plot", action="store_true", help="also write the bound-vs-steps and integrand PNG")
      p.add_argument("--mode", default=None, choices=("flow", "sc_chain_rule", "sde"),
                     help="official eval mode (default eval.mode = flow): flow | sc_chain_rule | sde")
    if name == "serve":
      p.add_argument("--workdir", required=True, help="run directory of a LangFlow or AR run")
      p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
      p.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
      p.add_argument("--slots", type=int, help="slots of the stationary batch (default: sample.batch_size)")
      p.add_argument("--steps", type=int, help="default sampler steps of a request (default: sample.steps)")
      p.add_argument("--max-steps", type=int, dest="max_steps", help="most steps a request may ask for "
                                                                       "(default: max(steps, 1024))")
      p.add_argument("--queue", type=int, help="waiting requests beyond which the server answers 429 "
                                               "(default: 4 x slots)")
      p.add_argument("--scheduler", default="stationary", choices=("stationary", "static"),
                     help="stationary (continuous batching) or static (batch waits for its slowest member)")
      p.add_argument("--fuse-passes", type=int, dest="fuse_passes", default=None,
                     help="LangFlow: up to N passes a call, none past a stream event or a request's end "
                          "(default: engine.FUSE_PASSES; 1: one pass a call)")
      p.add_argument("--no-warmup", action="store_true", dest="no_warmup",
                     help="compile on the first requests instead of before listening")
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
    _check_text_arguments(args)
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
  except Exception as e:
    # A full disk, missing permissions or device memory: the user's to fix, so
    # one line too. Anything else is a bug and keeps its traceback.
    err = environment_error(e)
    if err is None or debug:
      raise
    print(f"langflow-jax: error: {err} (--debug shows the traceback)", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
  sys.exit(main())
