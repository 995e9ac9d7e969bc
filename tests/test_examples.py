"""The programs in examples/, each run in-process through ``main(argv)`` with tiny settings
(the sharded one in a subprocess: its device count is fixed when JAX starts)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples")


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"examples_{name}",
                                                os.path.join(EXAMPLES, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Flax modules (dataclasses) look their module up
  spec.loader.exec_module(module)
  return module


def test_vit_qat_showcase(tmp_path):
  results = _load("vit_qat").main([
      "--steps", "30", "--dim", "16", "--depth", "1", "--heads", "2", "--batch-size", "32",
      "--modes", "w8a8", "--quiet", "--out", str(tmp_path)])
  assert list(results) == ["fp32", "w8a8"]
  with open(tmp_path / "results.json") as f:
    assert json.load(f) == results
  with open(tmp_path / "curves.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  fp32, w8a8 = results["fp32"], results["w8a8"]
  # The served int8 model computes what QAT trained: at most one of 450 test images
  # differs (serving's calibration adds 8 clean batches to the trained EMA ranges).
  assert abs(w8a8["served_accuracy"] - w8a8["test_accuracy"]) <= 100 / 450 + 1e-6
  # int8 kernels with float32 scales; LayerNorms, biases, positions stay float.
  assert w8a8["serving_bytes"] < 0.45 * fp32["serving_bytes"]
  assert 0 < fp32["train_step_bytes"] < w8a8["train_step_bytes"]  # observers, int8 copies


def test_ptq_serve():
  results = _load("ptq_serve").main(["--steps", "100", "--calibration-batches", "2"])
  fp32, w8a8, w4 = results["fp32"], results["w8a8"], results["w4"]
  assert fp32["accuracy"] > 93.0
  assert w8a8["accuracy"] >= fp32["accuracy"] - 1.0
  assert w4["accuracy"] >= fp32["accuracy"] - 2.0
  # Served == simulated (fake quantization with the calibrated ranges), to float32 rounding.
  assert w8a8["max_abs_diff"] < 1e-4 and w4["max_abs_diff"] < 1e-4
  assert w4["serving_bytes"] < w8a8["serving_bytes"] < 0.3 * fp32["serving_bytes"]


def test_nnx_qat():
  result = _load("nnx_qat").main(["--steps", "150", "--hidden", "64"])
  assert result["qat_accuracy"] > 90.0
  assert result["last_loss"] < 0.2 * result["first_loss"]
  assert result["served_accuracy"] == result["qat_accuracy"]
  assert result["max_abs_diff"] < 1e-4
  assert [(r["path"], r["weight"].bits) for r in result["report"]] == [
      ("layers/0", 4), ("layers/2", 8), ("layers/4", 8)]


def test_act_compress():
  results = _load("act_compress").main(["--steps", "60", "--batch-size", "256", "--dim", "64",
                                        "--depth", "3"])
  full, two_bit = results["float"], results["2-bit"]
  assert two_bit["temp_bytes"] < 0.75 * full["temp_bytes"]
  assert two_bit["step_bytes"] < full["step_bytes"]
  assert full["accuracy"] > 90.0 and two_bit["accuracy"] > full["accuracy"] - 3.0


def test_sharded():
  script = (f"import json, sys; sys.path.insert(0, {EXAMPLES!r}); import sharded; "
            "print('RESULT', json.dumps(sharded.main(['--steps', '3', '--batch-size', '32'])))")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                       text=True, timeout=900, check=True).stdout
  result = json.loads(out.split("RESULT", 1)[1])
  assert result["mesh"] == {"data": 4, "model": 2}
  assert "per device (64, 128)" in out  # Dense_0's kernel split over "model"
  assert result["sharded_losses"] == pytest.approx(result["single_losses"], rel=1e-4)
