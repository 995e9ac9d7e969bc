"""Post-training quantization: calibrate a trained float model and serve it in int8 / int4.

    python examples/ptq_serve.py

A Linen MLP is trained in float on scikit-learn's digits; no quantized training follows.
``jaxq.quantize_model`` says what to quantize, ``jaxq.report`` shows it, ``jaxq.calibrate``
records activation ranges on a few training batches, and ``jaxq.convert`` returns a
serving model whose kernels are ``QArray``s:

* W8A8: int8 weights (one scale per output channel) and int8 activations (one static
  scale per tensor): int8 x int8 -> int32 matmuls with a fused dequantization.
* W4: weight-only, packed 4-bit weights with one scale per 16 input rows.

The served model computes what the quantized model simulates in float (fake
quantization with the calibrated ranges): the program prints the largest difference.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxq
from jaxq.flax.ptq import serving_nbytes

#: mode -> rules. Calibration "percentile" ignores the 0.01% most extreme activations.
RULES = {
    "w8a8": [jaxq.Rule(".*", weight=jaxq.QuantSpec(8), act=jaxq.QuantSpec(
        8, granularity="tensor", calibration="percentile", percentile=99.99))],
    "w4": [jaxq.Rule(".*", weight=jaxq.QuantSpec(4, granularity="group", group_size=16))],
}


class MLP(nn.Module):
  hidden: int = 128

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


def digits(seed: int):
  """Standardized f32[N, 64] digits and labels, stratified 75 / 25 split."""
  d = load_digits()
  x_train, x_test, y_train, y_test = train_test_split(
      d.data.astype(np.float32), d.target, test_size=0.25, stratify=d.target,
      random_state=seed)
  mean, std = x_train.mean(), x_train.std()
  return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def train_float(model, x, y, steps: int, seed: int):
  """``steps`` AdamW steps on batches of 128; returns the trained params."""
  params = model.init(jax.random.key(seed), x[:1])["params"]
  tx = optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb):
    def loss_fn(params):
      return optax.softmax_cross_entropy_with_integer_labels(
          model.apply({"params": params}, xb), yb).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  order = np.random.default_rng(seed).permutation(np.arange(steps * 128) % len(x))
  for i in range(steps):
    idx = order[i * 128:(i + 1) * 128]
    params, opt_state = step(params, opt_state, x[idx], y[idx])
  return params


def accuracy(logits, labels) -> float:
  return 100.0 * float(jnp.mean(jnp.argmax(logits, -1) == labels))


def main(argv: Sequence[str] | None = None) -> dict:
  """Returns ``{"fp32": row, mode: row}``; each row has the test accuracy and the bytes
  of the serving parameters, quantized rows the largest |served - simulated| logit."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=300, help="float training steps")
  p.add_argument("--calibration-batches", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  x_train, y_train, x_test, y_test = digits(args.seed)
  model = MLP()
  params = train_float(model, x_train, y_train, args.steps, args.seed)
  float_logits = model.apply({"params": params}, x_test)
  results = {"fp32": {"accuracy": accuracy(float_logits, y_test),
                      "serving_bytes": serving_nbytes(params)}}
  batches = [x_train[i * 128:(i + 1) * 128] for i in range(args.calibration_batches)]
  for mode, rules in RULES.items():
    qmodel = jaxq.quantize_model(model, rules)  # the float model, unchanged, wrapped
    print(jaxq.report(qmodel, {"params": params}, x_test))
    variables = jaxq.calibrate(qmodel, {"params": params}, batches)
    serving_model, serving_vars = jaxq.convert(qmodel, variables)
    served = jax.jit(serving_model.apply)(serving_vars, x_test)
    simulated = qmodel.apply(variables, x_test)  # fake quantization, calibrated ranges
    results[mode] = {"accuracy": accuracy(served, y_test),
                     "serving_bytes": serving_nbytes(serving_vars["params"]),
                     "max_abs_diff": float(jnp.max(jnp.abs(served - simulated)))}
  print("| model | test acc (%) | serving (KiB) | max abs(served - simulated) |")
  print("|---|---:|---:|---:|")
  for mode, r in results.items():
    diff = f"{r['max_abs_diff']:.2e}" if "max_abs_diff" in r else ""
    print(f"| {mode} | {r['accuracy']:.2f} | {r['serving_bytes'] / 1024:.1f} | {diff} |")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
