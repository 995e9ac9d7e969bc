"""NNX ``Rule(act_compress=bits)``: gradient error and residual bytes of a compressed block.

A Linear-gelu-Linear-BatchNorm block (training mode) under ``jaxq.nnx.quantize_model``
with ``Rule("block", weight=None, act_compress=bits)``, against the float model:
relative error of the parameter gradient (round to nearest; and for 2 bits, stochastic
rounding: one draw against the mean of 32 draws, which an unbiased estimator brings
close to the exact gradient), and the bytes the backward pass keeps
(``jaxq.act.residual_nbytes``, computed abstractly).

    python benchmarks/exp_nnx_act_compress.py
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxq import act
from jaxq.flax import nnx as jnnx
from jaxq.spec import Rule


class Block(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(64, 256, rngs=rngs)
    self.fc2 = nnx.Linear(256, 64, rngs=rngs)
    self.bn = nnx.BatchNorm(64, rngs=rngs)

  def __call__(self, x):
    return self.bn(x + self.fc2(nnx.gelu(self.fc1(x))))


class Net(nnx.Module):
  def __init__(self, rngs):
    self.block = Block(rngs)
    self.head = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    return self.head(self.block(x))


def main():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(128, 64)), jnp.float32)
  target = jnp.asarray(np.random.default_rng(1).normal(size=(128, 10)), jnp.float32)
  loss = lambda m: jnp.sum(m(x) * target)  # noqa: E731
  grad = nnx.jit(lambda m: jnp.concatenate(
      [jnp.ravel(g) for g in jax.tree.leaves(nnx.grad(loss)(m))]))

  def residuals(m):
    gdef, params, rest = nnx.split(m, nnx.Param, ...)
    return act.residual_nbytes(lambda p: loss(nnx.merge(gdef, p, rest, copy=True)), params)

  model = Net(nnx.Rngs(0))
  ref, ref_bytes = grad(nnx.clone(model)), residuals(nnx.clone(model))
  rel = lambda g: float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref))  # noqa: E731
  print(f"float: residual bytes {ref_bytes}")
  for bits in (8, 4, 2):
    q = jnnx.quantize_model(model, Rule("block", weight=None, act_compress=bits))
    b = residuals(q)
    print(f"act_compress={bits}: grad rel. error {rel(grad(q)):.4f} (nearest), residual "
          f"bytes {b} ({b / ref_bytes:.3f}x float)")
  q = jnnx.quantize_model(model, Rule("block", weight=None, act_compress=2),
                          rngs=nnx.Rngs(jaxq=0))
  draws = jnp.stack([grad(q) for _ in range(32)])
  print(f"act_compress=2, stochastic: one draw {rel(draws[0]):.4f}, mean of 32 draws "
        f"{rel(draws.mean(0)):.4f}")


if __name__ == "__main__":
  main()
