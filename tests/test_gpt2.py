"""GPT-2 in NNX: HF-layout loading, the forward against a plain numpy GPT-2, the scorer.

No reference output of Hugging Face's own GPT-2 is available offline; the
forward is checked against an independent numpy transcription of the
architecture on random weights saved in the HF layout.
"""

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from langflow_jax import genppl, gpt2, metrics
from langflow_jax.config import base_config
from langflow_jax.errors import CheckpointError

CFG = gpt2.GPT2Config(vocab_size=300, n_positions=16, n_embd=16, n_layer=2, n_head=2)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  from tokenizers import ByteLevelBPETokenizer

  d = tmp_path_factory.mktemp("gpt2")
  model = gpt2.GPT2(CFG, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # random LayerNorms and biases too
    var.set_value(var[...] + 0.1 * rng.standard_normal(var.shape, np.float32))
  gpt2.save_hf(model, d)
  tok = ByteLevelBPETokenizer()
  tok.train_from_iterator(["the state of the union is strong"] * 20, vocab_size=300, show_progress=False)
  tok.save_model(str(d))  # vocab.json + merges.txt
  return d


def numpy_gpt2(t: dict, ids: np.ndarray, n_head: int) -> np.ndarray:
  def ln(x, p):
    m, v = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-5) * t[p + ".weight"] + t[p + ".bias"]

  def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

  b, l = ids.shape
  x = t["wte.weight"][ids] + t["wpe.weight"][:l]
  i = 0
  while f"h.{i}.ln_1.weight" in t:
    p = f"h.{i}."
    a = ln(x, p + "ln_1") @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]
    q, k, v = np.split(a, 3, -1)
    d = q.shape[-1] // n_head
    q, k, v = (m.reshape(b, l, n_head, d).transpose(0, 2, 1, 3) for m in (q, k, v))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + np.triu(np.full((l, l), -1e30), 1)
    w = np.exp(s - s.max(-1, keepdims=True))
    o = (w / w.sum(-1, keepdims=True)) @ v
    x = x + o.transpose(0, 2, 1, 3).reshape(b, l, -1) @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
    h = gelu(ln(x, p + "ln_2") @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"])
    x = x + h @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"]
    i += 1
  return ln(x, "ln_f") @ t["wte.weight"].T


def test_forward_matches_numpy_and_is_causal(hf_dir):
  model, _ = gpt2.load_gpt2(hf_dir)
  tensors = {k: v.astype(np.float64) for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
  ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12))
  ours = np.asarray(model(ids))
  ref = numpy_gpt2(tensors, ids, CFG.n_head)
  assert np.max(np.abs(ours - ref)) <= 1e-5 * np.max(np.abs(ref))
  changed = ids.copy()
  changed[:, 7] = (changed[:, 7] + 1) % CFG.vocab_size
  after = np.asarray(model(changed))
  np.testing.assert_array_equal(after[:, :7], ours[:, :7])
  assert np.max(np.abs(after[:, 7:] - ours[:, 7:])) > 1e-4


def test_loader_accepts_hf_variants_and_rejects_incomplete(hf_dir, tmp_path):
  tensors = load_file(str(hf_dir / "model.safetensors"))
  variant = {f"transformer.{k}": v for k, v in tensors.items()}
  variant["lm_head.weight"] = tensors["wte.weight"]
  variant["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
  for name in ("config.json", "vocab.json", "merges.txt"):
    (tmp_path / name).write_bytes((hf_dir / name).read_bytes())
  save_file(variant, str(tmp_path / "model.safetensors"))
  a, _ = gpt2.load_gpt2(tmp_path)
  b, _ = gpt2.load_gpt2(hf_dir)
  ids = np.arange(10)[None]
  np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))
  del variant["transformer.h.1.mlp.c_fc.bias"]
  save_file(variant, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match="lacks 1 tensors"):
    gpt2.load_gpt2(tmp_path)


def test_gpt2_scorer_retokenizes_and_scores(hf_dir):
  config = base_config()
  config.data.tokenizer = "sotu-bpe8k"
  scorer, description = genppl.SCORER_LOADERS["gpt2"](str(hf_dir), config)
  assert "GPT-2" in description
  from langflow_jax.data.tokenizer import load_tokenizer

  generator = load_tokenizer("sotu-bpe8k")
  samples = [generator.encode("the state of the union"), generator.encode("the union is strong and the state")]
  result = metrics.generative_perplexity(samples, scorer, retokenize=scorer.retokenize)
  model, tok = gpt2.load_gpt2(hf_dir)
  total, count = 0.0, 0
  for s in samples:
    ids = np.asarray(tok.encode(generator.decode(s)).ids)[:16]
    logits = np.asarray(model(ids[None]))[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    total -= sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1))
    count += len(ids) - 1
  assert result["scored_tokens"] == count
  assert result["nll_per_token"] == pytest.approx(total / count, rel=1e-5)
