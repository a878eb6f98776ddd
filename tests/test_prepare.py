"""Preparation: detokenizers, the corpus catalog's readers, packing to disk, the CLI."""

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from langflow_jax import cli
from langflow_jax.config import base_config
from langflow_jax.data import catalog, detokenize, pipeline, prepare
from langflow_jax.data.tokenizer import BERT_VOCAB_ENV, load_tokenizer
from langflow_jax.errors import ConfigError, DataError

L = 16  # short rows keep the files tiny


@pytest.fixture(scope="module")
def gpt2():
  return load_tokenizer("gpt2")


# ----------------------------------------------------------------------------- detokenizers


@pytest.mark.parametrize("name, raw, clean", [
    # the first line keeps its leading space: no rule strips it
    ("wikitext", " = Heading = \n The 1 @,@ 000 km @-@ long road ( built in 1900 ) isn 't \" new \" . \n",
     " = Heading =\nThe 1,000 km-long road (built in 1900) isn 't \"new\".\n"),
    ("wikitext", " = = Section = = \n", " == Section ==\n"),
    # "s ' " and " n't" both fire on "investors ' n't" (an upstream quirk)
    ("ptb", " the company 's shares rose N N to $ N a share <unk> \n investors ' n't \\/ ",
     " the company's shares rose 1 1 to $1 a share ?\ninvestors'n't / "),
    # " % ." stays: the full-stop rule wants a word character before it
    ("lm1b", "He said : \" I do n't know , it 's 5 % . \" See http : / / x.com / a .",
     "He said: \"I do n't know, it's 5 % .\" See http://x.com/a."),
    ("lm1b", "Why ( really ) ? Costs $ 5 or £ 3 !", "Why (really)? Costs $5 or £3!"),
    ("lambada", "  “Hi,” she said  ", "\n\"Hi,\" she said"),
    ("scientific_papers", "results ( see fig . 1 ) @xmath0 , as shown .",
     "results (see fig. 1) @xmath0, as shown."),
])
def test_detokenizers(name, raw, clean):
  assert detokenize.DETOKENIZERS[name](raw) == clean


# ----------------------------------------------------------------------------- packing


def test_group_bounds_follow_datasets_contiguous_shards_and_map_batches():
  assert prepare.group_bounds(10, 0, 1) == [(0, 10)]
  # 3 shards of 4, 3, 3 documents, each cut into batches of 3 from its own start
  assert prepare.group_bounds(10, 3, 3) == [(0, 3), (3, 4), (4, 7), (7, 10)]
  assert prepare.group_bounds(2, 1000, 16) == [(0, 1), (1, 2)]


def test_official_grouping_drops_the_remainder_per_group(gpt2):
  docs = catalog.ListDocuments(["one two three four five six seven"] * 7)
  per_doc = len(gpt2.encode(docs.docs[0])) + 1  # with its EOS
  stream = prepare.Recipe("x", "gpt2", seq_len=per_doc * 2 + 1)  # chunks of 2 documents minus 1 token
  rows = lambda recipe: sum(len(b[0]) for b in prepare.packed_batches(docs, None, gpt2, recipe))
  assert rows(stream) == (7 * per_doc) // (2 * per_doc - 1)
  grouped = dataclasses.replace(stream, group_docs=3, group_shards=1)  # groups of 3, 3, 1 documents
  assert rows(grouped) == 2 * ((3 * per_doc) // (2 * per_doc - 1)) + 0


def test_wrap_without_eos_and_padded_rows_shapes(gpt2):
  docs = catalog.ListDocuments(["alpha beta", "gamma", "delta epsilon zeta"])
  toks = gpt2.encode_batch(docs.docs)
  no_eos = dataclasses.replace(prepare.Recipe("x", "gpt2", seq_len=4), insert_eos=False)
  (ids, lengths, n_docs, n_tok), = prepare.packed_batches(docs, None, gpt2, no_eos)
  body = np.concatenate(toks)
  np.testing.assert_array_equal(ids[:, 1:3].reshape(-1), body[: len(ids) * 2])
  assert lengths is None and (ids[:, 0] == 50256).all() and (ids[:, -1] == 50256).all() and n_docs == 3
  padded = prepare.Recipe("x", "gpt2", seq_len=5, wrap=False)
  (ids, lengths, _, _), = prepare.packed_batches(docs, None, gpt2, padded)
  assert ids.shape == (3, 5)
  np.testing.assert_array_equal(lengths, [min(len(t), 3) + 2 for t in toks])
  assert (ids[0, lengths[0]:] == gpt2.pad_id).all() and gpt2.pad_id == 50257  # [PAD] is beyond V


# ----------------------------------------------------------------------------- corpora from local files


def expected_stream(tok, texts, detok):
  clean = [detokenize.DETOKENIZERS[detok](t) if detok else t for t in texts]
  return np.concatenate([np.array(tok.encode(t) + [tok.eos_id]) for t in clean])


def check_rows(directory, split, tok, texts, detok, seq_len=L):
  packed, manifest = prepare.open_split(directory, split)
  body = np.asarray(packed.ids)[:, 1:-1].reshape(-1)
  want = expected_stream(tok, texts, detok)
  assert len(body) == len(want) // (seq_len - 2) * (seq_len - 2) > 0
  np.testing.assert_array_equal(body, want[: len(body)])
  assert (np.asarray(packed.ids)[:, [0, -1]] == tok.eos_id).all()
  assert manifest["documents"] == len(texts) and manifest["detokenizer"] == detok
  return manifest


def write_parquet(path, **columns):
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.table(columns), path)


