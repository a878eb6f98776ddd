"""Writes the generated blocks of README.md and docs/*.md from experiments/results/ and the code.

    python experiments/render_docs.py           # rewrite every block in place
    python experiments/render_docs.py --check   # change nothing; exit 1 naming the blocks that differ

A page marks a block with a pair of comments; everything between them is the
renderer's, and is replaced on every run:

    <!-- results:baselines -->
    ... table made from experiments/results/baselines.json ...
    <!-- /results:baselines -->

``results:NAME`` blocks come from the results files (``BLOCKS`` says which
files each one reads); ``generated:settings`` is the config reference, made
from ``langflow_jax/config.py``. ``tests/test_docs.py`` fails when a page's
block differs from what this script makes of the current files, so a result
that is re-run (``experiments/exp_*.py``, ``bench_*.py``,
``record_transcripts.py``) is followed by ``python experiments/render_docs.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import pathlib
import re
import sys
from typing import Any, Callable

import harness

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "experiments" / "results"
MARKER = re.compile(r"<!-- (?P<kind>results|generated):(?P<name>[\w.-]+) -->\n(?P<body>.*?)"
                    r"<!-- /(?P=kind):(?P=name) -->", re.DOTALL)


def pages(root: pathlib.Path = ROOT) -> list[pathlib.Path]:
  """The pages that hold generated blocks: the front page and the reference pages."""
  return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


class Results:
  """The results files of one directory, read once each."""

  def __init__(self, root: pathlib.Path = RESULTS):
    self.root, self._cache = root, {}
    self.prefix = ""  # the way from the page being rendered to the repository root ("" or "../")

  def link(self, name: str) -> str:
    """A Markdown link to a results file, from the page being rendered."""
    return f"[{name}]({self.prefix}experiments/results/{name})"

  def json(self, name: str) -> Any:
    if name not in self._cache:
      self._cache[name] = json.loads((self.root / name).read_text(encoding="utf-8"))
    return self._cache[name]

  def text(self, name: str) -> str:
    return (self.root / name).read_text(encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class Block:
  render: Callable[[Results], str]
  sources: tuple[str, ...]   # the files of experiments/results it reads


BLOCKS: dict[str, Block] = {}


def block(name: str, *sources: str):
  def register(fn):
    BLOCKS[name] = Block(fn, sources)
    return fn
  return register


# --------------------------------------------------------------------------- formatting


def num(x: float | None, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "n/a"
  return f"{x:.{digits}f}"


def table(headers, rows) -> str:
  cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731
  lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def fenced(text: str, lang: str = "text") -> str:
  return f"```{lang}\n{text.rstrip()}\n```"


def machine(d: dict) -> str:
  return f"Machine: {d['machine']}." if d.get("machine") else ""


def bound_mode(d: dict) -> str:
  """The eval mode of a study's LangFlow bound. Studies written before eval.mode existed (2026-12-02)
  record none: their evaluator held the self-conditioning pre-pass outside the divergence, which is
  what the ``flow`` mode does now."""
  return (d.get("protocol") or {}).get("mode") or "flow"


def bound_note(d: dict) -> str:
  if bound_mode(d) != "flow":
    return ""
  return ("LangFlow's numbers are the ODE estimate in `flow` mode (the evaluator of the time: the "
          "self-conditioning pre-pass outside the divergence), which reads low with self-conditioning "
          "and is not an upper bound; see the eval modes in the likelihood page.")


# --------------------------------------------------------------------------- the front page


@block("headline", "baselines.json", "known_entropy.json", "serving.json", "serve.json")
def headline(r: Results) -> str:
  b, k = r.json("baselines.json"), r.json("known_entropy.json")
  res, ref = b["results"], b["reference"]
  flow = bound_mode(b) == "flow"
  # MDLM at its better head setting (its rows differ only there): the comparison a tuned baseline gets
  mdlm_key = min((key for key in res if key.startswith("mdlm")), key=lambda key: res[key]["nats_per_token"])
  mdlm, mdlm_note = res[mdlm_key], "" if mdlm_key == "mdlm" else f" ({res[mdlm_key].get('label', mdlm_key)})"
  rows = [[f"held-out nats/token, embedded corpus, tiny size, {b['steps']} steps ({res['langflow']['params'] / 1e6:.1f}M "
           "parameters; <= marks an upper bound" + ("; LangFlow's in the official `flow` mode, which reads low"
                                                   if flow else "") + ")",
           f"{'' if flow else '<= '}{num(res['langflow']['nats_per_token'])}",
           f"<= {num(mdlm['nats_per_token'])}{mdlm_note}",
           num(res["ar"]["nats_per_token"]), "baselines.json"],
          [f"Gen. PPL of {res['langflow']['num_samples']} samples under a bigram scorer (held-out text: "
           f"{ref['gen_ppl']:.1f})", f"{res['langflow']['gen_ppl']:.1f}", f"{mdlm['gen_ppl']:.1f}{mdlm_note}",
           f"{res['ar']['gen_ppl']:.1f}", "baselines.json"]]
  for corpus, c in k["results"].items():
    h = c["card"]["H"]
    # the largest budget every method was trained to: a comparison at equal steps
    budgets = [set(per) for per in c["ladder"].values() if per]
    common_steps = set.intersection(*budgets) if budgets else set()
    if not common_steps:
      continue
    top = max(common_steps, key=int)
    cells = [f"{'<= ' if method != 'ar' else ''}{num(c['ladder'][method][top]['nats_per_token'])}"
             if top in c["ladder"].get(method, {}) else "n/a" for method in ("langflow", "mdlm", "ar")]
    rows.append([f"text of known entropy `{corpus}` (H = {h:.3f} nats/token): held-out nats/token at "
                 f"{top} steps", *cells, "known_entropy.json"])
  s = r.json("serving.json")
  for res_l in s["results"]:
    length, times = res_l["length"], {(x["method"], x["steps"]): x["seconds"] for x in res_l["rows"] if x["batch"] == 1}
    lf = sorted(st for m, st in times if m == "langflow")
    rows.append([f"seconds to one full {length}-token output (batch 1; LangFlow at {lf[0]} and {lf[-1]} steps)",
                 f"{times[('langflow', lf[0])]:.3f} / {times[('langflow', lf[-1])]:.3f}", "n/a",
                 f"{times[('ar', None)]:.3f}", "serving.json"])
  v = r.json("serve.json")
  mixed = {x["scheduler"]: x for x in v["rows"] if isinstance(x["steps"], list)}
  if {"stationary", "static"} <= set(mixed):
    a, b = mixed["stationary"], mixed["static"]
    rows.append([f"`langflow-jax serve`, {v['scheduler_concurrency']} clients, step counts "
                 f"{'/'.join(map(str, a['steps']))}: requests/s and p50 s, stationary against static batch",
                 f"{a['requests_per_s']:.2f} / {a['p50_s']:.1f} s against {b['requests_per_s']:.2f} / "
                 f"{b['p50_s']:.1f} s", "n/a", "n/a", "serve.json"])
  rows = [[*row[:-1], r.link(row[-1])] for row in rows]
  return table(["measured on a 2-core CPU", "LangFlow", "MDLM", "AR", "results file"], rows)


# --------------------------------------------------------------------------- transcripts


def transcript(r: Results, command_start: str) -> dict:
  runs = [x for x in r.json("transcripts.json")["runs"] if x["command"].startswith(command_start)]
  if not runs:
    raise KeyError(f"transcripts.json has no command starting with {command_start!r}")
  return runs[0]


def provenance(r: Results) -> str:
  t = r.json("transcripts.json")
  return (f"Recorded by `python experiments/record_transcripts.py` on {t['date']}, commit {t['commit']}; "
          f"{t['machine']}.")


@block("demo", "transcripts.json")
def demo(r: Results) -> str:
  """What `make demo` printed, its protocol card cut short (the likelihood page shows it whole) and its
  unconditional samples cut to the first."""
  lines, out, cut, more = transcript(r, "langflow-jax demo")["stdout"].splitlines(), [], None, 0
  for line in lines:
    if line.startswith("[demo] protocol card:"):
      cut, more = "card", 0
      out.append("[demo] protocol card: ... (in full in docs/likelihood.md)")
    elif line.startswith("[demo] ") and " samples (" in line:
      cut, more = "samples", -1
      out.append(line)
    elif cut and line.startswith("[demo]   "):
      more += 1
      if cut == "samples" and more == 0:
        out.append(line)
    else:
      if cut == "samples" and more > 0:
        out.append(f"[demo]   ... ({more} more)")
      cut = None
      out.append(line)
  return fenced("\n".join(out)) + "\n\n" + provenance(r)


@block("demo-eval", "transcripts.json")
def demo_eval(r: Results) -> str:
  """`langflow-jax eval`'s report of the demo model, rebuilt from the JSON it wrote."""
  from langflow_jax import evaluate

  d = r.json("transcripts.json")["demo_eval"]
  res = evaluate.EvalResult(
      nats_per_token=d["nats_per_token"], stderr=d["nats_per_token_stderr"], terms=d["terms_nats_per_token"],
      num_tokens=d["num_tokens"], num_sequences=d["num_sequences"], card=d["card"], seconds=d["seconds"],
      nats_per_token_vr=d["nats_per_token_vr"] if d["nats_per_token_vr"] is not None else math.nan,
      stderr_vr=d["nats_per_token_vr_stderr"] if d["nats_per_token_vr_stderr"] is not None else math.nan,
      reference=d["context_free_reference"], method=d["method"], measure=d["measure"], summary=d["summary"])
  return fenced(res.report()) + "\n\n" + provenance(r)


