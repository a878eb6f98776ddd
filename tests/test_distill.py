"""Few-step students (distillation.py, methods.DistillMethod, distill.py, `langflow-jax distill`).

The objective's target against a hand-computed teacher step, a toy student that
learns to match its teacher's two-jump output in one jump, and the command line
end to end on a saved tiny teacher. No timing is asserted.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from langflow_jax import checkpoint as ckpt_lib
from langflow_jax import cli, diffusion, distillation, methods, sampling, serve, train
from tests.conftest import fresh_and_random_models, small_config


def toy_config(vocab: int = 24, length: int = 8):
  c = small_config(vocab_size=vocab, max_length=length)
  c.data.seq_len = length
  return c


def toy_models(seed: int = 0):
  """A toy teacher with random weights (every logit informative) and the student started from it."""
  _, teacher = fresh_and_random_models(toy_config(), seed)
  graphdef, state = nnx.split(teacher)
  return teacher, nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def np_ddim(z, x, g_t, g_s):
  """z_s = alpha_s x + (sigma_s / sigma_t)(z_t - alpha_t x), by hand in float64."""
  a = lambda g: np.sqrt(1 / (1 + np.exp(g)))
  s = lambda g: np.sqrt(1 / (1 + np.exp(-g)))
  return a(g_s) * x + s(g_s) / s(g_t) * (z - a(g_t) * x)


def test_jump_target_is_the_teachers_prediction_after_one_hand_computed_step():
  teacher, _ = toy_models()
  ids = jax.random.randint(jax.random.PRNGKey(1), (3, 8), 0, 24)
  eps = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 32))
  u_t, u_s = jnp.full((3,), 0.7, jnp.float32), jnp.full((3,), 0.3, jnp.float32)

  @jax.jit
  def run():
    z = diffusion.add_noise(teacher.embed(ids), jnp.full((3,), 3.0), eps)
    s = jnp.zeros_like(z)
    g_t, g_m, g_s = (teacher.schedule.icdf(u) for u in (u_t, (u_t + u_s) / 2, u_s))
    x1 = teacher.denoise(teacher(z, g_t, s))
    one = distillation.teacher_solve(teacher, z, s, u_t, u_s, substeps=1)
    two = distillation.teacher_solve(teacher, z, s, u_t, u_s, substeps=2)
    return z, g_t, g_m, g_s, x1, one, two, distillation.jump_target(one, z, g_t, g_s)

  z, g_t, g_m, g_s, x1, one, two, target = (np.asarray(a, np.float64) for a in run())
  col = lambda g: g[:, None, None]
  np.testing.assert_allclose(one, np_ddim(z, x1, col(g_t), col(g_s)), rtol=1e-4, atol=1e-5)
  # one teacher step is a DDIM jump with the teacher's x_hat: that x_hat is the student's target
  np.testing.assert_allclose(target, x1, rtol=1e-3, atol=1e-3)
  # two steps: the midpoint in the CDF, the first prediction fed back as self-conditioning
  z_m = np_ddim(z, x1, col(g_t), col(g_m))
  x2 = np.asarray(jax.jit(lambda z, g, s: teacher.denoise(teacher(z, g, s)))(
      jnp.asarray(z_m, jnp.float32), jnp.asarray(g_m, jnp.float32), jnp.asarray(x1, jnp.float32)))
  np.testing.assert_allclose(two, np_ddim(z_m, x2, col(g_m), col(g_s)), rtol=1e-4, atol=1e-4)


def test_grids_of_the_two_methods():
  c = toy_config().distill
  c.update(method="flowmap", steps=(1, 2, 4, 8), teacher_steps=64)
  assert distillation.jump_grids(c) == (distillation.JumpGrid(1, 64), distillation.JumpGrid(3, 22),
                                        distillation.JumpGrid(7, 10))
  c.method = "progressive"
  assert distillation.progressive_rounds(c) == [32, 16, 8, 4, 2, 1]
  c.round = 2
  assert distillation.jump_grids(c) == (distillation.JumpGrid(8, 2),)


def test_a_distilled_toy_student_matches_the_teachers_two_jumps_closer_than_before():
  """One jump (2 sampler steps) trained against two teacher jumps (3 steps) from the same noise."""
  teacher, student = toy_models()
  grids = (distillation.JumpGrid(1, 2),)
  tx = optax.adam(3e-3)
  graphdef, params, rest = nnx.split(student, nnx.Param, ...)
  opt = tx.init(params)
  ids = jax.random.randint(jax.random.PRNGKey(3), (16, 8), 0, 24)
  mask = jnp.ones_like(ids, bool)

  @jax.jit
  def step(params, opt, key):
    def loss(p):
      out = distillation.distill_objective(nnx.merge(graphdef, p, rest), teacher, ids, mask, key, grids=grids)
      return out.terms.distill_sum / out.terms.num_tokens
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, value

  def gap(model):
    noise = jax.random.normal(jax.random.PRNGKey(9), (16, 8, 32))
    one = sampling.sample(model, jax.random.PRNGKey(0), sampling.SamplerOptions(steps=2), init_noise=noise)
    two = sampling.sample(teacher, jax.random.PRNGKey(0), sampling.SamplerOptions(steps=3), init_noise=noise)
    return float(jnp.mean(jnp.square(one.final_z_BxLxD - two.final_z_BxLxD)))

  before = gap(student)
  losses = []
  for i in range(40):
    params, opt, value = step(params, opt, jax.random.PRNGKey(100 + i))
    losses.append(float(value))
  after = gap(nnx.merge(graphdef, params, rest))
  assert np.mean(losses[-10:]) < np.mean(losses[:10])
  assert after < 0.9 * before, (before, after)  # 0.129 -> 0.109 here: a random toy teacher is hard to match


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
  """Saved fresh runs of a 20-token WordPiece vocabulary: a LangFlow teacher and an AR run (no training
  needed: a student only needs a teacher to read)."""
  root = tmp_path_factory.mktemp("teachers")
  words = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", ".",
           ",", "##s", "a", "dog", "ran", "to", "big", "red"]
  (root / "vocab.txt").write_text("\n".join(words) + "\n")
  (root / "corpus.txt").write_text("the cat sat on the mat. a big red dog ran to the cats.\n\n" * 40)
  for name in ("langflow", "ar"):
    c = small_config(vocab_size=len(words), max_length=16)
    c.data.update(name=f"file:{root / 'corpus.txt'}", tokenizer=str(root / "vocab.txt"), seq_len=16)
    c.objective.name = name
    tx = train.make_optimizer(c.optimizer, c.train.steps)
    state = jax.jit(lambda: train.fresh_train_state(c, tx))()
    ckpt_lib.save_state(root / name, 1, state, c)
  return root


def test_distill_sample_end_to_end(teachers, tmp_path, capsys):
  student = tmp_path / "student"
  code = cli.main(["distill", "--teacher", str(teachers / "langflow"), "--workdir", str(student),
                   "--config.train.steps=2", "--config.distill.steps=(2,)", "--config.distill.teacher_steps=2"])
  out = capsys.readouterr().out
  assert code == 0
  summary = json.loads(out)
  assert summary["final_step"] == 2 and summary["card"]["method"] == "progressive"
  assert summary["card"]["teacher"] == str((teachers / "langflow").resolve())
  meta = ckpt_lib.open_run(student)[0].read_meta()
  assert meta["card"]["student"] and meta["card"]["steps"] == [2] and meta["card"]["rounds"] == 1
  assert ckpt_lib.saved_config(student).objective.name == "distill"
  code = cli.main(["sample", "--workdir", str(student), "--steps", "2", "--num", "2"])
  out = capsys.readouterr().out
  assert code == 0 and out.count("--- sample") == 2
  assert f"student of {(teachers / 'langflow').resolve()} (progressive distillation for 2 steps, round 1 of 1" in out
  service = serve.service_from_workdir(str(student), slots=1, steps=2, warmup=False)  # serves as LangFlow
  assert service.kind == "langflow" and service.defaults.steps == 2


@pytest.mark.parametrize("teacher, extra, message", [
    ("nowhere", [], "teacher {root}/nowhere: {root}/nowhere does not exist."),
    ("ar", [], "is a AR Transformer run (objective.name=ar), not LangFlow"),
    ("langflow", ["--config.distill.method=consistency"], "distill.method='consistency' is unknown"),
    ("langflow", ["--config.distill.method=progressive", "--config.distill.steps=(2,)",
                  "--config.distill.teacher_steps=6"],
     "their ratio must be a power of two"),
])
def test_distill_errors_are_one_line(teachers, tmp_path, capsys, teacher, extra, message):
  code = cli.main(["distill", "--teacher", str(teachers / teacher), "--workdir", str(tmp_path / "s"), *extra])
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("langflow-jax: error:")]
  assert code == 2 and len(err) == 1 and message.format(root=teachers) in err[0] and " Fix: " in err[0], err
  assert not (tmp_path / "s").exists()


def test_other_methods_ignore_the_distill_group():
  assert not methods.get("langflow").uses_key("distill.method") and not methods.get("ar").uses_key("distill.steps")
  assert methods.get("distill").uses_key("distill.method")
