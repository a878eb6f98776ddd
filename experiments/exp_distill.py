"""Few-step LangFlow: distilled students against their teacher and the AR twin, quality and time to the output.

  python experiments/exp_distill.py [--quick] [--out experiments/results] [--workdir runs/bench_serving]
      [--runs runs/distill] [--methods flowmap,progressive] [--distill-steps 150] [--teacher-steps 16]
      [--steps 1,2,4,8,16,64] [--lengths 128,512] [--batches 1,16] [--samples 32] [--repeats 3]

Models
* Teacher and AR twin: the serving pair at length 128 (``serving_pair.py``,
  config ``serving:128``: the tiny backbone, 300 steps of 2048 tokens), in
  WORKDIR/{langflow,ar}_L128, reused when bench_serving.py trained them.
* Students: ``distill.distill_workdir`` (what ``langflow-jax distill`` runs) of
  the teacher, one per ``--methods`` entry, in RUNS/<method>-<distill steps>:
  ``flowmap`` trained for 1, 2, 4 and 8 steps against the teacher's
  ``--teacher-steps``-jump ODE; ``progressive`` halving ``--teacher-steps``
  jumps down to one, ``--distill-steps`` steps a round. Both start from the
  teacher's EMA weights; a stopped run resumes, a finished one is reused.

Measured
* Quality against steps: ``--samples`` unconditional samples of 128 tokens by
  the official Euler sampler (seed 42) from the teacher and each student at
  every ``--steps`` count; Gen. PPL under the AR twin and under a Kneser-Ney
  bigram of the training split, and the mean per-sample unigram entropy
  (``serving_pair.sample_quality``); held-out text scored the same way.
  Cached per run and checkpoint (``common.cached``).
* Time to the full output at each length and batch: a student samples with the
  teacher's network and sampler, so one LangFlow line serves both: LangFlow
  timed at the step counts up to 8 and the rest from the line a + b N fitted
  to them (``bench_serving.fit_line``, marked ~), against the AR twin's
  KV-cache decoder, in this process (``bench_serving.time_call``). Length 512
  times fresh weights of ``serving:512`` (time does not depend on the weights).
  The crossover step count N_x = (T_AR - a) / b, and the batch at which the
  2-step sampler stops being faster than AR (interpolated in log batch).
"""

from __future__ import annotations

import math
import pathlib
import sys
from typing import Any, Sequence

import jax
import numpy as np

import bench_serving
import common
import harness
import serving_pair
from langflow_jax import distill, methods, train
from langflow_jax.baselines import ar

NAME = "distill"
LENGTH = 128           # the quality length (the trained pair's)
TIMED_MAX_STEPS = 8    # LangFlow step counts above this come from the line fit
QUICK_DIR = "runs/distill_quick"
QUICK_TRAIN = ("config.train.batch_size=4", "config.train.eval_batches=1", "config.train.progress=false",
               "config.eval.steps=2", "config.eval.batch_size=2")
# The student runs: the trainer's budget per run (per round for progressive) and a fine-tuning lr.
STUDENT_OVERRIDES = ("config.optimizer.lr=5e-4", "config.optimizer.warmup_steps=10", "config.train.log_every=25",
                     "config.train.checkpoint_every=50", "config.train.plot=false")
FLOWMAP_MAX_STEPS = 8  # flowmap students train every --steps count up to this (the teacher's ODE allowing)


def method_overrides(method: str, args) -> list[str]:
  """flowmap: every sampler step count up to FLOWMAP_MAX_STEPS whose jumps the teacher's ODE halves at least
  once; progressive: halving rounds down to one jump (1 and 2 steps)."""
  if method == "progressive":
    return ["config.distill.method=progressive", "config.distill.steps=(1, 2)"]
  steps = [s for s in args.steps if s <= FLOWMAP_MAX_STEPS and 2 * max(s - 1, 1) <= args.teacher_steps]
  return [f"config.distill.method={method}", f"config.distill.steps={tuple(steps)}"]