@block("sampling-transcript", "transcripts.json")
def sampling_transcript(r: Results) -> str:
  runs = [x for x in r.json("transcripts.json")["runs"] if not x["command"].startswith("langflow-jax demo")]
  text = "\n".join(f"$ {x['command']}\n{x['stdout'].rstrip()}" for x in runs)
  return fenced(text) + "\n\n" + provenance(r)


# --------------------------------------------------------------------------- the studies


@block("baselines", "baselines.json")
def baselines(r: Results) -> str:
  b = r.json("baselines.json")
  names = {"langflow": "LangFlow", "ar": "AR Transformer", "mdlm": "MDLM"}
  measured = {"langflow": f"ODE estimate, {bound_mode(b)} mode", "ar": "exact NLL", "mdlm": "NELBO"}
  rows = [[x.get("label") or names[m], f"{x['params'] / 1e6:.3f}M", num(x["nats_per_token"]),
           f"{math.exp(x['nats_per_token']):.1f}", x.get("measured_by") or measured[m], f"{x['gen_ppl']:.1f}",
           f"{x['entropy']:.2f}",
           x["nfe"], f"{x['tokens_per_s']:.0f}"] for m, x in b["results"].items()]
  ref = b["reference"]
  rows.append(["held-out text (reference)", "", "", "", "", f"{ref['gen_ppl']:.1f}", f"{ref['entropy']:.2f}", "", ""])
  return "\n\n".join([
      table(["model", "parameters", "held-out nats/token", "exp(nats/token)", "measured by", "Gen. PPL",
             "entropy", "NFE", "sampling tokens/s"], rows),
      f"{b['steps']} training steps each; protocol, standard errors and training speed in "
      f"{r.link('baselines.md')}. {bound_note(b)} {machine(b)}"])


