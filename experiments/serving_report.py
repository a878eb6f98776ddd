"""The report of experiments/bench_serving.py: the finding in words, its tables and its two figures.

Everything here reads the numbers ``bench_serving.Bench`` measured (one
result a length, as serving.json keeps them) and measures nothing.
"""

from __future__ import annotations

import pathlib

import numpy as np

import serving_pair
from langflow_jax import plots, sampling


def _fmt_s(row: dict) -> str:
  s = row["seconds"]
  text = f"{s:.3f}" if s < 10 else f"{s:.1f}"
  return ("~" + text) if row["extrapolated"] else text


def _fmt_n(x: float) -> str:
  return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def finding(results: list[dict], batches: list[int]) -> list[str]:
  """The answer in sentences, one paragraph a length, derived from the numbers."""
  paragraphs = []
  for r in results:
    L = r["length"]
    ar_t = {x["batch"]: x["seconds"] for x in r["rows"] if x["method"] == "ar"}
    lf = {(x["batch"], x["steps"]): x["seconds"] for x in r["rows"] if x["method"] == "langflow"}
    steps = sorted({s for _, s in lf})
    b0, b1 = min(batches), max(batches)
    cross = {int(b): v for b, v in r["crossover_steps"].items()}
    lo, hi = steps[0], steps[-1]
    words = []
    x0 = cross[b0]
    head = (f"**Length {L}.** At batch {b0}, AR with a KV cache gives the full output in {ar_t[b0]:.3f} s; "
            f"LangFlow takes {lf[(b0, lo)]:.3f} s at {lo} steps ({lf[(b0, lo)] / ar_t[b0]:.1f}x AR) and "
            f"{lf[(b0, hi)]:.3f} s at {hi} ({lf[(b0, hi)] / ar_t[b0]:.1f}x). ")
    if x0 < lo:
      head += (f"They break even at {max(x0, 0):.1f} steps, below the fewest steps measured: LangFlow is "
               "slower at every measured step count.")
    elif x0 >= hi:
      head += f"LangFlow is faster at every measured step count (break-even at {x0:.0f} steps)."
    else:
      head += f"LangFlow is faster up to {x0:.1f} steps and slower beyond."
    words.append(head)
    if b1 != b0:
      trend = "falls" if cross[b1] < x0 else "rises"
      words.append(f"The break-even step count {trend} from {max(x0, 0):.1f} at batch {b0} to "
                   f"{max(cross[b1], 0):.1f} at batch {b1}" +
                   (": batching takes away what advantage parallel decoding has, since the AR decoder "
                    "turns idle per-token steps into throughput while every LangFlow step already "
                    "processes the whole sequence." if trend == "falls" else
                    ": batching favours LangFlow here.") +
                   f" At batch {b1} AR reaches {b1 * L / ar_t[b1]:.0f} tokens/s against "
                   f"{b1 * L / lf[(b1, lo)]:.0f} for LangFlow at {lo} steps.")
    q = {(x["method"], x["steps"]): x for x in r["quality"]["samples"]}
    ar_q = q[("ar", None)]
    lf_lo, lf_hi = q[("langflow", lo)], q[("langflow", hi)]
    ref = r["quality"]["heldout_text"]
    ho = r["quality"]["heldout"]
    words.append(
        f"Quality: LangFlow's samples score Gen. PPL {lf_lo['gen_ppl_ar']:.0f} at {lo} steps and "
        f"{lf_hi['gen_ppl_ar']:.0f} at {hi} under the AR scorer (entropy {lf_lo['entropy']:.2f} / "
        f"{lf_hi['entropy']:.2f}) against {ar_q['gen_ppl_ar']:.0f} for AR's own samples (entropy "
        f"{ar_q['entropy']:.2f}; held-out text {ref['gen_ppl_ar']:.0f}, {ref['entropy']:.2f}); under the "
        f"bigram scorer {lf_hi['gen_ppl_bigram']:.0f} against {ar_q['gen_ppl_bigram']:.0f} (held-out text "
        f"{ref['gen_ppl_bigram']:.0f}). On held-out text LangFlow's bound gives PPL <= "
        f"{ho['langflow_bound_ppl']:.0f} and AR's PPL is {ho['ar_ppl']:.0f}.")
    dominating = [s for s in steps
                  if lf[(b0, s)] < ar_t[b0] and q[("langflow", s)]["gen_ppl_ar"] < ar_q["gen_ppl_ar"]]
    if dominating:
      words.append(f"Pareto: LangFlow at {', '.join(map(str, dominating))} steps is both faster and better than "
                   f"AR at batch {b0}.")
    else:
      words.append(f"Pareto: no LangFlow point is both faster than AR and better under the AR scorer at "
                   f"batch {b0}.")
    fitted = [x for x in r["best_of"] if x["within_budget"]]
    if fitted:
      parts = [f"best-of-{x['n']} at {x['steps']} steps ({x['seconds']:.3f} s, Gen. PPL {x['gen_ppl_ar']:.0f}, "
               f"entropy {x['entropy']:.2f})" for x in fitted]
      words.append(f"In the time of one AR output LangFlow fits {'; '.join(parts)}, against AR's "
                   f"{ar_q['gen_ppl_ar']:.0f}.")
    elif r["best_of"]:
      need = min(x["seconds"] if x["steps"] else x["needs_s"] for x in r["best_of"])
      words.append(f"In the time of one AR output ({ar_t[b0]:.3f} s) LangFlow cannot run even best-of-1 at 2 "
                   f"steps ({need:.3f} s).")
    paragraphs.append(" ".join(words))
  return paragraphs


