"""Corpora of known entropy: Markov chains over token ids or over made-up words.

A model's likelihood is only meaningful next to the truth, and on real text
the truth is unknown. Here it is exact:

* ``MarkovChain``: K states, a sparse random transition matrix (each state
  has ``branching`` successors with Dirichlet weights). Its entropy rate h and
  stationary distribution pi are closed forms; a row of L tokens drawn from pi
  then the chain has entropy H(pi) + (L - 1) h, so the best any model can do
  on such rows is ``row_entropy_per_token(L)`` nats per token.
* ``token_corpus``: rows of chain states written straight into a prepared
  directory (``data.name=prepared:DIR``) with a word-level tokenizer whose
  token ``s<k>`` is state k (plus the separator, which never occurs).
* ``word_corpus``: documents of chain "words" (made-up strings) written as
  text for the ordinary tokenizer pipeline; the exact entropy per token is
  the documents' entropy over their token count (tokenization is invertible).
* ``posterior_logits``: the exact posterior of each position's token given
  Gaussian observations of every position (forward-backward), i.e. the
  Bayes-optimal denoiser of LangFlow's forward process for this chain
  (``oracles.MarkovDenoiser`` wraps it in the model's interface).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from langflow_jax.data import prepare
from langflow_jax.data.tokenizer import EOS_TOKEN, load_tokenizer

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MarkovChain:
  """A first-order chain over ``num_states`` states; ``transition[i, j] = P(j | i)``."""

  transition: np.ndarray  # [K, K] float64, rows sum to 1

  @property
  def num_states(self) -> int:
    return int(self.transition.shape[0])

  @property
  def stationary(self) -> np.ndarray:
    evals, evecs = np.linalg.eig(self.transition.T)
    pi = np.abs(np.real(evecs[:, np.argmin(np.abs(evals - 1.0))]))
    return pi / pi.sum()

  @property
  def entropy_rate(self) -> float:
    """h = -sum_i pi_i sum_j P_ij log P_ij, nats per step."""
    p = self.transition
    with np.errstate(divide="ignore", invalid="ignore"):
      plogp = np.where(p > 0, p * np.log(p), 0.0)
    return float(-np.sum(self.stationary[:, None] * plogp))

  @property
  def unigram_entropy(self) -> float:
    pi = self.stationary
    return float(-np.sum(pi[pi > 0] * np.log(pi[pi > 0])))

  def row_entropy_per_token(self, length: int) -> float:
    """Exact entropy per token of a row of ``length`` tokens started from pi."""
    return (self.unigram_entropy + (length - 1) * self.entropy_rate) / length

  def sample(self, rng: np.random.Generator, rows: int, length: int) -> np.ndarray:
    """[rows, length] int32 states, the first of each row drawn from pi."""
    cum = np.cumsum(self.transition, axis=1)
    x = np.zeros((rows, length), np.int32)
    x[:, 0] = rng.choice(self.num_states, size=rows, p=self.stationary)
    for t in range(1, length):
      u = rng.random(rows)[:, None]
      x[:, t] = np.minimum(np.sum(cum[x[:, t - 1]] <= u, axis=1), self.num_states - 1)
    return x


def random_chain(num_states: int, branching: int, seed: int, concentration: float = 1.0) -> MarkovChain:
  """Each state moves to ``branching`` random successors with Dirichlet(concentration) weights.

  The successors of state i always include i + 1 (mod K), so the chain is
  irreducible and has a unique stationary distribution.
  """
  if not 1 <= branching <= num_states:
    raise ValueError(f"branching={branching} must lie in [1, num_states={num_states}]")
  rng = np.random.default_rng(seed)
  p = np.zeros((num_states, num_states))
  for i in range(num_states):
    others = [j for j in range(num_states) if j != (i + 1) % num_states]
    succ = [(i + 1) % num_states, *rng.choice(others, size=branching - 1, replace=False)]
    p[i, succ] = rng.dirichlet(np.full(branching, concentration))
  return MarkovChain(p)


# --------------------------------------------------------------------------- corpora


def state_token(k: int) -> str:
  return f"s{k}"


def write_state_tokenizer(path: pathlib.Path, num_states: int) -> pathlib.Path:
  """A word-level tokenizers JSON: id 0 is the separator, id k + 1 is state k."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {EOS_TOKEN: 0, **{state_token(k): k + 1 for k in range(num_states)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens([EOS_TOKEN])
  path.parent.mkdir(parents=True, exist_ok=True)
  tok.save(str(path))
  return path


def token_corpus(out: str | pathlib.Path, chain: MarkovChain, seq_len: int, train_rows: int, heldout_rows: int,
                 seed: int = 0) -> dict:
  """Writes chain rows (token id = state + 1) as a prepared directory with its tokenizer.

  Returns the corpus card: ``data`` overrides to train on it and the exact
  entropies. Rows are independent draws, each started from pi.
  """
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tok_path = write_state_tokenizer(out / "tokenizer.json", chain.num_states)
  tokenizer = load_tokenizer(str(tok_path))
  recipe = prepare.Recipe(source=f"markov:{out.name}", tokenizer=str(tok_path), seq_len=seq_len, wrap=True)
  rng = np.random.default_rng(seed)
  for split, rows in (("train", train_rows), ("heldout", heldout_rows)):
    ids = chain.sample(rng, rows, seq_len) + 1
    prepare.write_split(out, split, iter([(ids, None, rows, ids.size)]), recipe, tokenizer, None, rows)
  return {"kind": "token ids", "states": chain.num_states, "vocab_size": chain.num_states + 1, "seq_len": seq_len,
          "entropy_rate": chain.entropy_rate, "unigram_entropy": chain.unigram_entropy,
          "entropy_per_token": chain.row_entropy_per_token(seq_len),
          "data": {"name": f"prepared:{out}", "tokenizer": str(tok_path), "seq_len": seq_len}}


