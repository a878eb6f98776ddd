"""serving: the model pair of the serving benchmark (experiments/bench_serving.py).

  python experiments/bench_serving.py                       # trains both, then measures
  langflow-jax train --config serving:512 --workdir runs/bench_serving/langflow_L512
  langflow-jax train --config serving:512 --config.objective.name=ar --workdir runs/bench_serving/ar_L512

The ``tiny`` backbone (2 blocks of width 128, 4 heads, the embedded 8k BPE)
at sequence length L (the argument, default 512): a 2-core CPU can time it at
batch 64 and train it in minutes. Every model sees 2048 tokens a step
(batch 2048 / L) for 300 steps (614k tokens), so the pairs of all lengths get
the same token budget. The LangFlow and its AR twin share every key but
``objective.name``; the AR model has fewer weights (no noise conditioning).
"""

from langflow_jax.config import load_config

TOKENS_PER_STEP = 2048


def get_config(length: str = "512"):
  c = load_config("tiny")
  seq_len = int(length)
  c.model.max_length = seq_len
  c.data.seq_len = seq_len
  c.objective.skip_warmup_steps = 50
  c.train.update(steps=300, batch_size=max(1, TOKENS_PER_STEP // seq_len), log_every=25, eval_every=300,
                 eval_batches=4, checkpoint_every=50, plot=False)
  c.optimizer.update(warmup_steps=25)
  c.eval.update(steps=16, batch_size=max(1, 4096 // seq_len), num_batches=1, plot_steps=(4, 8, 16))
  c.sample.update(seq_len=seq_len)
  return c
