"""examples/qlora_finetune.py at tiny sizes: full fine-tuning, LoRA and QLoRA from one
pretrained model, checked against hand counts and the pretrained parameters."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

import jaxq
from jaxq.qarray import QArray

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "qlora_finetune.py")
_spec = importlib.util.spec_from_file_location("qlora_finetune", _PATH)
qlora_finetune = importlib.util.module_from_spec(_spec)
sys.modules["qlora_finetune"] = qlora_finetune  # Flax dataclasses look their module up
_spec.loader.exec_module(qlora_finetune)

D, RANK, GROUP = 16, 2, 16  # one block, NF4 groups of 16


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  plot = tmp_path_factory.mktemp("qlora") / "curves.png"
  results = qlora_finetune.main(
      ["--dim", str(D), "--depth", "1", "--pretrain-steps", "60", "--steps", "25",
       "--batch-size", "64", "--rank", str(RANK), "--group-size", str(GROUP),
       "--plot", str(plot), "--quiet"])
  return results, plot


def _blocks(params):
  return {k: params["block0"][k]["kernel"] for k in ("qkv", "out", "fc1", "fc2")}


def test_trainable_counts_and_train_state_bytes(run):
  results, plot = run
  # Every parameter: embed 8 -> D, positions 8 x D, a block (two LayerNorms, qkv D -> 3D,
  # out D -> D, fc1 D -> 2D, fc2 2D -> D), the final LayerNorm and head D -> 10.
  block = 4 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * 2 * D + 2 * D) + (2 * D * D + D)
  assert results["full"]["trainable"] == 9 * D + 8 * D + block + 2 * D + 10 * D + 10
  # Adapters r (K + N) on embed, head, qkv, out, fc1 and fc2.
  adapters = RANK * ((8 + D) + (D + 10) + 4 * D + 2 * D + 3 * D + 3 * D)
  assert results["lora"]["trainable"] == results["qlora"]["trainable"] == adapters
  # The NF4 blocks: half a byte a weight plus a float32 absmax per group of 16.
  frozen, float_base = _blocks(results["qlora"]["params"]), _blocks(results["lora"]["params"])
  assert all(isinstance(q, QArray) for q in frozen.values())
  nf4_bytes = sum(q.nbytes for q in frozen.values())
  float_bytes = sum(w.nbytes for w in float_base.values())
  assert nf4_bytes == float_bytes // 8 + float_bytes // GROUP + len(frozen)  # + zero points
  assert nf4_bytes <= 0.2 * float_bytes
  # Full: params + two AdamW moments; LoRA: float params + adapter moments; QLoRA less.
  params_bytes = 4 * results["full"]["trainable"]
  assert results["full"]["state_bytes"] >= 3 * params_bytes
  assert results["lora"]["state_bytes"] >= params_bytes + 3 * 4 * adapters
  assert results["qlora"]["state_bytes"] == (results["lora"]["state_bytes"] - float_bytes
                                             + nf4_bytes)
  with open(plot, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_fine_tuning_learns_the_shifted_task_and_moves_only_adapters(run):
  results, _ = run
  pretrained = results["pretrained"]["accuracy"]
  for method in qlora_finetune.METHODS:
    assert results[method]["accuracy"] >= pretrained + 10, method
    losses = results[method]["losses"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), method
  pre = results["pretrained"]["params"]
  assert not np.array_equal(results["full"]["params"]["head"]["bias"], pre["head"]["bias"])
  for method in ("lora", "qlora"):  # zero updates off the adapters
    p = results[method]["params"]
    np.testing.assert_array_equal(p["head"]["bias"], pre["head"]["bias"])
    np.testing.assert_array_equal(p["embed"]["kernel"], pre["embed"]["kernel"])
    assert float(np.abs(p["head"]["lora_b"]).max()) > 0
  np.testing.assert_array_equal(_blocks(results["lora"]["params"])["qkv"],
                                _blocks(pre)["qkv"])
  # The QLoRA base is the NF4 quantization of the pretrained kernel.
  w = np.asarray(_blocks(pre)["qkv"])
  err = np.abs(np.asarray(jaxq.dequantize(_blocks(results["qlora"]["params"])["qkv"])) - w)
  assert 0 < err.max() <= 0.2 * np.abs(w).max()
