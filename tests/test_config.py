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
