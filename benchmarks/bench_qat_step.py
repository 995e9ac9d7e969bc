"""Train-step time of a ViT-Tiny-sized model: float vs jaxq W8A8 QAT vs AQT / Qwix int8,
in Linen and in NNX.

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

NNX rows: the same ViT written with ``nnx.Linear`` layers, trained as an NNX user does
(``nnx.Optimizer(model, tx, wrt=nnx.Param)``, ``nnx.value_and_grad`` under ``nnx.jit``):
float, ``jaxq.nnx.quantize_model`` with the same W8A8 rule, and Qwix's
``quantize_model(model, QtProvider(rules), x)`` with int8 weights and activations.
"""

from __future__ import annotations

import argparse
import functools
import time

import flax.linen as nn
import jax
from flax import nnx
import jax.numpy as jnp
import numpy as np
import optax

from jaxq.flax import nnx as jaxq_nnx
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


class NnxAttention(nnx.Module):
  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    hd = d // self.heads
    q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3, self.heads, hd), 3, axis=2)
    q, k, v = (a[:, :, 0] for a in (q, k, v))
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd), axis=-1)
    return self.proj(jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, d))


class NnxBlock(nnx.Module):
  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = NnxAttention(dim, heads, rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.fc2 = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.fc2(nn.gelu(self.fc1(self.norm2(x))))


class NnxViT(nnx.Module):
  """:class:`ViT` in NNX (same layers, shapes and initialisers)."""

  def __init__(self, rngs: nnx.Rngs, dim: int = 192, depth: int = 6, heads: int = 3,
               patch: int = 4, classes: int = 10, image: int = 32):
    self.patch = patch
    self.embed = nnx.Linear(patch * patch * 3, dim, rngs=rngs)
    tokens = (image // patch) ** 2
    self.pos = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, tokens, dim)))
    self.blocks = nnx.List([NnxBlock(dim, heads, rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, classes, rngs=rngs)

  def __call__(self, x):
    b, h, w, c = x.shape
    p = self.patch
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = self.embed(x.reshape(b, (h // p) * (w // p), p * p * c)) + self.pos
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x).mean(1))


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


def linen_runner(model, tx, x, y, key):
  """One Linen train step per call (params and optimizer state carried along)."""
  params = model.init({"params": key, "jaxq": key}, x)["params"]
  step = make_step(model, tx)
  state = [params, tx.init(params)]

  def run():
    p, o, loss = step(*state, x, y, key)
    jax.block_until_ready((p, loss))
    state[:] = [p, o]
    return loss
  return run


def nnx_runner(model, tx, x, y, key):
  """One NNX train step per call: nnx.Optimizer updated in place under nnx.jit."""
  del key
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  def run():
    loss = step(model, opt, x, y)
    jax.block_until_ready((nnx.state(model, nnx.Param), loss))
    return loss
  return run


def variants(args, x):
  """``{name: (model, runner)}``."""
  base = dict(depth=args.depth)
  out = {"float": ViT(**base)}
  w8a8 = [Rule(".*", weight=QuantSpec(), act=QuantSpec(granularity="tensor"))]
  out["jaxq W8A8"] = quantize_model(ViT(**base), w8a8)
  out["jaxq W8A8 int8-bwd"] = quantize_model(ViT(**base), w8a8, int8="all")
  out["jaxq W8A8 fake-quant"] = quantize_model(ViT(**base), w8a8, int8="off")
  nnx_vit = lambda: NnxViT(nnx.Rngs(0), **base)  # noqa: E731
  nnx_out = {"NNX float": nnx_vit(),
             "jaxq NNX W8A8": jaxq_nnx.quantize_model(nnx_vit(), w8a8)}
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
    nnx_out["Qwix NNX int8"] = qwix.quantize_model(nnx_vit(), qwix.QtProvider(rules), x)
  except ImportError:
    print("qwix not installed: skipping Qwix")
  return ({k: (m, linen_runner) for k, m in out.items()}
          | {k: (m, nnx_runner) for k, m in nnx_out.items()})


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
  for name, (model, runner) in variants(args, x).items():
    run = runner(model, tx, x, y, key)
    t0 = time.perf_counter()
    loss = run()
    print(f"compiled {name:22s} in {time.perf_counter() - t0:5.1f}s  loss {float(loss):.3f}",
          flush=True)
    runs[name] = (run, [])
  for _ in range(args.rounds):
    for run, times in runs.values():
      t0 = time.perf_counter()
      run()
      times.append(time.perf_counter() - t0)
  med = {name: np.median(times) for name, (_, times) in runs.items()}
  print(f"\njax {jax.__version__}, {jax.devices()[0].platform}, batch {args.batch}, "
        f"depth {args.depth}, {args.rounds} interleaved rounds")
  print(f"{'variant':24s} {'median ms':>10s} {'x float':>8s} {'x NNX float':>12s}")
  for name, m in med.items():
    nnx_ratio = f"{m / med['NNX float']:12.3f}" if "NNX" in name else ""
    print(f"{name:24s} {m * 1e3:10.1f} {m / med['float']:8.3f} {nnx_ratio}")


if __name__ == "__main__":
  main()
