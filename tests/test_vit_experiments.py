"""benchmarks/vit_experiments.py (the ViT experiment harness): its mode grammar, data
loaders, fine-tuning initialisation and argument errors, without training (the training
path is the showcase's, run by tests/test_examples.py)."""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "vit_experiments.py")
_spec = importlib.util.spec_from_file_location("vit_experiments", _PATH)
vit_qat = importlib.util.module_from_spec(_spec)
sys.modules["vit_experiments"] = vit_qat  # dataclasses look their module up
_spec.loader.exec_module(vit_qat)

TINY = ["--dim", "16", "--depth", "1", "--heads", "2", "--mlp-ratio", "2", "--steps", "3",
        "--batch-size", "32", "--eval-batch-size", "128", "--calibration-batches", "2",
        "--quiet"]


def test_cifar10_missing_files_error(tmp_path):
  (tmp_path / "data_batch_1").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match=r"data_batch_2.*test_batch"):
    vit_qat.main(["--dataset", "cifar10", "--data-dir", str(tmp_path)] + TINY)
  with pytest.raises(ValueError, match="--data-dir"):
    vit_qat.main(["--dataset", "cifar10"] + TINY)


def test_cifar10_loader_reads_python_batches(tmp_path):
  root = tmp_path / "cifar-10-batches-py"
  root.mkdir()
  rng = np.random.default_rng(0)
  raw = {}
  for name in vit_qat.CIFAR10_FILES:
    data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    labels = list(rng.integers(0, 10, 4))
    raw[name] = (data, labels)
    with open(root / name, "wb") as f:
      pickle.dump({b"data": data, b"labels": labels}, f)
  ds = vit_qat.load_cifar10(str(tmp_path))  # the parent directory works too
  assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(ds.y_test, raw["test_batch"][1])
  # channel-last layout: pixel (0, 0) of image 0 is bytes 0, 1024, 2048 (R, G, B)
  train = np.concatenate([raw[f"data_batch_{i}"][0] for i in range(1, 6)]).astype(np.float32)
  img = train.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) / 255.0
  mean, std = img.mean(axis=(0, 1, 2)), img.std(axis=(0, 1, 2))
  np.testing.assert_allclose(ds.x_train, (img - mean) / std, rtol=1e-5, atol=1e-5)


def test_digits_split_is_stratified_and_standardized():
  ds = vit_qat.load_digits(seed=0)
  assert ds.x_train.shape[1:] == (8, 8, 1) and len(ds.x_train) + len(ds.x_test) == 1797
  np.testing.assert_allclose(ds.x_train.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(ds.x_train.std(), 1.0, atol=1e-5)
  test_share = np.bincount(ds.y_test) / (np.bincount(ds.y_test) + np.bincount(ds.y_train))
  np.testing.assert_allclose(test_share, 0.25, atol=0.01)


def test_augment_shifts_within_bounds():
  x = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 1) + 1
  y = vit_qat.augment(x, np.random.default_rng(0), max_shift=1)
  assert y.shape == x.shape
  for a, b in zip(x, y):  # some shift by (dy, dx) in [-1, 1]^2 with zero fill
    ok = False
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        shifted = np.zeros_like(a)
        src = a[max(dy, 0):8 + min(dy, 0), max(dx, 0):8 + min(dx, 0)]
        shifted[max(-dy, 0):8 + min(-dy, 0), max(-dx, 0):8 + min(-dx, 0)] = src
        ok |= np.array_equal(shifted, b)
    assert ok
  np.testing.assert_array_equal(vit_qat.augment(x, np.random.default_rng(0), 0), x)