@block("selfcond", "selfcond.json")
def selfcond(r: Results) -> str:
  s = r.json("selfcond.json")
  rows = [[name, num(x["bound"]), f"{math.exp(x['bound']):.1f}", f"{x['gen_ppl']:.1f}", f"{x['entropy']:.2f}"]
          for name, x in s["results"].items()]
  rows.append(["held-out text (reference)", "", "", f"{s['reference']['gen_ppl']:.1f}",
               f"{s['reference']['entropy']:.2f}"])
  return "\n\n".join([
      table(["model", f"held-out nats/token ({bound_mode(s)} mode)", "exp(nats/token)", "Gen. PPL (64 steps)",
             "entropy"], rows),
      f"{s['steps']} training steps each; standard errors and Gen. PPL at 16 and 32 steps in "
      f"{r.link('selfcond.md')}. {bound_note(s)} {machine(s)}"])


@block("schedule", "schedule.json")
def schedule(r: Results) -> str:
  s = r.json("schedule.json")
  names = {"langflow": "learned Gumbel", "langflow-linear": "linear", "langflow-cosine": "cosine"}
  rows = [[names.get(k, k), num(x["own_grid"]), f"{math.exp(x['own_grid']):.1f}", num(x["gamma_grid"]),
           f"{x['tv']:.2f}"] for k, x in s["results"].items()]
  return "\n\n".join([
      table(["schedule", f"held-out nats/token, own grid ({bound_mode(s)} mode)", "exp(nats/token)",
             "the same, uniform-gamma grid", "TV(density, dCE/dgamma)"], rows),
      f"{s['steps']} training steps each; the same held-out sequences, eps and probes for every model; standard "
      f"errors, terms and the fitted schedules in {r.link('schedule.md')}. {bound_note(s)} {machine(s)}"])