def report(results: list[dict], meta: dict, args) -> list[str]:
  """serving.md's sections (the harness adds the figures and the machine line)."""
  lines = ["# Serving benchmark: LangFlow against autoregressive decoding", ""]
  lines += [f"Written by `python experiments/bench_serving.py{' ' + ' '.join(meta['argv']) if meta['argv'] else ''}` "
            f"on {meta['date']}.", ""]
  lines += ["## Finding", ""]
  lines += [p + "\n" for p in finding(results, args.batches)]
  trained = all(r["training"][m]["trained_steps"] for r in results for m in serving_pair.METHODS)
  lines += [
      ("Caveats: quality numbers come from models trained for a few hundred steps on a 2.3M-token corpus on a "
       "CPU; they order the methods at this budget, not at convergence. " if trained else
       "Caveats: fresh (untrained) weights: the quality numbers mean nothing, only the timings do. ") +
      f"Timings are wall-clock on a machine shared with other jobs (load average {meta['load_start']} at the "
      f"start, {meta['load_end']} at the end: 1, 5, 15 minutes), so they are contended; `~` marks a LangFlow "
      "time taken from its line fit in steps rather than measured.", ""]
  shapes = ", ".join(f"{r['quality']['heldout_text']['num']} x {r['length']}" for r in results)
  lines += ["## Device and config", ""]
  m = meta["machine"]
  lines += [f"* device: {m['device']}, {m['cpu']}, {m['cpu_count']} cores; jax {m['jax']}, Python {m['python']}",
            f"* load average at start / end: {meta['load_start']} / {meta['load_end']} (`uptime`: "
            f"{meta['uptime_start']})"]
  if not args.quick and 1024 not in args.lengths:
    lines.append("* length 1024 not run (`--lengths 128,512,1024` adds it): on a 2-core CPU its model pair's "
                 "training and its batch-64 runs do not fit the benchmark's half hour.")
  for r in results:
    mc = r["model"]
    p = {k: r["models"][k]["params"] for k in serving_pair.METHODS}
    f = {k: r["models"][k]["forward_flops_per_token"] for k in serving_pair.METHODS}
    tr = r["training"]
    blocks = f"{mc['n_blocks']} block{'s' if mc['n_blocks'] != 1 else ''}"
    trained = (f" ({tr['langflow'].get('tokens', 0) / 1e3:.0f}k tokens each); the trainer's final held-out CE "
               f"(EMA) {_ce(tr['langflow'])} / {_ce(tr['ar'])} nats (LangFlow: denoising CE over noise levels, "
               "not a likelihood)" if tr["langflow"]["trained_steps"] else " (fresh weights: timing only)")
    lines.append(
        f"* length {r['length']}: config `serving:{r['length']}` (width {mc['hidden_size']}, {blocks}, "
        f"{mc['n_heads']} heads, MLP x{mc['mlp_ratio']}, vocab {mc['vocab_size']}); parameters LangFlow "
        f"{p['langflow']['total'] / 1e6:.3f}M ({p['langflow']['non_embedding'] / 1e6:.3f}M outside the V x D "
        f"matrices), AR {p['ar']['total'] / 1e6:.3f}M ({p['ar']['non_embedding'] / 1e6:.3f}M); forward FLOPs "
        f"per token (XLA) LangFlow {f['langflow'] / 1e6:.2f}M, AR {f['ar'] / 1e6:.2f}M; trained "
        f"{tr['langflow']['trained_steps']} / {tr['ar']['trained_steps']} steps{trained}")
  lines += [
      "* equal config, not equal parameter count: the AR twin drops the noise conditioning (gamma MLP, adaLN, "
      "self-conditioning input) and LangFlow adds the skip logits z E^T; matching weights would change the "
      "width or depth of one backbone and with it the per-token cost, so both counts are shown instead.",
      f"* LangFlow: official Euler-EDM sampler with self-conditioning, temperature 1, update in "
      f"{sampling.SamplerOptions().resolved_update_dtype()}; AR: KV-cache decoder under jit + lax.scan, "
      "temperature 1, top-p 1 (ancestral); both unconditional, float32 weights.",
      f"* timing: median of {args.repeats} timed run{'s' if args.repeats != 1 else ''} after a compiling first "
      f"call (one run when a run exceeds {args.max_run_s:g} s); compile = first call minus the median; "
      f"LangFlow points predicted above {args.max_run_s:g} s come from t = a + b N fitted to its runs at the "
      "same length and batch (`~`).",
      f"* quality: {args.quality_tokens} tokens a point ({shapes}), same seed; Gen. PPL = "
      "exp(sum NLL / sum (len - 1)) under the trained AR model of the same length and under a Kneser-Ney "
      "bigram of the training split; entropy = mean per-sample unigram entropy (nats).", ""]

  lines += ["## Time to the full output", "",
            "Seconds for B sequences (B = concurrency), and tokens/s = B x length / seconds.", ""]
  head = "| length | method | steps | " + " | ".join(f"B={b} s | B={b} tok/s" for b in args.batches)
  lines += [head + " | compile s (per B) |", "|" + "---|" * (3 + 2 * len(args.batches) + 1)]
  for r in results:
    groups = [("ar", None)] + [("langflow", s) for s in sorted(args.steps)]
    for method, steps in groups:
      rows = {x["batch"]: x for x in r["rows"] if x["method"] == method and x["steps"] == steps}
      cells = []
      for b in args.batches:
        x = rows[b]
        tps = ("~" if x["extrapolated"] else "") + f"{x['tokens_per_s']:.0f}"
        cells += [_fmt_s(x), tps]
      comp = "/".join("-" if rows[b]["compile_s"] is None else f"{rows[b]['compile_s']:.1f}" for b in args.batches)
      name = "AR (KV cache)" if method == "ar" else "LangFlow"
      lines.append(f"| {r['length']} | {name} | {steps if steps else r['length']} | " + " | ".join(cells) +
                   f" | {comp} |")
  lines += ["", "(AR's steps column: one decode step per token.)", ""]

  lines += ["## Break-even steps", "",
            "N_x = (T_AR - a) / b: the LangFlow step count whose time to the full output equals AR's at the same "
            "length and batch; LangFlow is faster below it.", ""]
  lines += ["| length | " + " | ".join(f"B={b}" for b in args.batches) + " |", "|" + "---|" * (1 + len(args.batches))]
  for r in results:
    lines.append(f"| {r['length']} | " + " | ".join(_fmt_n(r["crossover_steps"][str(b)]) for b in args.batches) + " |")
  checks = [c for r in results for c in r["fit_checks"]]
  if checks:
    worst = max(abs(c["first_call_s"] / c["predicted_s"] - 1) for c in checks)
    lines += ["", f"Check of the line fit: {len(checks)} extrapolated points were also run once for the quality "
              f"table; their first call (compile included) differs from fit + compile by at most {worst:.0%}."]
  lines.append("")

  lines += ["## Quality", "",
            "Samples of the quality batch (the same for every concurrency). AR's own samples are scored by the model "
            "that drew them, which favours them (their expected NLL is that model's entropy); the bigram column "
            "favours neither method.", ""]
  lines += ["| length | method | steps | Gen. PPL (AR scorer) | Gen. PPL (bigram) | entropy |",
            "|---|---|---|---|---|---|"]
  for r in results:
    for x in r["quality"]["samples"]:
      name = "AR (KV cache)" if x["method"] == "ar" else "LangFlow"
      lines.append(f"| {r['length']} | {name} | {x['steps'] or '-'} | {x['gen_ppl_ar']:.1f} | "
                   f"{x['gen_ppl_bigram']:.1f} | {x['entropy']:.2f} |")
    ref = r["quality"]["heldout_text"]
    lines.append(f"| {r['length']} | held-out text | - | {ref['gen_ppl_ar']:.1f} | {ref['gen_ppl_bigram']:.1f} | "
                 f"{ref['entropy']:.2f} |")
  lines += ["", "Held-out likelihood (same sequences for both):", "",
            "| length | sequences x tokens | LangFlow bound (nats/token) | LangFlow PPL <= | AR (nats/token) | "
            "AR PPL | bound protocol |", "|---|---|---|---|---|---|---|"]
  for r in results:
    h = r["quality"]["heldout"]
    lines.append(f"| {r['length']} | {h['sequences']} x {r['length']} | {h['langflow_bound_nats']:.3f} +- "
                 f"{h['langflow_bound_stderr']:.3f} | {h['langflow_bound_ppl']:.1f} | {h['ar_nats']:.3f} | "
                 f"{h['ar_ppl']:.1f} | {h['protocol']} |")
  lines.append("")

  lines += ["## Best-of-n LangFlow against one AR output at equal wall-clock", "",
            "Budget: AR's time to one full output at batch 1. Steps: the most the line fit at batch n allows "
            "(capped at the largest step count), lowered while the timed run overshoots; candidates ranked by the "
            f"free `ce` score; quality over {args.quality_tokens} tokens of requests.", ""]
  lines += ["| length | n | steps | seconds (1 request) | AR seconds | within budget | Gen. PPL (AR scorer) "
            "| entropy |", "|---|---|---|---|---|---|---|---|"]
  for r in results:
    ar_q = next(x for x in r["quality"]["samples"] if x["method"] == "ar")
    for x in r["best_of"]:
      if x.get("steps"):
        lines.append(f"| {r['length']} | {x['n']} | {x['steps']} | {x['seconds']:.3f} | {x['budget_s']:.3f} | "
                     f"{'yes' if x['within_budget'] else 'no'} | {x['gen_ppl_ar']:.1f} | {x['entropy']:.2f} |")
      else:
        lines.append(f"| {r['length']} | {x['n']} | - | ~{x['needs_s']:.3f} at 2 steps | {x['budget_s']:.3f} | no | "
                     "- | - |")
    t_ar = next(x["seconds"] for x in r["rows"] if x["method"] == "ar" and x["batch"] == min(args.batches))
    lines.append(f"| {r['length']} | AR, 1 sample | - | - | {t_ar:.3f} | - | {ar_q['gen_ppl_ar']:.1f} | "
                 f"{ar_q['entropy']:.2f} |")
  lines += ["", "## Plots"]
  return ["\n".join(lines)]


