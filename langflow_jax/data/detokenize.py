"""Detokenizers: undo the spacing of pre-tokenized corpora before BPE/WordPiece.

LM1B, WikiText, PTB and the scientific-papers corpora are distributed with
their punctuation split off by spaces (``don 't``, ``1 @,@ 000``, ``( a )``).
The official pipeline (MDLM/Duo ``dataloader.py``, method §5.5) rewrites each
document with a dataset-specific set of string rules before tokenizing; the
zero-shot numbers depend on them, so they are reproduced rule for rule here,
quirks included (e.g. WikiText's ``/' [0-9]/`` rule matches literal slashes
and so almost never fires). OWT and AG News use none.

Each detokenizer is an ordered list of rules; a rule is ``(kind, old, new)``
with ``kind`` ``"str"`` (plain replacement) or ``"re"`` (``re.sub``).
"""

from __future__ import annotations

import re
from typing import Callable

Rule = tuple[str, str, str]

_WIKITEXT: list[Rule] = [
    ("str", "s '", "s'"),                       # plural possessives
    ("re", r"/' [0-9]/", r"/'[0-9]/"),          # (literal slashes, as upstream)
    ("str", " @-@ ", "-"),                       # number/compound separators
    ("str", " @,@ ", ","),
    ("str", " @.@ ", "."),
    *[("str", f" {p} ", f"{p} ") for p in ":;.!?,"],
    ("re", r"\(\s*([^\)]*?)\s*\)", r"(\1)"),    # inner spacing of brackets and quotes
    ("re", r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    ("re", r"{\s*([^}]*?)\s*}", r"{\1}"),
    ("re", r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    ("re", r"'\s*([^']*?)\s*'", r"'\1'"),
    ("str", "= = = =", "===="),                  # section markers
    ("str", "= = =", "==="),
    ("str", "= =", "=="),
    ("str", " \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    ("str", " \n", "\n"),
    ("str", "\n ", "\n"),
    ("str", " N ", " 1 "),
    ("str", " 's", "'s"),
]

_PTB: list[Rule] = [
    ("str", " 's", "'s"),
    ("str", "s ' ", "s' "),
    ("str", " n't", "n't"),
    ("str", " \n ", "\n"),
    ("str", "\\/", "/"),
    # PTB writes every number as N; upstream replaces " N " ten times over
    # (each pass only catches every other one of adjacent Ns).
    *[("str", " N ", " 1 ")] * 10,
    ("str", "$ 1", "$1"),
    ("str", "# 1", "#1"),
    ("str", "<unk>", "?"),
]

_LM1B: list[Rule] = [
    ("str", "http : / / ", "http://"),
    ("str", "https : / / ", "https://"),
    ("re", r" '(\w+)", r"'\1"),                 # clitics: " 's" -> "'s"
    ("re", r" (\w+) \. ", r" \1. "),            # sentence-internal and final full stops
    ("re", r" (\w+) \.$", r" \1."),
    ("str", " ? ", "? "),
    ("re", r" \?$", "?"),
    ("str", " ! ", "! "),
    ("re", r" \!$", "!"),
    ("str", " , ", ", "),
    ("str", " : ", ": "),
    ("str", " ; ", "; "),
    ("str", " / ", "/"),
    ("re", r"\" ([^\"]+) \"", r'"\1"'),         # inner spacing of quotes and brackets
    ("re", r"' ([^']+) '", r"'\1'"),
    ("re", r"\( ([^\(\)]+) \)", r"(\1)"),
    ("re", r"\[ ([^\[\]]+) \]", r"[\1]"),
    ("str", "$ ", "$"),
    ("str", "\N{POUND SIGN} ", "\N{POUND SIGN}"),
]


def _compile(rules: list[Rule]) -> Callable[[str], str]:
  steps = [(kind, re.compile(old) if kind == "re" else old, new) for kind, old, new in rules]

  def apply(text: str) -> str:
    for kind, old, new in steps:
      text = old.sub(new, text) if kind == "re" else text.replace(old, new)
    return text

  return apply


wikitext = _compile(_WIKITEXT)
ptb = _compile(_PTB)
lm1b = _compile(_LM1B)


def lambada(text: str) -> str:
  """Straight quotes, and every passage starts on a new line (as upstream)."""
  return "\n" + text.replace("\N{LEFT DOUBLE QUOTATION MARK}", '"').replace(
      "\N{RIGHT DOUBLE QUOTATION MARK}", '"').strip()


def scientific_papers(text: str) -> str:
  """PubMed/ArXiv articles: the WikiText rules, then the LM1B rules."""
  return lm1b(wikitext(text))


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": wikitext,
    "ptb": ptb,
    "lm1b": lm1b,
    "lambada": lambada,
    "scientific_papers": scientific_papers,
}
