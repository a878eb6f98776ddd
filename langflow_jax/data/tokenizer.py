"""Tokenizers behind one interface, all loaded offline.

``load_tokenizer(name)``:

* ``sotu-bpe8k``: the byte-level BPE (8,192 tokens) trained on the embedded
  corpus's training split and shipped in ``data/assets`` (the ``tiny`` config).
* ``PATH.json``: any Hugging Face ``tokenizers`` JSON file.

Further protocols (GPT-2 BPE, BERT WordPiece) register themselves in
``TOKENIZERS``.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Protocol, Sequence

from langflow_jax.errors import DataError

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


class Tokenizer(Protocol):
  name: str
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int | None

  def encode(self, text: str) -> list[int]: ...

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass
class HFTokenizer:
  """A Hugging Face ``tokenizers`` model; BOS and EOS are the same separator."""

  name: str
  path: pathlib.Path

  def __post_init__(self):
    from tokenizers import Tokenizer as _Tokenizer

    try:
      self._tok = _Tokenizer.from_file(str(self.path))
    except Exception as e:
      raise DataError(f"cannot read tokenizer file {self.path} ({e}).",
                      "pass a valid tokenizers JSON file, or one of the named tokenizers.") from e
    self.vocab_size = self._tok.get_vocab_size()
    eos = self._tok.token_to_id(EOS_TOKEN)
    if eos is None:
      raise DataError(f"tokenizer {self.path} has no {EOS_TOKEN} token.",
                      f"train it with {EOS_TOKEN} as a special token.")
    self.eos_id = self.bos_id = eos
    self.pad_id = self._tok.token_to_id(PAD_TOKEN)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _embedded_bpe() -> Tokenizer:
  path = ASSETS / "sotu_bpe8k.json"
  if not path.is_file():
    raise DataError(f"the embedded tokenizer {path} is missing.",
                    "reinstall langflow-jax from the repository (the file ships with it).")
  return HFTokenizer("sotu-bpe8k", path)


TOKENIZERS: dict[str, Callable[[], Tokenizer]] = {
    "sotu-bpe8k": _embedded_bpe,
}


def load_tokenizer(name: str) -> Tokenizer:
  """A tokenizer by registered name, or from a tokenizers ``.json`` path."""
  if name in TOKENIZERS:
    return TOKENIZERS[name]()
  path = pathlib.Path(name)
  if path.suffix == ".json":
    if not path.is_file():
      raise DataError(f"tokenizer file {path} does not exist.", "check the path in --config.data.tokenizer.")
    return HFTokenizer(path.stem, path)
  raise DataError(f"unknown tokenizer '{name}'.",
                  f"use one of {sorted(TOKENIZERS)} or the path of a tokenizers .json file.")


_PROBE_TEXT = "The Congress shall have Power; 1790, \u201cquoted\u201d -- caf\u00e9 \u00fcber \u65e5\u672c 42.5%"


def fingerprint(tokenizer: Tokenizer) -> str:
  """A short hash of the vocabulary (every id's text) and the special ids.

  Two tokenizers with the same fingerprint map text to the same ids, so a
  checkpoint records it and refuses a tokenizer with a different one.
  """
  import hashlib

  h = hashlib.sha256()
  h.update(repr((tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)).encode())
  for i in range(tokenizer.vocab_size):
    h.update(tokenizer.decode([i]).encode("utf-8", "surrogatepass") + b"\x00")
  h.update(repr(tokenizer.encode(_PROBE_TEXT)).encode())
  return h.hexdigest()[:16]


def train_bpe(texts: Sequence[str], vocab_size: int, out_path: pathlib.Path) -> HFTokenizer:
  """Trains a byte-level BPE with EOS and PAD specials and saves it as JSON."""
  from tokenizers import ByteLevelBPETokenizer

  tok = ByteLevelBPETokenizer()
  tok.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=2,
                          special_tokens=[EOS_TOKEN, PAD_TOKEN], show_progress=False)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  tok.save(str(out_path))
  return HFTokenizer(out_path.stem, out_path)
