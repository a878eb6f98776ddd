"""bench: the benchmark size (experiments/bench_*.py), on the embedded corpus.

  python experiments/bench_train.py

vocab 8192, width 512, 8 heads, 6 blocks, cond 128, length 128, batch 16.
"""

from langflow_jax.config import base_config


def get_config():
  c = base_config()
  c.model.update(vocab_size=8192, hidden_size=512, cond_dim=128, n_blocks=6, n_heads=8, max_length=128)
  c.schedule.update(loc=4.0, scale=0.85, entropy=7.0)
  c.data.update(name="sotu", tokenizer="sotu-bpe8k", seq_len=128)
  c.train.update(steps=1000, batch_size=16, log_every=10, eval_every=500, checkpoint_every=500)
  c.optimizer.update(lr=1e-3, warmup_steps=100, ema_decay=0.999)
  return c
