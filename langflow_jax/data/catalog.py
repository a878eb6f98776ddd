"""The paper's corpora by name: where their raw documents come from.

``CORPORA`` lists LM1B and OpenWebText (training) and the zero-shot suite
(method §5.5, §7.3) with the split each protocol evaluates on, the text field, the
detokenizer and the tokenizer and length of the protocol. Raw documents are
read, in this order of preference:

* from local files given with ``--from PATH`` / ``data.path``: parquet, JSON
  lines or text (one document per line) in the layout the corpus is published
  in, split by file name (``train``, ``valid``/``validation``, ``test``), or a
  ``datasets.save_to_disk`` directory; for LM1B, the extracted
  ``1-billion-word-language-modeling-benchmark-r13output`` directory;
* LM1B: through ``tfds.data_source`` (array_record, random access, no
  TensorFlow). :class:`Lm1bBuilder` builds that array_record copy without
  TensorFlow: the stock TFDS builder needs TF only for one ``tf.io.gfile.glob``;
* everything else: through Hugging Face ``datasets`` (the ``data`` extra), from
  the hub with internet or from its local cache (``HF_DATASETS_OFFLINE=1``).

A corpus yields a :class:`Documents` per split: a sized collection read in
order, in batches, so a 40 GB corpus is never held in memory.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import re
from typing import Iterator, Protocol, Sequence

from langflow_jax.data.sources import jsonl_field
from langflow_jax.errors import DataError


class Documents(Protocol):
  """Raw documents of one split, in a fixed order."""

  def __len__(self) -> int: ...

  def batches(self, start: int, stop: int, size: int) -> Iterator[list[str]]:
    """Documents ``start..stop-1`` in lists of at most ``size``."""
    ...


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass
class ListDocuments:
  """Documents in memory (the embedded corpus, small files)."""

  docs: Sequence[str]

  def __len__(self) -> int:
    return len(self.docs)

  def batches(self, start, stop, size):
    for a in range(start, stop, size):
      yield list(self.docs[a:min(a + size, stop)])


@dataclasses.dataclass
class RecordDocuments:
  """A random-access source of records (``tfds.data_source``, HF ``Dataset``)."""

  source: object
  field: str

  def __len__(self) -> int:
    return len(self.source)

  def batches(self, start, stop, size):
    for a in range(start, stop, size):
      b = min(a + size, stop)
      if hasattr(self.source, "column_names"):  # HF Dataset: a column slice is one Arrow read
        yield [_text(t) for t in self.source[a:b][self.field]]
      else:
        yield [_text(r[self.field]) for r in self._records(list(range(a, b)))]

  def _records(self, keys: list[int]) -> list:
    try:
      return self.source.__getitems__(keys)  # one batched array_record read
    except TypeError:  # tfds.testing.mock_data's sources take items one at a time
      return [self.source[k] for k in keys]


@dataclasses.dataclass
class Slice:
  """Documents ``start..stop-1`` of another collection (OWT's held-out tail)."""

  base: Documents
  start: int
  stop: int

  def __len__(self) -> int:
    return self.stop - self.start

  def batches(self, start, stop, size):
    return self.base.batches(self.start + start, self.start + stop, size)


@dataclasses.dataclass
class FileDocuments:
  """Documents in local files, read in order: parquet or JSON-lines records
  (``field``) or text files with one document per line."""

  files: list[pathlib.Path]
  field: str
  keep_newlines: bool = False    # text lines: WikiText's rows keep their "\n" (blank ones are "")

  def __post_init__(self):
    self._counts = [self._count(f) for f in self.files]

  def _count(self, path: pathlib.Path) -> int:
    if path.suffix == ".parquet":
      import pyarrow.parquet as pq

      meta = pq.ParquetFile(path)
      if self.field not in meta.schema_arrow.names:
        raise DataError(f"{path} has no column '{self.field}' (columns: {meta.schema_arrow.names}).",
                        "pass the corpus's own files, which carry that column.")
      return meta.metadata.num_rows
    with open(path, "rb") as f:
      return sum(1 for line in f if line.strip() or path.suffix in _TEXT_SUFFIXES)

  def __len__(self) -> int:
    return sum(self._counts)

  def _records(self, path: pathlib.Path) -> Iterator[str]:
    if path.suffix == ".parquet":
      import pyarrow.parquet as pq

      for batch in pq.ParquetFile(path).iter_batches(columns=[self.field], batch_size=4096):
        yield from (_text(t) if t is not None else "" for t in batch.column(0).to_pylist())
    elif path.suffix in _TEXT_SUFFIXES:
      # One document per line, blank lines included (as the published loaders
      # do): stripped (PTB's 'sentence'), or with the newline kept (WikiText).
      with open(path, encoding="utf-8") as f:
        for line in f:
          yield (line if line.strip() else "") if self.keep_newlines else line.strip()
    else:
      with open(path, encoding="utf-8") as f:
        yield from map(_text, jsonl_field(f, path, self.field, "pass the corpus's own files."))

  def batches(self, start, stop, size):
    stream = itertools.islice(itertools.chain.from_iterable(self._records(f) for f in self.files), start, stop)
    while batch := list(itertools.islice(stream, size)):
      yield batch


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A public corpus and the protocol the paper evaluates it with."""

  name: str
  reader: str                    # tfds | hf | json_url
  path: str                      # TFDS name, HF dataset id, or URL
  config: str | None             # HF configuration
  splits: dict[str, str]         # our split (train / heldout) -> published split
  field: str                     # the text column
  detokenizer: str | None        # a name in detokenize.DETOKENIZERS
  tokenizer: str                 # the protocol's tokenizer
  seq_len: int                   # and length
  heldout_tail: int = 0          # held out = the last N documents of the published split
  keep_newlines: bool = False    # local text files: keep each line's newline (WikiText)
  about: str = ""

  @property
  def zero_shot(self) -> bool:
    """Evaluation-only corpora: prepared for their held-out split by default."""
    return self.about.startswith(_ZERO_SHOT)


_ZERO_SHOT = "zero-shot (OWT model, GPT-2, L=1024)"
CORPORA: dict[str, Corpus] = {c.name: c for c in [
    Corpus("lm1b", "tfds", "lm1b", None, {"train": "train", "heldout": "test"}, "text", "lm1b",
           "bert-base-uncased", 128, about="One Billion Words, sentences; LM1B model (bert-base-uncased, L=128)"),
    Corpus("owt", "hf", "Skylion007/openwebtext", None, {"train": "train", "heldout": "train"}, "text", None,
           "gpt2", 1024, heldout_tail=100_000,
           about="OpenWebText; the last 100,000 documents are held out (openwebtext-split)"),
    Corpus("lm1b-gpt2", "tfds", "lm1b", None, {"train": "train", "heldout": "test"}, "text", "lm1b",
           "gpt2", 1024, about=_ZERO_SHOT),
    Corpus("ptb", "hf", "ptb_text_only", None, {"train": "train", "heldout": "validation"}, "sentence", "ptb",
           "gpt2", 1024, about=_ZERO_SHOT),
    Corpus("wikitext2", "hf", "Salesforce/wikitext", "wikitext-2-raw-v1",
           {"train": "train", "heldout": "validation"}, "text", "wikitext", "gpt2", 1024, keep_newlines=True,
           about=_ZERO_SHOT),
    Corpus("wikitext103", "hf", "Salesforce/wikitext", "wikitext-103-raw-v1",
           {"train": "train", "heldout": "validation"}, "text", "wikitext", "gpt2", 1024, keep_newlines=True,
           about=_ZERO_SHOT),
    Corpus("lambada", "json_url", "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
           None, {"heldout": "test"}, "text", "lambada", "gpt2", 1024, about=_ZERO_SHOT + "; OpenAI's test file"),
    Corpus("ag_news", "hf", "fancyzhx/ag_news", None, {"train": "train", "heldout": "test"}, "text", None,
           "gpt2", 1024, about=_ZERO_SHOT),
    Corpus("pubmed", "hf", "armanc/scientific_papers", "pubmed", {"train": "train", "heldout": "validation"},
           "article", "scientific_papers", "gpt2", 1024, about=_ZERO_SHOT),
    Corpus("arxiv", "hf", "armanc/scientific_papers", "arxiv", {"train": "train", "heldout": "validation"},
           "article", "scientific_papers", "gpt2", 1024, about=_ZERO_SHOT),
]}

_SPLIT_WORDS = {"train": ("train",), "validation": ("val", "valid", "validation", "dev"), "test": ("test",)}
_TEXT_SUFFIXES = (".txt", ".raw")  # .raw: WikiText's wiki.valid.raw
_SUFFIXES = (".parquet", ".jsonl", ".json", *_TEXT_SUFFIXES)


def _files_for(root: pathlib.Path, published: str, single: bool) -> list[pathlib.Path]:
  """Files under ``root`` holding the ``published`` split (all of them when the
  corpus has a single published split)."""
  if root.is_file():
    return [root]
  files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _SUFFIXES)
  if single:
    return files
  words = _SPLIT_WORDS.get(published, (published,))
  return [p for p in files if set(re.split(r"[-._]", p.name.lower())) & set(words)]


def local_documents(corpus: Corpus, split: str, root: pathlib.Path) -> Documents:
  """The ``split`` of ``corpus`` from local files under ``root``."""
  root = root.expanduser()
  if not root.exists():
    raise DataError(f"local data path {root} does not exist.", "check --from / --config.data.path.")
  published = corpus.splits[split]
  if root.is_dir() and ((root / "dataset_dict.json").is_file() or (root / "state.json").is_file()):
    datasets = _import_datasets()
    saved = datasets.load_from_disk(str(root))
    return RecordDocuments(saved[published] if hasattr(saved, "keys") else saved, corpus.field)
  if corpus.reader == "tfds":
    return _tfds_documents(corpus, published, source_dir=root)
  single = len(set(corpus.splits.values())) == 1
  files = _files_for(root, published, single)
  if not files:
    words = "/".join(_SPLIT_WORDS.get(published, (published,)))
    raise DataError(f"no {'/'.join(_SUFFIXES)} file for the '{published}' split of {corpus.name} under {root}.",
                    f"pass a file, or a directory whose file names contain '{words}'.")
  return FileDocuments(files, corpus.field, corpus.keep_newlines)


def _import_datasets():
  try:
    import datasets
  except ImportError as e:
    raise DataError("reading this corpus needs Hugging Face `datasets`, which is not installed.",
                    "`pip install 'langflow-jax[data]'`, or pass local files with --from.") from e
  return datasets


def _hf_documents(corpus: Corpus, published: str, path: str | None, revision: str | None) -> Documents:
  datasets = _import_datasets()
  try:
    if corpus.reader == "json_url":
      ds = datasets.load_dataset("json", data_files=path or corpus.path, split="train")
    else:
      ds = datasets.load_dataset(path or corpus.path, corpus.config, split=published, revision=revision)
  except Exception as e:  # hub, network, cache and format errors all end here
    raise DataError(f"cannot load {corpus.name} ({path or corpus.path}, {published}) with datasets: "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                    "prepare it on a machine with internet (`langflow-jax prepare ...`), pass local files with "
                    "--from, or name a parquet copy with --hf-path / --hf-revision refs/convert/parquet.") from e
  if corpus.field not in ds.column_names:
    raise DataError(f"{corpus.name} from {path or corpus.path} has no column '{corpus.field}' "
                    f"(columns: {ds.column_names}).", "name a copy of the corpus with its original columns.")
  return RecordDocuments(ds, corpus.field)


def _lm1b_builder_class():
  import tensorflow_datasets as tfds
  from etils import epath
  from tensorflow_datasets.datasets.lm1b import lm1b_dataset_builder as stock

  class Lm1bBuilder(stock.Builder, skip_registration=True):
    """TFDS's ``lm1b`` without TensorFlow: same name, version, features and
    metadata, so ``tfds.data_source('lm1b')`` reads what it writes; it globs
    with ``epath`` and can start from an already extracted tarball."""

    name = "lm1b"

    def __init__(self, *, source_dir: str | None = None, **kwargs):
      self._source_dir = source_dir
      super().__init__(**kwargs)

    @classmethod
    def _get_pkg_dir_path(cls):
      return stock.Builder._get_pkg_dir_path()  # the stock README, citation and checksums

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # the stock module's (TFDS's own lookup needs importlib_resources)
      return epath.Path(stock.__file__)

    def _split_generators(self, dl_manager):
      if self._source_dir:
        root = epath.Path(self._source_dir)
        if not (root / stock._TOP_LEVEL_DIR).exists() and root.name == stock._TOP_LEVEL_DIR:
          root = root.parent
      else:
        root = epath.Path(dl_manager.download_and_extract(stock._DOWNLOAD_URL))

      def files(pattern):
        return sorted(str(p) for p in root.glob(pattern))

      train, test = files(stock._TRAIN_FILE_FORMAT), files(stock._HELDOUT_FILE_FORMAT)
      if not test:
        raise DataError(f"no LM1B heldout files ({stock._HELDOUT_FILE_FORMAT}) under {root}.",
                        f"pass the directory that holds {stock._TOP_LEVEL_DIR}/.")
      return [tfds.core.SplitGenerator(name=tfds.Split.TRAIN, gen_kwargs={"files": train}),
              tfds.core.SplitGenerator(name=tfds.Split.TEST, gen_kwargs={"files": test})]

  return Lm1bBuilder


def build_lm1b(data_dir: str | None, source_dir: str | None = None) -> None:
  """Writes TFDS ``lm1b`` as array_record under ``data_dir`` (downloads the
  1.7 GB tarball unless ``source_dir`` holds it extracted)."""
  builder = _lm1b_builder_class()(source_dir=source_dir, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()


def _tfds_documents(corpus: Corpus, published: str, *, source_dir: pathlib.Path | None = None,
                    data_dir: str | None = None) -> Documents:
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DataError(f"{corpus.name} is read through tensorflow-datasets, which is not installed.",
                    "`pip install 'langflow-jax[data]'` (TensorFlow itself is not needed).") from e
  if source_dir is not None:  # an extracted tarball: build the array_record copy next to it
    data_dir = str(source_dir / "tfds") if source_dir.is_dir() else None
    build_lm1b(data_dir, str(source_dir))
  try:
    source = tfds.data_source(corpus.path, split=published, data_dir=data_dir)
  except Exception as e:  # not built yet, or built as tfrecord
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    raise DataError(f"TFDS {corpus.path} ({published}) is not available as array_record in {where} "
                    f"({type(e).__name__}).",
                    "run `langflow-jax prepare lm1b --out DIR` once with internet (it builds it without "
                    "TensorFlow), or pass the extracted tarball with --from.") from e
  return RecordDocuments(source, corpus.field)


def documents(corpus: Corpus, split: str, *, local: str | None = None, hf_path: str | None = None,
              hf_revision: str | None = None, tfds_dir: str | None = None) -> Documents:
  """The raw documents of ``split`` (``train`` or ``heldout``) of ``corpus``."""
  if split not in corpus.splits:
    raise DataError(f"{corpus.name} has no '{split}' split for this protocol.",
                    f"use one of {sorted(corpus.splits)}.")
  published = corpus.splits[split]
  if local:
    docs = local_documents(corpus, split, pathlib.Path(local))
  elif corpus.reader == "tfds":
    try:
      docs = _tfds_documents(corpus, published, data_dir=tfds_dir)
    except DataError as missing:
      try:  # first use on a machine with internet: download and build it (no TensorFlow)
        build_lm1b(tfds_dir)
      except Exception as e:
        raise missing from e
      docs = _tfds_documents(corpus, published, data_dir=tfds_dir)
  else:
    docs = _hf_documents(corpus, published, hf_path, hf_revision)
  if corpus.heldout_tail:
    n, tail = len(docs), corpus.heldout_tail
    if n <= tail:
      raise DataError(f"{corpus.name} has {n} documents, not more than the {tail} held out.",
                      "pass the whole corpus.")
    return Slice(docs, n - tail, n) if split == "heldout" else Slice(docs, 0, n - tail)
  return docs
