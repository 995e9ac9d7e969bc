"""Train-step time of a ViT-Tiny-sized model: float vs jaxq W8A8 QAT vs AQT / Qwix int8.

One jitted step = forward + backward + adamw update, batch 64 of 32x32x3, patch 4,
dim 192, depth 6, 3 heads (ViT-Tiny widths). All variants run in ONE process,
interleaved round-robin (so machine load affects them alike); the median step time of
each is printed with its ratio to float.

  python benchmarks/bench_qat_step.py [--rounds 15] [--batch 64] [--depth 6]

AQT (``aqtp``) and Qwix (``qwix``) rows appear when they are installed (the optional
``bench`` extra). AQT: ``aqt.jax.v2.config.fully_quantized(fwd_bits=8, bwd_bits=8)`` through
``dot_general_cls`` of every Dense; Qwix: ``QtProvider`` with int8 weights and activations.
jaxq: ``quantize_model`` with int8 per-channel weights and int8 per-tensor activations
(the forward matmuls on int8 operands); ``jaxq W8A8 int8-bwd`` also runs the backward
matmuls in int8 (``int8="all"``).
"""

from __future__ import annotations

import argparse
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxq.flax.linen import quantize_model
from jaxq.spec import QuantSpec, Rule


class Attention(nn.Module):
  dim: int
  heads: int
  dot_general_cls: object = None

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    hd = self.dim // self.heads
    qkv = nn.Dense(3 * self.dim, dot_general_cls=self.dot_general_cls, name="qkv")(x)
    q, k, v = jnp.split(qkv.reshape(b, t, 3, self.heads, hd), 3, axis=2)
    q, k, v = (a[:, :, 0] for a in (q, k, v))
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, self.dim)
    return nn.Dense(self.dim, dot_general_cls=self.dot_general_cls, name="proj")(o)


class Block(nn.Module):
  dim: int
  heads: int
  dot_general_cls: object = None

  @nn.compact
  def __call__(self, x):
    x = x + Attention(self.dim, self.heads, self.dot_general_cls)(nn.LayerNorm()(x))
    y = nn.Dense(4 * self.dim, dot_general_cls=self.dot_general_cls)(nn.LayerNorm()(x))
    y = nn.Dense(self.dim, dot_general_cls=self.dot_general_cls)(nn.gelu(y))
    return x + y


class ViT(nn.Module):
  dim: int = 192
  depth: int = 6
  heads: int = 3
  patch: int = 4
  classes: int = 10
  dot_general_cls: object = None

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    p = self.patch
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (h // p) * (w // p), p * p * c)
    x = nn.Dense(self.dim, dot_general_cls=self.dot_general_cls, name="embed")(x)
    x = x + self.param("pos", nn.initializers.normal(0.02), (1,) + x.shape[1:])
    for i in range(self.depth):
      x = Block(self.dim, self.heads, self.dot_general_cls, name=f"block_{i}")(x)
    x = nn.LayerNorm()(x).mean(1)
    return nn.Dense(self.classes, dot_general_cls=self.dot_general_cls, name="head")(x)


def make_step(model, tx):
  @jax.jit
  def step(params, opt_state, x, y, key):
    def loss_fn(p):
      logits = model.apply({"params": p}, x, rngs={"params": key, "jaxq": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, upd), opt_state, loss
  return step


def variants(args):
  base = dict(depth=args.depth)
  out = {"float": ViT(**base)}
  w8a8 = [Rule(".*", weight=QuantSpec(), act=QuantSpec(granularity="tensor"))]
  out["jaxq W8A8"] = quantize_model(ViT(**base), w8a8)
  out["jaxq W8A8 int8-bwd"] = quantize_model(ViT(**base), w8a8, int8="all")
  out["jaxq W8A8 fake-quant"] = quantize_model(ViT(**base), w8a8, int8="off")
  try:
    from aqt.jax.v2 import config as aqt_config  # pylint: disable=import-outside-toplevel
    from aqt.jax.v2.flax import aqt_flax  # pylint: disable=import-outside-toplevel
    cfg = aqt_config.fully_quantized(fwd_bits=8, bwd_bits=8)
    out["AQT int8"] = ViT(**base, dot_general_cls=functools.partial(
        aqt_flax.AqtDotGeneral, cfg))
  except ImportError:
    print("aqtp not installed: skipping AQT")
  try:
    import qwix  # pylint: disable=import-outside-toplevel
    rules = [qwix.QtRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8)]
    out["Qwix int8"] = qwix.quantize_model(ViT(**base), qwix.QtProvider(rules))
  except ImportError:
    print("qwix not installed: skipping Qwix")
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=15)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--depth", type=int, default=6)
  args = ap.parse_args()
  key = jax.random.key(0)
  x = jax.random.normal(key, (args.batch, 32, 32, 3))
  y = jax.random.randint(key, (args.batch,), 0, 10)
  tx = optax.adamw(1e-3, weight_decay=1e-4)
  runs = {}
  for name, model in variants(args).items():
    params = model.init({"params": key, "jaxq": key}, x)["params"]
    step = make_step(model, tx)
    state = (params, tx.init(params))
    t0 = time.perf_counter()
    p, o, loss = step(*state, x, y, key)
    jax.block_until_ready(loss)
    print(f"compiled {name:22s} in {time.perf_counter() - t0:5.1f}s  loss {float(loss):.3f}",
          flush=True)
    runs[name] = [step, (p, o), []]
  for _ in range(args.rounds):
    for name, r in runs.items():
      step, (p, o), times = r
      t0 = time.perf_counter()
      p, o, loss = step(p, o, x, y, key)
      jax.block_until_ready((p, loss))
      times.append(time.perf_counter() - t0)
      r[1] = (p, o)
  f = np.median(runs["float"][2])
  print(f"\njax {jax.__version__}, {jax.devices()[0].platform}, batch {args.batch}, "
        f"depth {args.depth}, {args.rounds} interleaved rounds")
  print(f"{'variant':24s} {'median ms':>10s} {'x float':>8s}")
  for name, (_, _, times) in runs.items():
    med = np.median(times)
    print(f"{name:24s} {med * 1e3:10.1f} {med / f:8.3f}")


if __name__ == "__main__":
  main()