SENTENCES = [f"the {w} 's price rose N % , did n't it ? ( yes ) " for w in ("stock", "bond", "fund", "coin")] * 3


@pytest.mark.parametrize("name, layout", [
    ("ptb", "txt"), ("ptb", "parquet"), ("wikitext2", "raw"), ("wikitext103", "parquet"), ("lambada", "jsonl"),
    ("ag_news", "parquet"), ("pubmed", "parquet"), ("arxiv", "jsonl"),
])
def test_zero_shot_sets_from_their_published_files(tmp_path, gpt2, name, layout):
  corpus = catalog.CORPORA[name]
  published = corpus.splits["heldout"]
  texts = [s.replace("N", str(i)) for i, s in enumerate(SENTENCES)]
  if layout == "txt":  # ptb.valid.txt: one sentence per line, stripped by the loader
    (tmp_path / "ptb.valid.txt").write_text("".join(f" {t}\n" for t in texts))
    (tmp_path / "ptb.train.txt").write_text(" not this one\n")
    texts = [t.strip() for t in texts]
  elif layout == "raw":  # wiki.valid.raw: lines keep their newline, blank lines are empty documents
    lines = [f" = Title {i} = \n" if i % 4 == 0 else ("" if i % 4 == 1 else f" {t}\n") for i, t in enumerate(texts)]
    (tmp_path / "wiki.valid.raw").write_text("".join(line or "\n" for line in lines))
    texts = lines
  elif layout == "parquet":
    labels = lambda n: {"label": list(range(n))} if name == "ag_news" else {}
    write_parquet(tmp_path / "data" / f"{published}-00000-of-00001.parquet", **{corpus.field: texts},
                  **labels(len(texts)))
    write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", **{corpus.field: ["not this one"]}, **labels(1))
  else:
    stem = "lambada_test" if name == "lambada" else "val"
    (tmp_path / f"{stem}.jsonl").write_text("\n".join(json.dumps({corpus.field: t, "id": 1}) for t in texts))
  result = prepare.prepare_named(name, tmp_path / "out", seq_len=L, local=str(tmp_path))
  assert list(result["splits"]) == ["heldout"]  # zero-shot sets: the evaluation split only
  check_rows(result["directory"], "heldout", gpt2, texts, corpus.detokenizer)
  assert f"{name}-gpt2-L{L}-wrap" in result["directory"]


def test_owt_jsonl_and_parquet_hold_out_the_tail(tmp_path, gpt2, monkeypatch):
  monkeypatch.setitem(catalog.CORPORA, "owt", dataclasses.replace(catalog.CORPORA["owt"], heldout_tail=3))
  texts = [f"Web page number {i}. It has a few sentences of text, and one more." for i in range(9)]
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "urlsf_subset00.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts[:5]))
  write_parquet(tmp_path / "a" / "urlsf_subset01.parquet", text=texts[5:])
  result = prepare.prepare_named("owt", tmp_path / "out", seq_len=L, local=str(tmp_path / "a"))
  check_rows(result["directory"], "train", gpt2, texts[:6], None)
  check_rows(result["directory"], "heldout", gpt2, texts[6:], None)


def test_hf_datasets_route_reads_a_hub_layout_and_save_to_disk(tmp_path, gpt2):
  import datasets

  texts = [f" The valley @-@ floor is {i} @,@ 000 m wide . \n" for i in range(12)]
  repo = tmp_path / "wikitext"  # the hub repository's layout, with its dataset card configs
  write_parquet(repo / "wikitext-2-raw-v1" / "validation-00000-of-00001.parquet", text=texts)
  write_parquet(repo / "wikitext-103-raw-v1" / "validation-00000-of-00001.parquet", text=["wrong config"] * 3)
  (repo / "README.md").write_text(
      "---\nconfigs:\n" + "".join(
          f"- config_name: {c}\n  data_files:\n  - split: validation\n    path: {c}/validation-*.parquet\n"
          for c in ("wikitext-2-raw-v1", "wikitext-103-raw-v1")) + "---\n")
  result = prepare.prepare_named("wikitext2", tmp_path / "out", seq_len=L, hf_path=str(repo))
  check_rows(result["directory"], "heldout", gpt2, texts, "wikitext")
  saved = tmp_path / "saved"
  datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(saved))
  again = prepare.prepare_named("wikitext2", tmp_path / "out2", seq_len=L, local=str(saved))
  np.testing.assert_array_equal(prepare.open_split(again["directory"], "heldout")[0].ids,
                                prepare.open_split(result["directory"], "heldout")[0].ids)