def made_up_words(num_words: int, seed: int) -> list[str]:
  """Distinct pronounceable strings (consonant-vowel syllables), 1-3 syllables each."""
  rng = np.random.default_rng(seed)
  consonants, vowels = "bdfgklmnprstvz", "aeiou"
  words: list[str] = []
  while len(words) < num_words:
    syllables = rng.integers(1, 4)
    w = "".join(rng.choice(list(consonants)) + rng.choice(list(vowels)) for _ in range(syllables))
    if w not in words:
      words.append(w)
  return words


def word_documents(chain: MarkovChain, words: list[str], docs: int, words_per_doc: int,
                   rng: np.random.Generator) -> list[str]:
  states = chain.sample(rng, docs, words_per_doc)
  return [" ".join(words[s] for s in row) for row in states]


def word_corpus(out: str | pathlib.Path, chain: MarkovChain, words_per_doc: int, train_docs: int,
                heldout_docs: int, tokenizer, seed: int = 0) -> dict:
  """Writes documents of chain words to ``out/corpus.jsonl`` (every 10th held out, as ``file:``).

  The exact entropy per token counts the separator the packer appends to
  every document (it carries no information): E[H(doc)] / E[tokens(doc) + 1],
  with H(doc) = H(pi) + (n - 1) h and the token count measured by ``tokenizer``.
  """
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  words = made_up_words(chain.num_states, seed)
  rng = np.random.default_rng(seed)
  total = train_docs + heldout_docs
  docs = word_documents(chain, words, total, words_per_doc, rng)
  path = out / "corpus.jsonl"
  # file: corpora hold out every 10th document; order the documents so that the
  # held-out share is heldout_docs / total whatever the split rule picks.
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  tokens = np.array([len(t) for t in tokenizer.encode_batch(docs)], np.float64)
  doc_entropy = chain.unigram_entropy + (words_per_doc - 1) * chain.entropy_rate
  per_token = doc_entropy / float(np.mean(tokens + 1.0))
  return {"kind": "words as text", "states": chain.num_states, "words": words, "words_per_doc": words_per_doc,
          "mean_tokens_per_doc": float(np.mean(tokens)), "entropy_rate_per_word": chain.entropy_rate,
          "entropy_per_token": per_token, "data": {"name": f"file:{path}"}}


# --------------------------------------------------------------------------- exact posterior


def posterior_logits(obs_loglik_BxLxK: Array, log_transition_KxK: Array, log_initial_K: Array) -> Array:
  """log p(x_i = k | all observations) per position, by forward-backward in log space.

  ``obs_loglik_BxLxK[b, i, k]`` is log p(obs_i | x_i = k) up to a constant per
  (b, i). Returns normalised log marginals, float32.
  """
  ll = jnp.swapaxes(obs_loglik_BxLxK.astype(jnp.float32), 0, 1)  # [L, B, K]
  log_p = log_transition_KxK.astype(jnp.float32)

  def forward(prev_BxK, ll_BxK):
    cur = jax.nn.logsumexp(prev_BxK[:, :, None] + log_p[None], axis=1) + ll_BxK
    cur = cur - jax.nn.logsumexp(cur, axis=-1, keepdims=True)
    return cur, cur

  first = log_initial_K[None].astype(jnp.float32) + ll[0]
  first = first - jax.nn.logsumexp(first, axis=-1, keepdims=True)
  _, alphas = jax.lax.scan(forward, first, ll[1:])
  alphas = jnp.concatenate([first[None], alphas], axis=0)  # [L, B, K]

  def backward(next_BxK, ll_BxK):
    cur = jax.nn.logsumexp(log_p[None] + (ll_BxK + next_BxK)[:, None, :], axis=2)
    cur = cur - jax.nn.logsumexp(cur, axis=-1, keepdims=True)
    return cur, cur

  last = jnp.zeros_like(ll[0])
  _, betas = jax.lax.scan(backward, last, ll[1:], reverse=True)
  betas = jnp.concatenate([betas, last[None]], axis=0)
  post = alphas + betas
  post = post - jax.nn.logsumexp(post, axis=-1, keepdims=True)
  return jnp.swapaxes(post, 0, 1)


def log_chain_parameters(chain: MarkovChain, offset: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The chain's log transition matrix and log pi over a ``vocab_size`` vocabulary
  in which state k is token k + offset (other tokens impossible: -1e9)."""
  neg = -1e9
  log_t = np.full((vocab_size, vocab_size), neg, np.float32)
  log_pi = np.full((vocab_size,), neg, np.float32)
  k = chain.num_states
  with np.errstate(divide="ignore"):
    log_t[offset:offset + k, offset:offset + k] = np.where(chain.transition > 0, np.log(chain.transition), neg)
    log_pi[offset:offset + k] = np.log(np.maximum(chain.stationary, 1e-300))
  # rows of impossible tokens: uniform over the chain (never used, keeps logsumexp finite)
  log_t[:offset, offset:offset + k] = -math.log(k)
  log_t[offset + k:, offset:offset + k] = -math.log(k)
  return log_t, log_pi