def parse_args(argv: Sequence[str] | None = None):
  p = serving_pair.parser(__doc__, "smoke run: a 1-block width-32 pair at length 32 trained 2 steps, "
                                   "students of 2 steps, tiny samples", QUICK_DIR)
  p.add_argument("--runs", default=None, help="the students' run directories (default runs/distill)")
  p.add_argument("--methods", default=None, help="distillation methods (default flowmap,progressive)")
  p.add_argument("--distill-steps", type=int, default=None, help="student training steps a run (default 150)")
  p.add_argument("--teacher-steps", type=int, default=None, help="jumps of the teacher's ODE (default 16)")
  p.add_argument("--steps", type=harness.ints, default=None, help="sampler steps (default 1,2,4,8,16,64)")
  p.add_argument("--lengths", type=harness.ints, default=None, help="timed output lengths (default 128,512)")
  p.add_argument("--batches", type=harness.ints, default=None, help="timed batches (default 1,16)")
  p.add_argument("--samples", type=int, default=None, help="samples a quality point (default 32)")
  p.add_argument("--repeats", type=int, default=None, help="timed runs a point (default 3)")
  p.add_argument("--max-run-s", type=float, default=None, help="stop repeating past this (default 10)")
  full = dict(runs="runs/distill", methods="flowmap,progressive", distill_steps=150, teacher_steps=16,
              steps=[1, 2, 4, 8, 16, 64], lengths=[LENGTH, 512], batches=[1, 16], samples=32, repeats=3,
              max_run_s=10.0, train_steps=None)
  quick = dict(runs=QUICK_DIR, methods="flowmap,progressive", distill_steps=2, teacher_steps=4,
               steps=[1, 2, 4], lengths=[32], batches=[1, 2], samples=4, repeats=1, max_run_s=30.0, train_steps=2)
  args = serving_pair.parse_args(p, argv, full, quick, QUICK_DIR)
  if args.quick:
    args.overrides = [*QUICK_TRAIN, *args.overrides]
  args.runs = pathlib.Path(args.runs)
  args.methods = [m for m in args.methods.split(",") if m]
  args.quality_length = args.lengths[0] if args.quick else LENGTH
  return args


# --------------------------------------------------------------------------- models


def pair_member(method: str, args) -> tuple[Any, Any, pathlib.Path]:
  """(config, EMA model, run directory) of one model of the serving pair at the quality length, trained
  (or resumed) to its budget, or reused."""
  cfg = serving_pair.model_config(args.quality_length, method, args.overrides, args.train_steps)
  workdir = serving_pair.run_dir(args.workdir, method, args.quality_length)
  model, _ = bench_serving.trained_model(cfg, workdir, cfg.train.steps)
  return cfg, model, workdir


def student(method: str, teacher: pathlib.Path, args) -> tuple[pathlib.Path, Any, dict]:
  """(run directory, EMA model, card) of the ``method`` student of ``teacher``, distilled or reused."""
  workdir = args.runs / f"{method}-{args.distill_steps}"
  overrides = [*STUDENT_OVERRIDES, *method_overrides(method, args), f"config.train.steps={args.distill_steps}",
               f"config.train.eval_every={args.distill_steps}", f"config.distill.teacher_steps={args.teacher_steps}"]
  harness.log(f"[distill] {method} student of {teacher} in {workdir}")
  summary, timing = harness.timed(lambda: distill.distill_workdir(teacher, workdir, overrides), repeats=0)
  if summary.get("preempted"):
    from langflow_jax.cli import preempted_exit_status

    harness.log(f"[distill] stopped by {summary['preempted']}: rerun the same command to resume")
    sys.exit(preempted_exit_status(summary["preempted"]))
  _, model = train.load_model(workdir)
  card = {**summary["card"], "train_seconds_this_call": timing.seconds,
          "seconds_per_step": common.seconds_per_step(workdir)}
  return workdir, model, card


# --------------------------------------------------------------------------- quality


def quality(model, workdir: pathlib.Path, scorers: dict, args) -> dict[str, dict]:
  """Gen. PPL (AR twin, bigram) and entropy of ``--samples`` samples at every step count (cached)."""
  protocol = {"num": args.samples, "steps": list(args.steps), "seed": 42, "length": args.quality_length,
              "sampler": "euler", "scorers": sorted(scorers), "ar_run": str(serving_pair.run_dir(
                  args.workdir, "ar", args.quality_length))}

  def compute():
    out = {}
    for steps in args.steps:
      ids, _ = methods.get("langflow").generate(model, jax.random.PRNGKey(42), num=args.samples,
                                                length=args.quality_length, steps=steps)
      out[str(steps)] = serving_pair.sample_quality(np.asarray(ids), scorers)
      harness.log(f"[distill] {workdir.name} {steps} steps: {out[str(steps)]}")
    return out

  return common.cached(workdir, f"quality-{args.samples}x{args.quality_length}", protocol, compute)


# --------------------------------------------------------------------------- time