_ratio, _cell = harness.ratio_cell, harness.carried_cell


@block("known_entropy", "known_entropy.json")
def known_entropy(r: Results) -> str:
  """The ladder (and the ablations, once there are any) of exp_known_entropy.py, from its JSON."""
  k, names = r.json("known_entropy.json"), {"langflow": "LangFlow", "mdlm": "MDLM", "ar": "AR"}
  parts = []
  for corpus, res in k["results"].items():
    h, ladder = res["card"]["H"], res["ladder"]
    rungs = sorted({int(s) for per in ladder.values() for s in per})
    rows = [[names.get(m, m)] + [_cell(per.get(str(s)), "nats_per_token", h) for s in rungs]
            for m, per in ladder.items()]
    lf = ladder.get("langflow", {})
    if lf:
      rows.append(["LangFlow, official flow mode"] + [_ratio(lf.get(str(s), {}).get("flow_mode"), h) for s in rungs])
      rows.append(["context-free reference (exact)"] +
                  [_ratio(lf.get(str(s), {}).get("context_free_exact"), h) for s in rungs])
    parts += [f"**{corpus}** (H = {h:.4f} nats/token). Held-out nats/token (x H) at each training budget "
              "(steps of 32 x 64 tokens):",
              table(["model"] + [f"{s} steps" for s in rungs], rows)]
    if res.get("ablations"):
      arows = [[a["label"], a["steps"], _cell(a, "nats_per_token", h), _cell(a, "flow_mode", h),
                num(a.get("stderr"))] for a in res["ablations"].values()]
      parts += ["Ablations (one change each):",
                table(["variant", "steps", "held-out nats/token (x H)", "flow mode (x H)", "stderr"], arows)]
    for name, t in (res.get("tables") or {}).items():
      if t:
        parts += [k["notes"][name], table(t["headers"], t["rows"])]
  if any(row.get("carried") for res in k["results"].values()
         for per in [*res["ladder"].values(), res["ablations"]] for row in per.values()):
    parts.append(k.get("carried_note", "\\* carried over from an earlier invocation of the study."))
  p = k["protocol"]
  parts.append(f"LangFlow: {p['mode']} ODE bound, {p['solver']} {p['steps']}, variance-reduced, on the first "
               f"{p['num_batches']} x {p['batch_size']} held-out rows; MDLM: NELBO; AR: exact NLL. The study "
               f"writes {r.link('known_entropy.md')}. {machine(k)}")
  return "\n\n".join(parts)


@block("known_entropy_runs", "known_entropy_runs.json")
def known_entropy_runs(r: Results) -> str:
  k = r.json("known_entropy_runs.json")
  parts = []
  for corpus, h in k["H"].items():
    rows = []
    for row in (x for x in k["rows"] if x["corpus"] == corpus):
      if row["method"] == "langflow":
        mode = lambda m: row.get(m) or {}  # noqa: E731
        sc, ref = mode("sc_chain_rule"), mode("sc_chain_rule").get("reference")
        rows.append([row["label"], row["steps"], _ratio(sc.get("vr"), h) + f" ± {sc['vr_stderr']:.3f}",
                     _ratio(mode("flow").get("vr"), h), _ratio(mode("sde").get("vr"), h),
                     _ratio(ref["analytic"], h) if ref else "n/a"])
      else:
        rows.append([row["label"], row["steps"], f"NELBO {_ratio(row['nelbo_trainer_eval'], h)} (the trainer's held-out NELBO)", "", "", ""])
    parts += [f"**{corpus}** (H = {h:.4f} nats/token):",
              table(["model", "steps", "bound, sc_chain_rule (variance-reduced)", "official flow mode", "sde",
                     "context-free reference (exact)"], rows)]
  return "\n\n".join(parts)