def _ce(info: dict) -> str:
  return "n/a" if info.get("heldout_ce") is None else f"{info['heldout_ce']:.3f}"


# --------------------------------------------------------------------------- plots


def write_plots(out: pathlib.Path, results: list[dict], args) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = len(results)
  cmap = plt.get_cmap("viridis")
  steps = sorted(args.steps)
  colors = {s: cmap(i / max(len(steps) - 1, 1) * 0.85) for i, s in enumerate(steps)}

  fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
  for ax, r in zip(axes[0], results):
    for s in steps:
      rows = sorted((x for x in r["rows"] if x["method"] == "langflow" and x["steps"] == s), key=lambda x: x["batch"])
      bs = [x["batch"] for x in rows]
      ts = [x["seconds"] for x in rows]
      ax.plot(bs, ts, "-", color=colors[s], lw=1.2, label=f"LangFlow {s} steps")
      for x in rows:
        ax.plot(x["batch"], x["seconds"], "o", color=colors[s], mfc="white" if x["extrapolated"] else colors[s])
    rows = sorted((x for x in r["rows"] if x["method"] == "ar"), key=lambda x: x["batch"])
    ax.plot([x["batch"] for x in rows], [x["seconds"] for x in rows], "s-", color="crimson", lw=2.2,
            label="AR (KV cache)")
    serving_pair.log_log_axes(ax, "concurrency (sequences per call)", f"length {r['length']}")
    ax.set_ylabel("seconds to the full output")
  axes[0][0].legend(fontsize=7, title="hollow: from the line fit", title_fontsize=7)
  latency = plots.save_figure(fig, out / "serving_latency.png")

  fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
  b0 = min(args.batches)
  for ax, r in zip(axes[0], results):
    q = {(x["method"], x["steps"]): x for x in r["quality"]["samples"]}
    lat = {(x["method"], x["steps"]): x["seconds"] for x in r["rows"] if x["batch"] == b0}
    xs = [lat[("langflow", s)] for s in steps]
    ys = [q[("langflow", s)]["gen_ppl_ar"] for s in steps]
    ax.plot(xs, ys, "o-", color="tab:blue", label=f"LangFlow (Euler, batch {b0})")
    for s, x, y in zip(steps, xs, ys):
      ax.annotate(f"{s}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    t_ar = lat[("ar", None)]
    y_ar = q[("ar", None)]["gen_ppl_ar"]
    ax.plot([t_ar], [y_ar], "*", ms=14, color="crimson", label="AR (KV cache), 1 sample")
    ax.axvline(t_ar, color="crimson", ls="--", lw=1)
    ref = r["quality"]["heldout_text"]["gen_ppl_ar"]
    ax.axhline(ref, color="gray", ls=":", lw=1, label="held-out text")
    fitted = [x for x in r["best_of"] if x.get("steps")]
    for x in fitted:  # hollow: over the budget
      ax.plot([x["seconds"]], [x["gen_ppl_ar"]], "D", color="tab:green",
              mfc="tab:green" if x["within_budget"] else "white")
      ax.annotate(f"best-of-{x['n']}, {x['steps']} st.", (x["seconds"], x["gen_ppl_ar"]),
                  textcoords="offset points", xytext=(4, -10), fontsize=7, color="tab:green")
    nx = r["crossover_steps"][str(b0)]
    if steps[0] <= nx <= steps[-1]:
      y_x = float(np.exp(np.interp(np.log(nx), np.log(steps), np.log(ys))))
      note = f"crossover: {nx:.1f} steps"
    else:
      y_x = fitted[0]["gen_ppl_ar"] if fitted and fitted[0]["n"] == 1 else y_ar
      note = f"crossover: {max(nx, 0):.1f} steps (outside the grid)"
    ax.plot([t_ar], [y_x], "X", ms=11, color="black", label=note)
    serving_pair.log_log_axes(ax, f"seconds to the full output (batch {b0})", f"length {r['length']}", xbase=10)
    ax.set_ylabel("Gen. PPL under the AR scorer (lower is better)")
    ax.legend(fontsize=7)
  pareto = plots.save_figure(fig, out / "serving_pareto.png")
  return [latency, pareto]
