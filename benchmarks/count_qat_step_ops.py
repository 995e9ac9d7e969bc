"""StableHLO op counts of one lowered QAT train step, Linen vs NNX, float vs jaxq W8A8.

Shows whether the NNX path adds work that the Linen path does not: the ops jaxq adds
(float -> W8A8) should be the same in both APIs. Lowering only (no compilation, no timing).

  python benchmarks/count_qat_step_ops.py [--depth 1] [--batch 8]
"""

from __future__ import annotations

import argparse
import collections
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bench_qat_step import NnxViT, ViT, make_step
from jaxq.flax import nnx as jaxq_nnx
from jaxq.flax.linen import quantize_model
from jaxq.spec import QuantSpec, Rule

W8A8 = [Rule(".*", weight=QuantSpec(), act=QuantSpec(granularity="tensor"))]


def op_counts(text: str) -> collections.Counter:
  return collections.Counter(re.findall(r"= (stablehlo\.[a-z_]+)", text))


def linen_ops(model, tx, x, y, key):
  params = model.init({"params": key, "jaxq": key}, x)["params"]
  return op_counts(make_step(model, tx).lower(params, tx.init(params), x, y, key).as_text())


def nnx_ops(model, tx, x, y):
  def step(m, opt, x, y):
    loss, grads = nnx.value_and_grad(
        lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(m)
    opt.update(m, grads)
    return loss
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  return op_counts(nnx.jit(step).lower(model, opt, x, y).as_text())


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--depth", type=int, default=1)
  ap.add_argument("--batch", type=int, default=8)
  args = ap.parse_args()
  key = jax.random.key(0)
  x = jax.random.normal(key, (args.batch, 32, 32, 3))
  y = jnp.arange(args.batch) % 10
  tx = optax.adamw(1e-3)
  nnx_vit = lambda: NnxViT(nnx.Rngs(0), depth=args.depth)  # noqa: E731
  res = {"Linen float": linen_ops(ViT(depth=args.depth), tx, x, y, key),
         "Linen jaxq": linen_ops(quantize_model(ViT(depth=args.depth), W8A8), tx, x, y, key),
         "NNX float": nnx_ops(nnx_vit(), tx, x, y),
         "NNX jaxq": nnx_ops(jaxq_nnx.quantize_model(nnx_vit(), W8A8), tx, x, y)}
  print(f"{'op':28s}" + "".join(f"{k:>12s}" for k in res))
  for op in sorted(set().union(*res.values())):
    print(f"{op:28s}" + "".join(f"{r[op]:12d}" for r in res.values()))
  totals = [sum(r.values()) for r in res.values()]
  print(f"{'total':28s}" + "".join(f"{t:12d}" for t in totals))
  print(f"added by jaxq W8A8: Linen {totals[1] - totals[0]}, NNX {totals[3] - totals[2]}")


if __name__ == "__main__":
  main()
