import hashlib
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from langflow_jax import checkpoint as ckpt_lib
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


# --------------------------------------------------------------------------- --from hf:OWNER/NAME[@REVISION]

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"  # 40 hex digits: the hub reads it as a commit


def hub_cache_holding(release_dir, cache, repo_id, files=convert.RELEASE_FILES, commit=HUB_COMMIT):
  """Lays out ``cache`` as huggingface_hub writes it after downloading ``repo_id``'s ``files`` at main:
  blobs/<hash> hold the bytes, snapshots/<commit>/<file> link to them, refs/main names the commit."""
  repo = cache / ("models--" + repo_id.replace("/", "--"))
  (repo / "blobs").mkdir(parents=True)
  (repo / "snapshots" / commit).mkdir(parents=True)
  for name in files:
    data = (release_dir / name).read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    (repo / "snapshots" / commit / name).symlink_to(os.path.relpath(blob, repo / "snapshots" / commit))
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)  # no newline: the hub reads the file whole
  return repo


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
  """An empty hub cache that nothing may download into: offline, and an endpoint that refuses connections."""
  cache = tmp_path / "hub"
  cache.mkdir()
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
  return cache


@pytest.mark.parametrize("revision", ["", "@main", f"@{HUB_COMMIT}"])
def test_convert_from_the_hub_cache_offline_matches_the_directory(fixture_dir, reference, tmp_path, offline_hub,
                                                                   revision):
  repo_id = "Continuous-Rivals-Discrete/langflow-owt"
  hub_cache_holding(fixture_dir, offline_hub, repo_id)
  assert cli.main(["convert", "--from", f"hf:{repo_id}{revision}", "--workdir", str(tmp_path / "hub_run")]) == 0
  assert cli.main(["convert", "--from", str(fixture_dir), "--workdir", str(tmp_path / "dir_run")]) == 0
  inputs = [jnp.asarray(reference[k]) for k in ("z", "gamma", "self_cond")]
  hub_logits = np.asarray(train.load_model(tmp_path / "hub_run")[1](*inputs))
  np.testing.assert_array_equal(hub_logits, np.asarray(train.load_model(tmp_path / "dir_run")[1](*inputs)))
  meta = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(tmp_path / "hub_run"), read_only=True).read_meta()
  assert meta["converted_from"] == f"hf:{repo_id}@{HUB_COMMIT}"  # the commit it resolved to


def test_hub_repo_missing_from_the_offline_cache_is_one_line(tmp_path, offline_hub, capsys):
  repo_id = "Continuous-Rivals-Discrete/langflow-lm1b"
  assert cli.main(["convert", "--from", f"hf:{repo_id}", "--workdir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("langflow-jax: error:"), err
  assert f"{repo_id} is not in the Hugging Face cache {offline_hub}" in err[0], err
  assert "HF_HUB_OFFLINE=0" in err[0] and f"`hf download {repo_id} config.json model.safetensors`" in err[0]
  assert "--from DIR" in err[0] and not (tmp_path / "run").exists()


def test_hub_unreachable_without_the_repo_cached_is_one_line(tmp_path, offline_hub, monkeypatch, capsys):
  monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online, but HF_ENDPOINT refuses the connection: no network
  import huggingface_hub.constants

  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once, at its import
  assert cli.main(["convert", "--from", "hf:Continuous-Rivals-Discrete/langflow-owt@v1",
                   "--workdir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "cannot reach the Hugging Face hub for Continuous-Rivals-Discrete/langflow-owt at " \
                           "revision v1" in err[0], err
  assert "--revision v1" in err[0] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("error, message", [
    ("RepositoryNotFoundError", r"the hub has no repository me/nothing that this machine may read .*`hf auth login`"),
    ("RevisionNotFoundError", r"the hub repository me/nothing has no revision 'v9'"),
])
def test_hub_not_found_answers_are_clear_errors(tmp_path, offline_hub, monkeypatch, error, message):
  import huggingface_hub
  import huggingface_hub.utils

  not_found = getattr(huggingface_hub.utils, error)

  def hub_answers_404(*args, **kwargs):
    raise not_found.__new__(not_found)  # built without the HTTP response a real 404 carries

  monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_answers_404)
  with pytest.raises(CheckpointError, match=message):
    convert.convert_official("hf:me/nothing@v9", tmp_path / "run")


def test_partial_hub_snapshot_names_the_missing_file(fixture_dir, tmp_path, offline_hub):
  hub_cache_holding(fixture_dir, offline_hub, "me/half", files=("config.json",))
  with pytest.raises(CheckpointError, match=r"snapshots/0123456789abcdef0123456789abcdef01234567 of me/half lacks "
                                            r"model\.safetensors"):
    convert.convert_official("hf:me/half", tmp_path / "run")


@pytest.mark.parametrize("spec", ["hf:", "hf:langflow-owt", "hf:a/b/c", "hf:a/b@", "hf:/b", "hf:a/b@x@y"])
def test_bad_hub_specs_are_clear_errors(spec):
  with pytest.raises(CheckpointError, match=r"is not a hub repository \(expected hf:OWNER/NAME\[@REVISION\]\)"):
    convert.parse_hub_spec(spec)


def test_hub_names_the_hub_refuses_are_clear_errors(tmp_path, offline_hub):
  with pytest.raises(CheckpointError, match=r"'hf:a/b--c' is not a valid hub repository id \(Cannot have -- or \.\."):
    convert.convert_official("hf:a/b--c", tmp_path / "run")


def test_hub_spec_without_a_name_is_one_line_through_the_cli(tmp_path, offline_hub, capsys):
  assert cli.main(["convert", "--from", "hf:", "--workdir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--from 'hf:' is not a hub repository" in err[0] and " Fix: " in err[0], err
  assert convert.parse_hub_spec("hf:Continuous-Rivals-Discrete/langflow-owt@refs/pr/1") == (
      "Continuous-Rivals-Discrete/langflow-owt", "refs/pr/1")