def latency(length: int, models: dict, args) -> list[dict]:
  """Time to the full output of AR and of LangFlow (teacher and students alike) at every batch."""
  key = jax.random.PRNGKey(0)
  rows = []
  for batch in args.batches:
    t_ar, _ = bench_serving.time_call(bench_serving.ar_run(models["ar"], length, batch, key), args)
    measured = {}
    for steps in sorted(s for s in args.steps if s <= TIMED_MAX_STEPS):
      t, _ = bench_serving.time_call(bench_serving.langflow_run(models["langflow"], length, batch, steps, key), args)
      measured[steps] = t.seconds
    fit = bench_serving.fit_line(measured)
    times = {str(s): {"seconds": measured.get(s, fit[0] + fit[1] * s), "extrapolated": s not in measured}
             for s in args.steps}
    rows.append({"length": length, "batch": batch, "ar_seconds": t_ar.seconds, "langflow": times, "fit": list(fit),
                 "crossover_steps": bench_serving.crossover_steps(t_ar.seconds, fit)})
    harness.log(f"[distill] L={length} B={batch}: AR {t_ar.seconds:.3f} s, LangFlow "
                + ", ".join(f"{s}: {v['seconds']:.3f}" for s, v in times.items()))
  return rows


def crossover_batch(rows: list[dict], steps: int) -> float | None:
  """The batch at which LangFlow at ``steps`` stops being faster than AR, by log-linear interpolation of
  the time ratio between the timed batches (None: it does not cross between them)."""
  ratio = [(r["batch"], r["langflow"][str(steps)]["seconds"] / r["ar_seconds"]) for r in rows]
  for (b0, r0), (b1, r1) in zip(ratio, ratio[1:]):
    if (r0 - 1) * (r1 - 1) <= 0 and r0 != r1:
      w = math.log(r0) / (math.log(r0) - math.log(r1))
      return float(math.exp(math.log(b0) + w * (math.log(b1) - math.log(b0))))
  return None


def timing_models(length: int, trained: dict, args) -> dict:
  """The trained pair at the quality length; fresh weights of ``serving:length`` elsewhere."""
  if length == args.quality_length:
    return trained
  return {m: methods.create_model(serving_pair.model_config(length, m, args.overrides, None), seed=0)
          for m in serving_pair.METHODS}


# --------------------------------------------------------------------------- report


