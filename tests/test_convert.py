import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from langflow_jax import cli, convert, train
from langflow_jax.errors import CheckpointError


def test_every_official_key_maps_and_round_trips(fixture_dir):
  tensors = load_file(str(fixture_dir / "model.safetensors"))
  _, model = convert.load_official(fixture_dir)
  exported = convert.export_tensors(model)
  assert sorted(exported) == sorted(tensors)
  for k, v in tensors.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_convert_then_load_run_matches_official_logits(fixture_dir, reference, tmp_path):
  assert cli.main(["convert", "--from", str(fixture_dir), "--workdir", str(tmp_path / "run")]) == 0
  config, model = train.load_model(tmp_path / "run")
  assert config.model.vocab_size == 307 and config.model.max_length == 48
  logits = model(jnp.asarray(reference["z"]), jnp.asarray(reference["gamma"]), jnp.asarray(reference["self_cond"]))
  err = np.max(np.abs(np.asarray(logits) - reference["logits"])) / np.max(np.abs(reference["logits"]))
  assert err <= 1e-5
  # export writes the same tensors back
  assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
  back = load_file(str(tmp_path / "out" / "model.safetensors"))
  for k, v in load_file(str(fixture_dir / "model.safetensors")).items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  cfg = json.loads((tmp_path / "out" / "config.json").read_text())
  assert cfg["vocab_size"] == 307 and cfg["model_length"] == 48 and cfg["use_bias"] is True


def copy_fixture(fixture_dir, tmp_path, edit=None, config_edit=None):
  out = tmp_path / "official"
  out.mkdir()
  tensors = load_file(str(fixture_dir / "model.safetensors"))
  if edit:
    edit(tensors)
  save_file(tensors, str(out / "model.safetensors"))
  cfg = json.loads((fixture_dir / "config.json").read_text())
  if config_edit:
    config_edit(cfg)
  (out / "config.json").write_text(json.dumps(cfg))
  return out


@pytest.mark.parametrize("edit, config_edit, message", [
    (lambda t: t.__setitem__("backbone.extra.weight", np.zeros(3, np.float32)), None, "has no counterpart"),
    (lambda t: t.pop("backbone.blocks.1.mlp.0.bias"), None, "lacks 1 tensors"),
    (lambda t: t.__setitem__("backbone.blocks.0.attn_out.weight", np.zeros((96, 95), np.float32)), None,
     "has shape"),
    (lambda t: t.__setitem__("backbone.rotary_emb.inv_freq", np.ones(12, np.float32)), None, "RoPE formula"),
    (None, lambda c: c.__setitem__("n_blocks", 1), "which this model lacks"),
    (None, lambda c: c.pop("hidden_size"), "lacks the key 'hidden_size'"),
    (None, lambda c: c.__setitem__("vocab_size", 300), "config.json says vocab_size=300, but the weights have 307"),
    (None, lambda c: c.__setitem__("hidden_size", 64), "has shape"),
])
def test_bad_checkpoints_are_clear_errors(fixture_dir, tmp_path, edit, config_edit, message):
  src = copy_fixture(fixture_dir, tmp_path, edit, config_edit)
  with pytest.raises(CheckpointError, match=message):
    convert.load_official(src)


def test_vocab_size_mismatch_is_one_line_through_the_cli(fixture_dir, tmp_path, capsys):
  src = copy_fixture(fixture_dir, tmp_path, config_edit=lambda c: c.__setitem__("vocab_size", 50257))
  assert cli.main(["convert", "--from", str(src), "--workdir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "vocab_size=50257, but the weights have 307 token embeddings" in err[0], err
  assert " Fix: " in err[0] and not (tmp_path / "run").exists()


def test_missing_files_and_non_empty_workdir(fixture_dir, tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    convert.load_official(tmp_path)
  convert.convert_official(fixture_dir, tmp_path / "run")
  with pytest.raises(CheckpointError, match="already holds checkpoints"):
    convert.convert_official(fixture_dir, tmp_path / "run")


def test_missing_inv_freq_is_recomputed(fixture_dir, tmp_path, reference):
  src = copy_fixture(fixture_dir, tmp_path, lambda t: t.pop("backbone.rotary_emb.inv_freq"))
  _, model = convert.load_official(src)
  logits = model(jnp.asarray(reference["z"]), jnp.asarray(reference["gamma"]), jnp.asarray(reference["self_cond"]))
  np.testing.assert_allclose(np.asarray(logits), reference["logits"], atol=1e-5 * np.abs(reference["logits"]).max())