def lm1b_tarball(root):
  top = root / "1-billion-word-language-modeling-benchmark-r13output"
  train = top / "training-monolingual.tokenized.shuffled"
  held = top / "heldout-monolingual.tokenized.shuffled"
  train.mkdir(parents=True)
  held.mkdir(parents=True)
  (train / "news.en-00001-of-00100").write_text("".join(f"Train sentence {i} , it 's fine .\n" for i in range(30)))
  sentences = [f"The cat did n't sit on mat {i} ." for i in range(20)]
  (held / "news.en.heldout-00000-of-00050").write_text("".join(s + "\n" for s in sentences))
  return sentences


def test_lm1b_through_tfds_array_record_without_tensorflow(tmp_path, gpt2):
  sentences = lm1b_tarball(tmp_path / "raw")
  result = prepare.prepare_named("lm1b-gpt2", tmp_path / "out", seq_len=L, local=str(tmp_path / "raw"))
  assert (tmp_path / "raw" / "tfds" / "lm1b" / "1.1.0").is_dir()  # built by the TF-free builder
  packed, manifest = prepare.open_split(result["directory"], "heldout")
  assert manifest["documents"] == 20 and manifest["detokenizer"] == "lm1b"
  # TFDS shuffles at write time, so compare the multiset of sentences
  text = gpt2.decode(np.asarray(packed.ids)[:, 1:-1].reshape(-1))
  pieces = [p for p in text.split("<|endoftext|>") if p]
  # complete sentences between separators are the detokenized ones (" 3 ." -> " 3.")
  assert set(pieces[1:-1]) <= {detokenize.lm1b(s) for s in sentences} and len(pieces) >= 10
  assert all(p.endswith(".") and not p.endswith(" .") for p in pieces[1:-1])


def test_lm1b_with_mock_tfds_and_the_bert_protocol(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds

  vocab = [*"[PAD] [UNK] [CLS] [SEP] [MASK]".split(), *"abcdefghij", *[f"##{c}" for c in "abcdefghij"]]
  (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
  monkeypatch.setenv(BERT_VOCAB_ENV, str(tmp_path / "vocab.txt"))
  with tfds.testing.mock_data(num_examples=40):
    result = prepare.prepare_named("lm1b", tmp_path / "out", splits=["heldout"], seq_len=L)
  packed, manifest = prepare.open_split(result["directory"], "heldout")
  cls = vocab.index("[CLS]")
  assert manifest["tokenizer"]["bos_id"] == manifest["tokenizer"]["eos_id"] == cls
  ids = np.asarray(packed.ids)
  assert (ids[:, 0] == cls).all() and (ids[:, -1] == cls).all() and not (ids == vocab.index("[SEP]")).any()
  assert (ids[:, 1:-1] == cls).sum() > 0  # sentences separated by [CLS] inside rows
  assert "lm1b-bert-base-uncased-L16-wrap" in result["directory"] and manifest["documents"] == 40


# ----------------------------------------------------------------------------- prepared:DIR and the CLI


def test_cli_prepare_then_train_config_reads_prepared_dir(tmp_path, capsys, gpt2):
  corpus = tmp_path / "mine.parquet"
  docs = [f"My note {i}: remember the milk, and {i} eggs." for i in range(20)]
  write_parquet(corpus, text=docs)
  assert cli.main(["prepare", f"file:{corpus}", "--out", str(tmp_path / "data"), "--tokenizer", "gpt2",
                   "--seq-len", str(L), "--holdout-every", "5"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert set(result["splits"]) == {"train", "heldout"} and result["splits"]["heldout"]["documents"] == 4
  cfg = base_config().data
  cfg.update(name=f"prepared:{result['directory']}", tokenizer="gpt2", seq_len=L)
  train = pipeline.load_split(cfg, "train", gpt2)
  check_rows(result["directory"], "train", gpt2, [d for i, d in enumerate(docs) if (i + 1) % 5], None)
  assert isinstance(train.ids, np.memmap) and train.seq_len == L
  cfg.seq_len = 32
  with pytest.raises(ConfigError, match="prepared with seq_len=16"):
    pipeline.load_split(cfg, "train")
  cfg.seq_len = L
  with pytest.raises(ConfigError, match="tokenized with 'gpt2'"):
    pipeline.load_split(cfg, "train", load_tokenizer("sotu-bpe8k"))
  (tmp_path / "data" / pathlib_name(result) / "heldout.json").unlink()  # an interrupted preparation
  with pytest.raises(DataError, match="no complete prepared 'heldout' split"):
    pipeline.load_split(cfg, "heldout")
  assert cli.main(["prepare", "ptb", "--out", str(tmp_path / "x"), "--from", str(tmp_path / "nowhere")]) == 2
  assert "does not exist" in capsys.readouterr().err


def pathlib_name(result):
  return result["directory"].rsplit("/", 1)[-1]