# --------------------------------------------------------------------------- serving and scaling


@block("serving", "serving.json")
def serving(r: Results) -> str:
  s, rows = r.json("serving.json"), []
  for res in s["results"]:
    t = {(x["method"], x["steps"], x["batch"]): x for x in res["rows"]}
    lf = sorted({st for m, st, _ in t if m == "langflow"})
    batches = sorted({b for _, _, b in t})
    q = {x["steps"] if x["method"] == "langflow" else "ar": x for x in res["quality"]["samples"]}
    cross = res["crossover_steps"]
    sec = lambda x: ("~" if x["extrapolated"] else "") + f"{x['seconds']:.3f}"  # noqa: E731
    rows.append([res["length"], sec(t[("ar", None, 1)]), sec(t[("langflow", lf[0], 1)]),
                 sec(t[("langflow", lf[-1], 1)]),
                 " / ".join(f"{cross[str(b)]:.1f}" for b in batches),
                 f"{q[lf[0]]['gen_ppl_ar']:.0f} / {q[lf[-1]]['gen_ppl_ar']:.0f}", f"{q['ar']['gen_ppl_ar']:.0f}",
                 f"{res['quality']['heldout_text']['gen_ppl_ar']:.0f}"])
  m, a = s["meta"], s["args"]
  lf_steps = a["steps"]
  return "\n\n".join([
      table(["length", "AR s (batch 1)", f"LangFlow s, {lf_steps[0]} steps", f"LangFlow s, {lf_steps[-1]} steps",
             "break-even steps at batch " + " / ".join(map(str, a["batches"])),
             f"Gen. PPL under the AR scorer, LangFlow {lf_steps[0]} / {lf_steps[-1]} steps", "AR",
             "held-out text"], rows),
      f"`~`: from the fitted line, not measured. Written by `python experiments/bench_serving.py "
      f"{' '.join(m['argv'])}` on {m['date']} ({a['train_steps']} training steps a model); "
      f"{m['machine']['cpu_count']} CPU cores, jax {m['machine']['jax']}, load average {m['load_start']} at the "
      f"start. Every table: {r.link('serving.md')}."])


def distill_table(r: Results, shown: dict[str, tuple[int, ...]] | None = None, heldout_row: bool = True) -> str:
  """Teacher, students and AR: quality at a few step counts and time to the full output at the quality
  length (``shown``: the step counts of each model; default the teacher's 64 / 8 / 2, each student's 4 / 2 / 1)."""
  d = r.json("distill.json")
  length = d["args"]["quality_length"]
  timing = {row["batch"]: row for row in d["timing"] if row["length"] == length}
  batches = sorted(timing)
  sec = lambda x: ("~" if x["extrapolated"] else "") + f"{x['seconds']:.3f}"  # noqa: E731
  shown = shown or {"teacher": (64, 8, 2), **{k: (4, 2, 1) for k in d["results"] if k != "teacher"}}
  rows = []
  for label, steps in shown.items():
    q = d["results"][label]
    for n in steps:
      if str(n) in q:
        rows.append([label, n, f"{q[str(n)]['gen_ppl_ar']:.1f}", f"{q[str(n)]['gen_ppl_bigram']:.1f}",
                     f"{q[str(n)]['entropy']:.2f}", *[sec(timing[b]["langflow"][str(n)]) for b in batches]])
  ref = d["reference"]
  rows.append(["AR twin (KV cache)", length, "", "", "", *[f"{timing[b]['ar_seconds']:.3f}" for b in batches]])
  held = f"{ref['gen_ppl_ar']:.1f} / {ref['gen_ppl_bigram']:.1f} / {ref['entropy']:.2f}"
  if heldout_row:
    rows.append(["held-out text", "", *held.split(" / "), *["" for _ in batches]])
  cross = d["crossover_batch_2_steps"].get(str(length))
  faster = [timing[b]["langflow"]["2"]["seconds"] < timing[b]["ar_seconds"] for b in batches]
  if cross:
    where = f"2 steps stop beating AR at batch about {cross:.0f}"
  else:
    where = (f"2 steps {'beat' if all(faster) else 'lose to'} AR at every timed batch "
             f"({' and '.join(map(str, batches))})")
  return "\n\n".join([
      table(["model", "steps", "Gen. PPL (AR)", "Gen. PPL (bigram)", "entropy",
             *[f"s to {length} tokens, batch {b}" for b in batches]], rows),
      f"{where}. {'' if heldout_row else 'Held-out text: ' + held + '. '}`~`: from the fitted line. Every step "
      f"count, length 512 and the targets: {r.link('distill.md')}. {machine(d)}"])


