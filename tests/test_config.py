import pytest

from langflow_jax import config as C
from langflow_jax.errors import ConfigError


def test_named_configs_load_and_validate():
  for name in ("tiny", "bench", "lm1b", "owt"):
    cfg = C.load_config(name)
    C.validate(cfg)


def test_overrides_are_typed():
  cfg = C.load_config("tiny", ["--config.train.steps=200", "config.optimizer.lr=1e-3",
                               "--config.model.self_conditioning=false", "--config.data.name=file:x.txt",
                               "--config.schedule.gamma_min=1.5"])
  assert cfg.train.steps == 200 and isinstance(cfg.train.steps, int)
  assert cfg.optimizer.lr == 1e-3
  assert cfg.model.self_conditioning is False
  assert cfg.data.name == "file:x.txt"
  assert cfg.schedule.gamma_min == 1.5


@pytest.mark.parametrize("override, message", [
    ("--config.train.stepz=3", "unknown config key '--config.train.stepz'"),
    ("--config.train.steps=abc", "expected an int"),
    ("--config.train.steps=2.5", "expected an int"),
    ("--config.model.self_conditioning=maybe", "expected a boolean"),
    ("--config.train=3", "is a group"),
    ("--config.optimizer.lr=fast", "expected a float"),
    ("train.steps=3", "cannot read override"),
])
def test_bad_overrides_are_clear_errors(override, message):
  with pytest.raises(ConfigError, match=message):
    C.load_config("tiny", [override])


def test_unknown_key_suggests_close_match():
  with pytest.raises(ConfigError, match="did you mean --config.train.steps"):
    C.load_config("tiny", ["--config.train.step=3"])


@pytest.mark.parametrize("override, message", [
    ("--config.train.steps=0", "train.steps=0 must be positive"),
    ("--config.train.batch_size=-4", "must be positive"),
    ("--config.train.grad_accum=3", "not divisible by train.grad_accum"),
    ("--config.data.seq_len=128", "longer than model.max_length"),
    ("--config.model.compute_dtype=float16", "not supported"),
    ("--config.train.keep_period=-1", "keep_period=-1 must be 0"),
    ("--config.eval.steps=0", "eval.steps=0 .ODE steps. must be positive"),
    ("--config.eval.probes=0", "eval.probes=0 .divergence probes. must be positive"),
    ("--config.eval.solver=dopri", "eval.solver='dopri' is unknown"),
    ("--config.eval.estimator=hutchinson", "eval.estimator='hutchinson' is unknown .did you mean"),
    ("--config.eval.batch_size=0", "eval.batch_size=0 must be positive"),
    ("--config.sample.sampler=ddpm", "sample.sampler='ddpm' is unknown"),
    ("--config.sample.steps=-5", "sample.steps=-5 must be positive"),
    ("--config.sample.num=0", "sample.num=0 must be positive"),
    ("--config.sample.best_of=0", "sample.best_of=0 must be positive"),
    ("--config.sample.temperature=0", "sample.temperature=0.0 must be positive"),
    ("--config.sample.seq_len=65", "sample.seq_len=65 must lie in"),
    ("--config.sample.grid=linear", "sample.grid='linear' is unknown"),
])
def test_validation(override, message):
  cfg = C.load_config("tiny", [override])
  with pytest.raises(ConfigError, match=message):
    C.validate(cfg)


def test_unknown_config_name():
  with pytest.raises(ConfigError, match="unknown config 'huge'"):
    C.load_config("huge")


def test_json_round_trip_keeps_values():
  cfg = C.load_config("tiny", ["--config.train.steps=7"])
  back = C.from_json(C.to_json(cfg))
  assert back.train.steps == 7 and back.model.hidden_size == cfg.model.hidden_size


def test_a_config_saved_before_a_key_existed_reads_back_with_the_behaviour_of_its_time():
  import json

  saved = json.loads(C.to_json(C.load_config("tiny")))
  del saved["schedule"]["entropy_init"]  # as written before the key existed
  assert C.from_json(json.dumps(saved)).schedule.entropy_init == "config"
  assert C.base_config().schedule.entropy_init == "unigram"  # while fresh configs start from the data
  assert C.from_json(C.to_json(C.load_config("tiny"))).schedule.entropy_init == "unigram"


@pytest.mark.parametrize("text, tokens, message", [
    ("", 0, "the prompt is empty"),
    ("   ", 1, "the prompt is empty"),
    ("a long speech", 64, "the prompt is 64 tokens long, but a sample has only 64 positions"),
])
def test_bad_prompts(text, tokens, message):
  with pytest.raises(ConfigError, match=message):
    C.check_prompt(text, tokens, 64)
  C.check_prompt("The Congress shall", 4, 64)


def test_differences_name_changed_keys():
  a = C.load_config("tiny")
  b = C.load_config("tiny", ["--config.model.hidden_size=64", "--config.train.steps=9"])
  assert C.differences(a, b) == [("model.hidden_size", 128, 64), ("train.steps", a.train.steps, 9)]
  assert C.differences(a, b, groups=("model",)) == [("model.hidden_size", 128, 64)]
