"""Quantization-aware training of a Flax NNX model, then calibration and int8 serving.

    python examples/nnx_qat.py

``jaxq.nnx.quantize_model(model, rules)`` returns a quantized copy of an NNX model (same
``nnx.state`` paths). It trains like any NNX model: ``nnx.Optimizer`` over its
``nnx.Param``s (the float weights, and LSQ's learned steps where a rule asks for them),
``nnx.jit``, ``nnx.value_and_grad``. In ``model.train()`` mode the activation observers
follow the batches; ``jaxq.nnx.calibrate`` refreshes them on clean data and
``jaxq.nnx.convert`` returns the serving model with int8 kernels.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxq

#: W8A8: int8 weights per output channel, int8 activations per tensor with an EMA of the
#: batch ranges; the first layer's weights in 4 bits with a learned step (LSQ).
RULES = [
    jaxq.Rule("layers/0", weight=jaxq.QuantSpec(4, estimator="lsq"),
              act=jaxq.QuantSpec(8, granularity="tensor", calibration="ema")),
    jaxq.Rule(".*", weight=jaxq.QuantSpec(8),
              act=jaxq.QuantSpec(8, granularity="tensor", calibration="ema")),
]


def mlp(hidden: int, rngs: nnx.Rngs) -> nnx.Module:
  return nnx.Sequential(nnx.Linear(64, hidden, rngs=rngs), nnx.relu,
                        nnx.Linear(hidden, hidden, rngs=rngs), nnx.relu,
                        nnx.Linear(hidden, 10, rngs=rngs))


def digits(seed: int):
  """Standardized f32[N, 64] digits and labels, stratified 75 / 25 split."""
  d = load_digits()
  x_train, x_test, y_train, y_test = train_test_split(
      d.data.astype(np.float32), d.target, test_size=0.25, stratify=d.target,
      random_state=seed)
  mean, std = x_train.mean(), x_train.std()
  return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


@nnx.jit
def train_step(model, optimizer, x, y):
  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def accuracy(model, x, y):
  return 100.0 * jnp.mean(jnp.argmax(model(x), -1) == y)


def main(argv: Sequence[str] | None = None) -> dict:
  """Returns the QAT model's and the served model's test accuracy, the largest
  |served - QAT| logit, the first and last training loss and the report rows."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--hidden", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  x_train, y_train, x_test, y_test = digits(args.seed)
  model = mlp(args.hidden, nnx.Rngs(args.seed))
  qmodel = jaxq.nnx.quantize_model(model, RULES)  # a quantized copy; `model` unchanged
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, args.steps // 10, args.steps)
  optimizer = nnx.Optimizer(qmodel, optax.adamw(schedule, weight_decay=1e-4),
                            wrt=nnx.Param)
  rng = np.random.default_rng(args.seed)
  losses = []
  qmodel.train()  # observers follow the batches
  for step in range(args.steps):
    idx = rng.choice(len(x_train), 128, replace=False)
    losses.append(float(train_step(qmodel, optimizer, x_train[idx], y_train[idx])))
  report = jaxq.nnx.report(qmodel)
  print(report)

  # Serving: activation ranges from clean training batches, int8 / int4 kernels.
  jaxq.nnx.calibrate(qmodel, [x_train[i:i + 128] for i in range(0, 512, 128)])
  served = jaxq.nnx.convert(qmodel)
  qmodel.eval()  # observers read, not updated
  result = {
      "qat_accuracy": float(accuracy(qmodel, x_test, y_test)),
      "served_accuracy": float(accuracy(served, x_test, y_test)),
      "max_abs_diff": float(jnp.max(jnp.abs(served(x_test) - qmodel(x_test)))),
      "first_loss": losses[0], "last_loss": float(np.mean(losses[-10:])),
      "report": report.rows}
  print(f"loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}; test accuracy "
        f"QAT {result['qat_accuracy']:.2f}%, served {result['served_accuracy']:.2f}% "
        f"(max |served - QAT| logit {result['max_abs_diff']:.1e})")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