@block("serve", "serve.json")
def serve(r: Results) -> str:
  """bench_serve's finding and tables, by the benchmark's own report (one formatter)."""
  import bench_serve

  d = r.json("serve.json")
  sections = bench_serve.report(d, argparse.Namespace(**d["args"]))
  body = sections[sections.index("## Finding") + 1:]
  return "\n\n".join([x.replace("## ", "**", 1) + "**" if x.startswith("## ") else x for x in body] +
                       [f"{r.link('serve.md')}, {r.link('serve.png')}. {machine(d)}"])


@block("serve-front", "serve.json")
def serve_front(r: Results) -> str:
  """The front page's cut of bench_serve: every server at one client; at the schedulers' concurrency the AR,
  LangFlow at its most steps and the two schedulers on mixed step counts."""
  d = r.json("serve.json")
  many, most = d["scheduler_concurrency"], max(d["args"]["steps"])
  rows = []
  for x in d["rows"]:
    mixed = isinstance(x["steps"], list)
    lone = x["concurrency"] == 1 and not mixed
    crowd = x["concurrency"] == many and (mixed or x["method"] != "langflow" or x["steps"] == most)
    if not (lone or crowd):
      continue
    steps = ("mix " + "/".join(map(str, x["steps"]))) if mixed else (x["steps"] or "-")
    rows.append([f"{x['method']} ({x.get('scheduler', 'stationary')})", steps, x["concurrency"], num(x["p50_s"]),
                 num(x["ttfe_p50_s"]), num(x["requests_per_s"], 2)])
  lib = ", ".join(f"{num(s)} s at {k} steps" for k, s in d["library_s"].items())
  return "\n\n".join([
      table(["server", "steps", "clients", "p50 s", "p50 first event s", "requests/s"], rows),
      f"Length {d['args']['length']}, {d['args']['slots']} slots, an event every {d['args']['stream_every']} "
      f"passes; one `sampling.sample` call of the same request: {lib}. Every concurrency and the targets: "
      f"{r.link('serve.md')}. {machine(d)}"])


@block("distill", "distill.json")
def distill(r: Results) -> str:
  return distill_table(r)


@block("distill-front", "distill.json")
def distill_front(r: Results) -> str:
  """The front page's cut: the teacher at 64 / 8 steps, the default method's student at 4 / 2 / 1."""
  from langflow_jax import config as config_lib

  return distill_table(r, {"teacher": (64, 8), f"{config_lib.base_config().distill.method} student": (4, 2, 1)},
                       heldout_row=False)


GIB = 1024 ** 3


@block("aot_memory", "aot_memory.json")
def aot_memory(r: Results) -> str:
  a = r.json("aot_memory.json")
  rows = [[x["config_name"], x["devices"], x["layout"], x["batch_per_device"], f"{x['state'] / GIB:.2f}",
           f"{x['temp'] / GIB:.2f}", f"{x['peak'] / GIB:.2f}"] for x in a["aot"]]
  return "\n\n".join([
      table(["config", "devices", "layout", "seq/device", "params + EMA + Adam", "temporaries", "peak"], rows),
      f"GiB per device, from `python experiments/bench_scaling.py --skip-throughput` (jax {a['jax']}, "
      f"{r.link('aot_memory.json')})."])


