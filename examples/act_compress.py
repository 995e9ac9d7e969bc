"""Activation-compressed training (ActNN): the same model trained with its saved
activations in float and in 2 bits; the memory of one train step, as XLA plans it.

    python examples/act_compress.py
    python examples/act_compress.py --bits 4 --batch-size 1024

The backward pass needs the activations of the forward pass (LayerNorm outputs, the
inputs of each Dense layer and of each GELU). ``jaxq.Rule(path, act_compress=bits)``
keeps those of every matched module as per-group, stochastically rounded ``bits``-bit
copies (Chen et al. 2021, ActNN); the forward pass is exact, the weight gradients carry
a small, unbiased noise. The memory printed is from the compiled step's
``memory_analysis()``: arguments + outputs + temporaries - donated buffers.
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


class Block(nn.Module):
  """Pre-LayerNorm residual MLP block."""
  dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.Dense(4 * self.dim)(nn.LayerNorm()(x)))
    return x + nn.Dense(self.dim)(y)


class ResidualMLP(nn.Module):
  dim: int = 128
  depth: int = 4

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.dim, name="embed")(x)
    for i in range(self.depth):
      x = Block(self.dim, name=f"block_{i}")(x)
    return nn.Dense(10, name="head")(nn.LayerNorm()(x))


def digits(seed: int):
  """Standardized f32[N, 64] digits and labels, stratified 75 / 25 split."""
  d = load_digits()
  x_train, x_test, y_train, y_test = train_test_split(
      d.data.astype(np.float32), d.target, test_size=0.25, stratify=d.target,
      random_state=seed)
  mean, std = x_train.mean(), x_train.std()
  return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def train(model, data, args) -> dict:
  """Trains ``model`` for ``--steps`` steps; returns its compiled step's memory, the
  final training loss and the test accuracy."""
  x_train, y_train, x_test, y_test = data
  params = model.init(jax.random.key(args.seed), x_train[:1])["params"]
  tx = optax.adamw(optax.cosine_decay_schedule(2e-3, args.steps), weight_decay=1e-4)

  def train_step(params, opt_state, x, y, key):
    def loss_fn(params):  # the "jaxq" stream draws the stochastic rounding noise
      logits = model.apply({"params": params}, x, rngs={"jaxq": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, batch = tx.init(params), args.batch_size
  rng = np.random.default_rng(args.seed)
  xb, yb = x_train[:batch], y_train[:batch]
  step = jax.jit(train_step, donate_argnums=(0, 1)).lower(
      params, opt_state, xb, yb, jax.random.key(0)).compile()
  memory = step.memory_analysis()
  for i in range(args.steps):
    idx = rng.choice(len(x_train), batch, replace=len(x_train) < batch)
    params, opt_state, loss = step(params, opt_state, x_train[idx], y_train[idx],
                                   jax.random.key(i))
  logits = model.apply({"params": params}, x_test)
  return {"step_bytes": memory.argument_size_in_bytes + memory.output_size_in_bytes
                        + memory.temp_size_in_bytes - memory.alias_size_in_bytes,
          "temp_bytes": memory.temp_size_in_bytes, "loss": float(loss),
          "accuracy": 100.0 * float(jnp.mean(jnp.argmax(logits, -1) == y_test))}


def main(argv: Sequence[str] | None = None) -> dict:
  """Returns ``{"float": row, "<bits>-bit": row}`` (see :func:`train`)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--bits", type=int, choices=(1, 2, 4, 8), default=2)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch-size", type=int, default=512)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  data = digits(args.seed)
  model = ResidualMLP(args.dim, args.depth)
  # Every block's saved activations, its input included, in `bits` bits; weights never.
  compressed = jaxq.quantize_model(
      model, [jaxq.Rule(r"block_\d+", weight=None, act=None, act_compress=args.bits)])
  results = {"float": train(model, data, args),
             f"{args.bits}-bit": train(compressed, data, args)}
  print("| activations | step memory (KiB) | temporaries (KiB) | final loss | test acc (%) |")
  print("|---|---:|---:|---:|---:|")
  for name, r in results.items():
    print(f"| {name} | {r['step_bytes'] / 1024:.0f} | {r['temp_bytes'] / 1024:.0f} | "
          f"{r['loss']:.4f} | {r['accuracy']:.2f} |")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