def figure(path: pathlib.Path, results: dict, reference: dict, steps: Sequence[int]) -> str:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for label, q in results.items():
    axes[0].plot(steps, [q[str(s)]["gen_ppl_ar"] for s in steps], "o-", label=label)
    axes[1].plot(steps, [q[str(s)]["entropy"] for s in steps], "o-", label=label)
  axes[0].axhline(reference["gen_ppl_ar"], color="k", ls="--", label="held-out text")
  axes[1].axhline(reference["entropy"], color="k", ls="--", label="held-out text")
  serving_pair.log_log_axes(axes[0], "sampler steps (network evaluations)", "Gen. PPL under the AR twin")
  axes[1].set_xscale("log", base=2)
  axes[1].set_xlabel("sampler steps (network evaluations)")
  axes[1].set_title("mean sample entropy (nats)")
  axes[1].grid(True, alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return str(path)


def targets(results: dict, timing: list[dict], students: Sequence[str], steps: Sequence[int]) -> list[str]:
  """The issue's three targets, checked on the measured numbers (``n/a`` where a step count is missing)."""
  teacher = results["teacher"]
  lines = []
  for name in students:
    q = results[name]
    if "4" in q and "64" in teacher:
      ppl = q["4"]["gen_ppl_ar"] / teacher["64"]["gen_ppl_ar"] - 1
      ent = q["4"]["entropy"] - teacher["64"]["entropy"]
      ok = abs(ppl) <= 0.10 and abs(ent) <= 0.1
      lines.append(f"- {name}, 4 steps against the teacher's 64: Gen. PPL (AR) {ppl:+.1%}, entropy {ent:+.2f} "
                   f"nats: {'met' if ok else 'not met'} (target: within 10% and 0.1 nats).")
    if "2" in q and "8" in teacher:
      ok = q["2"]["gen_ppl_ar"] < teacher["8"]["gen_ppl_ar"]
      lines.append(f"- {name}, 2 steps against the teacher's 8: Gen. PPL (AR) {q['2']['gen_ppl_ar']:.1f} vs "
                   f"{teacher['8']['gen_ppl_ar']:.1f} (entropy {q['2']['entropy']:.2f} vs "
                   f"{teacher['8']['entropy']:.2f}): {'met' if ok else 'not met'}.")
  first = next((r for r in timing if r["batch"] == 1 and r["length"] == LENGTH), None)
  if first is not None and "2" in first["langflow"]:
    t2 = first["langflow"]["2"]["seconds"]
    lines.append(f"- 2 steps at batch 1, length {LENGTH}: {t2:.3f} s against AR's {first['ar_seconds']:.3f} s: "
                 f"{'met' if t2 < first['ar_seconds'] else 'not met'}.")
  return lines


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  # the teacher, then its students, then the AR twin (which only scores and times)
  teacher_cfg, teacher, teacher_dir = pair_member("langflow", args)
  students, cards = {}, {}
  for method in args.methods:
    workdir, model, cards[method] = student(method, teacher_dir, args)
    students[f"{method} student"] = (model, workdir)
  ar_cfg, ar_model, _ = pair_member("ar", args)
  configs, models = {"langflow": teacher_cfg, "ar": ar_cfg}, {"langflow": teacher, "ar": ar_model}
  scorers = {"ar": ar.sequence_scorer(ar_model), "bigram": common.bigram_scorer(teacher_cfg)}
  results = {label: quality(model, workdir, scorers, args)
             for label, (model, workdir) in {"teacher": (teacher, teacher_dir), **students}.items()}
  reference = serving_pair.sample_quality(common.heldout(configs["langflow"]).ids[: args.samples], scorers)
  timing = [row for length in args.lengths for row in latency(length, timing_models(length, models, args), args)]

  steps = list(args.steps)
  rows = []
  for label, q in results.items():
    for s in steps:
      rows.append([label, s, harness.fmt(q[str(s)]["gen_ppl_ar"], 1), harness.fmt(q[str(s)]["gen_ppl_bigram"], 1),
                   harness.fmt(q[str(s)]["entropy"], 2)])
  rows.append(["held-out text", "", harness.fmt(reference["gen_ppl_ar"], 1),
               harness.fmt(reference["gen_ppl_bigram"], 1), harness.fmt(reference["entropy"], 2)])
  mark = lambda v: ("~" if v["extrapolated"] else "") + harness.fmt(v["seconds"], 3)
  time_rows = [[r["length"], r["batch"], harness.fmt(r["ar_seconds"], 3), *[mark(r["langflow"][str(s)]) for s in steps],
                harness.fmt(r["crossover_steps"], 1)] for r in timing]
  crossings = {str(L): crossover_batch([r for r in timing if r["length"] == L], 2) for L in args.lengths}
  cross_text = "; ".join(
      f"length {L}: " + (f"about {b:.0f}" if b is not None else f"not between batches {args.batches[0]} and "
                                                                 f"{args.batches[-1]}")
      for L, b in crossings.items())
  t = configs["langflow"].train
  teacher_note = (f"Teacher: `serving:{args.quality_length}` LangFlow ({serving_pair.run_dir(args.workdir, 'langflow', args.quality_length)}), "
                  f"{t.steps} steps x {t.batch_size} x {configs['langflow'].data.seq_len} tokens; AR twin the same "
                  "config as `objective.name=ar`.")
  student_note = "Students: " + "; ".join(
      f"{m}: {c['method']} for {'/'.join(map(str, c['steps']))} steps against the teacher's {c['teacher_steps']}-jump "
      f"ODE, {args.distill_steps} steps{' a round x ' + str(c['rounds']) + ' rounds' if 'rounds' in c else ''} "
      f"({harness.fmt(c['seconds_per_step'], 2)} s/step)" for m, c in cards.items()) + "."
  paragraphs = [
      f"# Few-step students: quality and time to the full output{' (QUICK SMOKE RUN, numbers meaningless)' if args.quick else ''}",
      teacher_note + " " + student_note,
      "## Quality against steps\n\n" + harness.markdown_table(
          ["model", "steps", "Gen. PPL (AR twin)", "Gen. PPL (bigram)", "entropy (nats)"], rows),
      f"{args.samples} unconditional samples of {args.quality_length} tokens a point, official Euler sampler "
      "(N network evaluations), seed 42; Gen. PPL = exp(token-weighted NLL of tokens 2..L) under the trained AR twin "
      "and under a Kneser-Ney bigram of the training split; entropy: mean unigram entropy per sample (low entropy "
      "flatters Gen. PPL: read them together).",
      "## Time to the full output (seconds)\n\n" + harness.markdown_table(
          ["length", "batch", "AR (KV cache)", *[f"{s} steps" for s in steps], "N_x"], time_rows),
      f"A student's N steps cost the teacher's N steps (the same network and sampler). ~: from the line a + b N "
      f"fitted to the timed step counts (up to {TIMED_MAX_STEPS}). N_x: the step count at which LangFlow's time "
      f"equals AR's. Batch at which the 2-step sampler stops beating AR: {cross_text}. Length 512: fresh "
      "weights (timing only).",
      "## Targets\n\n" + "\n".join(targets(results, timing, [f"{m} student" for m in args.methods], steps)),
  ]
  fig = figure(args.out / "distill.png", results, reference, steps)
  return harness.write_results(args.out, NAME, paragraphs, [fig],
                               {"results": results, "reference": reference, "timing": timing, "cards": cards,
                                "crossover_batch_2_steps": crossings, "args": vars(args)}, args.quick)


if __name__ == "__main__":
  main()