@block("aot_example", "aot_memory.json")
def aot_example(r: Results) -> str:
  """The owt row on 64 devices, pure FSDP, as `langflow-jax aot ... --memory-gb 80` prints it."""
  from langflow_jax import aot

  row = next(x for x in r.json("aot_memory.json")["aot"]
             if x["config_name"] == "owt" and x["devices"] == 64 and x["layout"] == "fsdp")
  fields = {f.name for f in dataclasses.fields(aot.MemoryReport)}
  report = aot.MemoryReport(**{k: v for k, v in row.items() if k in fields})
  return fenced(report.format(80)) + "\n\n" + f"(the owt / 64 / fsdp row of {r.link('aot_memory.json')})"


@block("scaling_throughput", "scaling_throughput.json")
def scaling_throughput(r: Results) -> str:
  s = r.json("scaling_throughput.json")
  rows = [[x["layout"], x["devices"], f"{x['tokens_per_s']:.0f}", f"{x['step_s']:.2f}",
           f"{x['overhead_vs_one_device']:.2f}x"] for x in s["throughput"]]
  return "\n\n".join([
      table(["layout", "devices", "tokens/s", "seconds per step", "step time vs 1 device"], rows),
      f"`{s['config']}` config, jax {s['jax']}; {r.link('scaling_throughput.json')}, the command and machine in "
      f"{r.link('bench_scaling.txt')}."])


# Benchmarks that print text: their last output, as recorded.
for _name in ("bench_train.txt", "bench_sampling.txt", "bench_likelihood.txt", "bench_input.txt"):
  block(_name, _name)(lambda r, _n=_name: fenced(r.text(_n)) + f"\n\n({r.link(_n)})")


# --------------------------------------------------------------------------- the config reference


# Keys whose line in base_config carries no comment.
KEY_NOTES = {
    "model.vocab_size": "token ids (50257: GPT-2; 30522: bert-base-uncased)",
    "model.hidden_size": "width D", "model.cond_dim": "width of the noise-level embedding",
    "model.n_blocks": "transformer blocks", "model.n_heads": "attention heads (must split hidden_size evenly)",
    "model.mlp_ratio": "MLP width / D", "model.max_length": "the longest sequence the model takes", "model.dropout": "dropout rate in training",
    "model.self_conditioning": "the self-conditioning input (method §3.1)",
    "schedule.loc": "Gumbel location (initial value when learned)", "schedule.scale": "Gumbel scale",
    "schedule.entropy": "H_inf, the CE plateau at infinite noise (initial value)",
    "schedule.cutoff": "quantile margin of the endpoints", "schedule.gamma_min": "clean end (unset: from the schedule)",
    "schedule.gamma_max": "noisy end (unset: from the schedule)",
    "objective.self_cond_prob": "share of steps that train the self-conditioning input",
    "train.steps": "training steps", "train.seed": "initialisation and noise seed",
    "train.log_every": "steps between metric lines", "train.eval_every": "steps between held-out evaluations",
    "train.eval_batches": "held-out batches per evaluation", "train.checkpoint_every": "steps between checkpoints",
    "optimizer.lr": "peak learning rate", "optimizer.warmup_steps": "linear warm-up",
    "optimizer.b1": "AdamW beta1", "optimizer.b2": "AdamW beta2", "optimizer.eps": "AdamW epsilon",
    "optimizer.weight_decay": "AdamW weight decay", "optimizer.grad_clip": "global-norm clip (0: off)",
    "optimizer.ema_decay": "EMA of the weights (eval and sample use it)",
    "mesh.data": "data-parallel axis (-1: the remaining devices)",
    "mesh.fsdp": "batch axis with parameters sharded over D", "mesh.tensor": "heads, MLP width, vocabulary",
    "data.seq_len": "tokens per row (at most model.max_length)",
    "data.prefetch_threads": "grain reader threads", "eval.atol": "adaptive solver tolerances",
    "eval.batch_size": "sequences per batch (must divide by data x fsdp)", "eval.split": "split to evaluate",
    "eval.use_ema": "EMA weights (false: raw)", "sample.num": "samples to draw",
    "sample.use_ema": "EMA weights (false: raw)", "sample.seed": "sampler seed",
}