def test_parse_modes():
  assert vit_qat.parse_modes("w8a8,ptq-w4") == ["fp32", "w8a8", "ptq-w4"]
  # --act-bits applies to training modes; PTQ still starts from a plain fp32 run.
  assert vit_qat.parse_modes("fp32,w4a4+act4,ptq-w8a8", act_bits=2) == [
      "fp32", "fp32+act2", "w4a4+act4", "ptq-w8a8"]
  # Fine-tuning (the default --qat-init fp32): the float run each quantized mode starts
  # from goes first.
  assert vit_qat.parse_modes("w8a8,fp32", fine_tune=True) == ["fp32", "w8a8"]
  assert vit_qat.parse_modes("w8a8", act_bits=2, fine_tune=True) == ["fp32", "w8a8+act2"]
  assert vit_qat.parse_modes("w4a4,fp32", act_bits=2, fine_tune=True) == [
      "fp32+act2", "w4a4+act2"]
  assert vit_qat.parse_modes("w8a8") == ["w8a8"]
  rules = vit_qat.mode_rules("w8a8+act2")
  assert rules[0].act_compress == 2 and rules[0].weight is None
  assert rules[1:] == vit_qat.QAT_MODES["w8a8"]
  assert vit_qat.mode_rules("fp32") is None
  assert vit_qat.parse_modes("w8a8", act_bits="auto") == ["w8a8+actauto"]
  assert vit_qat.split_mode("fp32+actauto") == ("fp32", "auto")
  auto = vit_qat.mode_rules("w8a8+actauto", {"block_1": 4, "block_0": 1})
  assert [(r.path, r.act_compress) for r in auto[:2]] == [("block_0", 1), ("block_1", 4)]
  for bad in ("ptq-w4+act2", "w8a8+act3", "w8a8+actAUTO", "int3", ""):
    with pytest.raises(ValueError, match="--modes"):
      vit_qat.parse_modes(bad)


def test_fine_tune_starts_from_the_float_variables():
  import jax
  import optax
  from flax import traverse_util
  data = vit_qat.load_digits(0)
  config = vit_qat.ViTConfig(2, 16, 1, 2, 2.0, 0.0, data.num_classes)
  x0 = data.x_train[:8]
  float_vars = vit_qat.ViT(config).init(jax.random.key(3), x0, train=False)
  model = vit_qat.build_model("w4a4", config)
  state = vit_qat.state_from(model, optax.adam(1e-3), float_vars, x0)
  got = traverse_util.flatten_dict(state.params, sep="/")
  want = traverse_util.flatten_dict(float_vars["params"], sep="/")
  for path, value in want.items():
    np.testing.assert_array_equal(got[path], value, err_msg=path)
  extra = set(got) - set(want)
  # LSQ steps of every quantized layer, created from the float weights and the batch.
  assert extra and all(p.rsplit("/", 1)[1].startswith("jaxq_") for p in extra), extra
  scales = [p for p in extra if p.endswith("_scale")]
  assert scales and all(np.all(np.isfinite(got[p])) and np.all(got[p] > 0) for p in scales)


def test_mesh_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="needs 2 devices"):
    vit_qat.main(["--mesh", "data=2", "--out", str(tmp_path)] + TINY)
  with pytest.raises(ValueError, match="mesh entry"):
    vit_qat.main(["--mesh", "data=two", "--out", str(tmp_path)] + TINY)


@pytest.mark.parametrize("argv, match", [
    (["--modes", "fp32,int3"], "--modes"),
    (["--patch", "3"], "--patch 3 must divide"),
    (["--heads", "5"], "divisible by --heads"),
])
def test_bad_arguments(tmp_path, argv, match):
  with pytest.raises(ValueError, match=match):
    vit_qat.main(["--out", str(tmp_path)] + TINY + argv)  # later flags override TINY


def test_eval_only_needs_checkpoint():
  with pytest.raises(SystemExit):
    vit_qat.main(["--eval-only"])


@pytest.mark.parametrize("argv, message", [
    (["--act-choices", "2,3"], "--act-choices must be widths from (1, 2, 4, 8)"),
    (["--act-choices", "two"], "--act-choices must be comma-separated"),
    (["--act-avg-bits", "1.5"], "--act-avg-bits must be >= the narrowest"),
])
def test_bad_act_arguments_name_the_flag(argv, message, capsys):
  with pytest.raises(SystemExit):
    vit_qat.parse_args(argv)
  assert message in capsys.readouterr().err