def config_comments() -> dict[str, str]:
  """The comment beside each key of config.base_config (with its continuation lines)."""
  from langflow_jax import config as config_lib

  notes, group, key = {}, None, None
  for line in inspect.getsource(config_lib.base_config).splitlines():
    if m := re.match(r"\s*c\.(\w+) = ml_collections\.ConfigDict\(dict\((.*)$", line):
      group, key = m.group(1), None
      for k in re.findall(r"(\w+)=", m.group(2)):  # one-line groups (mesh)
        notes[f"{group}.{k}"] = ""
    elif group and (m := re.match(r"\s+(\w+)=(.*)$", line)):
      key = f"{group}.{m.group(1)}"
      notes[key] = m.group(2).split("  #", 1)[1].strip().lstrip("# ") if "  #" in m.group(2) else ""
    elif key and (m := re.match(r"\s{8,}#\s?(.*)$", line)):
      notes[key] = f"{notes[key]} {m.group(1).strip()}".strip()
    elif line.strip().startswith("#") or not line.strip():
      key = None
  return notes


def _note(key: str, comment: str) -> str:
  """The key's comment (``[name]`` first: the official code's name for it), else its line in KEY_NOTES."""
  m = re.match(r"\[(\w+)\]:?\s*(.*)$", comment)
  if m:
    return f"{m.group(2) or KEY_NOTES.get(key, '')} (official name: `{m.group(1)}`)".strip()
  return comment or KEY_NOTES.get(key, "")


def _default(v: Any) -> str:
  return "unset" if v is None else f"`{v!r}`" if not isinstance(v, str) else (f"`{v}`" if v else '`""`')


@block("settings")
def settings(_: Results) -> str:
  from langflow_jax import config as config_lib

  base, notes = config_lib.base_config(), config_comments()
  keys = [*notes, *(f"{g}.{k}" for g, group in base.items() for k in group if f"{g}.{k}" not in notes)]
  rows = [[f"`{key}`", _default(base[key.split(".")[0]][key.split(".")[1]]), _note(key, notes.get(key, ""))]
          for key in keys]  # in base_config's order
  return table(["key", "default (base config)", "what it sets"], rows)


# --------------------------------------------------------------------------- writing and checking


def render_page(text: str, results: Results, page: pathlib.Path = ROOT / "README.md") -> str:
  results.prefix = "" if page.parent == ROOT else os.path.relpath(ROOT, page.parent) + "/"

  def fill(m: re.Match) -> str:
    if m.group("name") not in BLOCKS:
      raise KeyError(f"unknown generated block {m.group('kind')}:{m.group('name')} (known: {sorted(BLOCKS)})")
    body = BLOCKS[m.group("name")].render(results).rstrip()
    return f"<!-- {m.group('kind')}:{m.group('name')} -->\n{body}\n<!-- /{m.group('kind')}:{m.group('name')} -->"
  return MARKER.sub(fill, text)


def stale_blocks(paths, results: Results) -> list[str]:
  """``page: block`` for every block whose text is not what the renderer makes of ``results``."""
  out = []
  for path in paths:
    text = path.read_text(encoding="utf-8")
    rendered = render_page(text, results, path)
    if rendered != text:
      new = {m.group("name"): m.group(0) for m in MARKER.finditer(rendered)}
      out += [f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {m.group('name')}"
              for m in MARKER.finditer(text) if new.get(m.group("name")) != m.group(0)]
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
  parser.add_argument("--results", type=pathlib.Path, default=RESULTS)
  args = parser.parse_args(argv)
  results = Results(args.results)
  if args.check:
    stale = stale_blocks(pages(), results)
    print("\n".join(f"stale: {s}" for s in stale) or "every generated block is current")
    return 1 if stale else 0
  for path in pages():
    text = path.read_text(encoding="utf-8")
    new = render_page(text, results, path)
    if new != text:
      path.write_text(new, encoding="utf-8")
      print(f"wrote {path.relative_to(ROOT)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
