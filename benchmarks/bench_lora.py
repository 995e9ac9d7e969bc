"""Train-step memory and time: full fine-tuning vs LoRA vs QLoRA (NF4 base) (issue #18).

A ~25M-parameter transformer language model (``--dim 512 --depth 8``, vocabulary 1024,
random init), one AdamW step on a ``--batch x --seq`` batch of random tokens:

* ``full``  -- optax.adamw on every parameter;
* ``lora``  -- a rank-``--rank`` adapter on every block Dense layer (qkv, out, fc1, fc2)
  over its float kernel; AdamW on the adapters only (``jaxq.lora.split``: gradients of
  the adapters alone);
* ``qlora`` -- the same, with those kernels frozen as NF4 QArrays (``jaxq.lora.freeze``,
  groups of ``--group-size``, float32 absmaxes). Embedding, LayerNorms and the output
  layer stay float and frozen in both LoRA variants.

Printed per method: XLA's ``memory_analysis()`` of the compiled step (arguments, i.e.
weights + optimizer state + batch, and temporaries; trainable and optimizer state
donated), their ratios to ``full``, and the median step time over ``--rounds`` rounds
that run the methods interleaved in one process (machine load hits them alike).

    python benchmarks/bench_lora.py [--dim 512] [--depth 8] [--batch 4] [--seq 64]
    python benchmarks/bench_lora.py --rounds 0          # memory only (compile, no steps)
"""

from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxq
from jaxq import lora

VOCAB = 1024
METHODS = ("full", "lora", "qlora")


class Block(nn.Module):
  """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP (4x)."""
  heads: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(nn.Dense(3 * d, name="qkv")(nn.LayerNorm()(x)), 3, axis=-1)
    split_heads = lambda z: z.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
    att = jax.nn.dot_product_attention(split_heads(q), split_heads(k), split_heads(v),
                                       is_causal=True)
    x = x + nn.Dense(d, name="out")(att.reshape(b, t, d))
    h = nn.gelu(nn.Dense(4 * d, name="fc1")(nn.LayerNorm()(x)))
    return x + nn.Dense(d, name="fc2")(h)


class LM(nn.Module):
  dim: int
  depth: int
  heads: int

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(VOCAB, self.dim, name="embed")(ids)
    for i in range(self.depth):
      x = Block(self.heads, name=f"block{i}")(x)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm()(x))


def tree_bytes(tree) -> int:
  return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree))


def setup(method, model, params, ids, args):
  """``(step, trainable, opt_state, frozen)``: ``step(trainable, opt_state, frozen, ids,
  labels) -> (trainable, opt_state, loss)`` jitted with the first two donated."""
  tx = optax.adamw(1e-4)
  if method == "full":
    apply, trainable, frozen = (lambda p, rest, x: model.apply({"params": p}, x)), params, {}
  else:
    adapter = jaxq.LoRA(args.rank)
    nf4 = jaxq.QuantSpec(bits=4, scheme="nf4", granularity="group",
                         group_size=args.group_size)
    qmodel = jaxq.quantize_model(model, [jaxq.Rule(
        r"block\d+/(qkv|out|fc1|fc2)", weight=nf4 if method == "qlora" else None,
        lora=adapter)])
    p = jax.jit(lambda p: jaxq.flax.init_quant_params(
        qmodel, {"params": p}, ids[:1], rngs={"params": jax.random.key(1)})["params"])(params)
    if method == "qlora":
      p = jax.jit(lambda p: lora.freeze(qmodel, p))(p)
    trainable, frozen = lora.split(p)
    apply = lambda ad, rest, x: qmodel.apply({"params": lora.combine(ad, rest)}, x)  # noqa: E731

  def step(p, opt_state, rest, x, y):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        apply(p, rest, x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1)), trainable, jax.jit(tx.init)(trainable), frozen


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dim", type=int, default=512)
  p.add_argument("--depth", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=64)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--group-size", type=int, default=64)
  p.add_argument("--rounds", type=int, default=5, help="timed interleaved rounds")
  args = p.parse_args(argv)
  model = LM(args.dim, args.depth, args.heads)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, VOCAB, (args.batch, args.seq)), jnp.int32)
  labels = jnp.asarray(rng.integers(0, VOCAB, (args.batch, args.seq)), jnp.int32)
  params = jax.jit(lambda x: model.init(jax.random.key(0), x)["params"])(ids[:1])
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))

  runs, rows = {}, {}
  for method in METHODS:
    step, trainable, opt_state, frozen = setup(method, model, params, ids, args)
    compiled = step.lower(trainable, opt_state, frozen, ids, labels).compile()
    mem = compiled.memory_analysis()
    rows[method] = dict(
        trainable=sum(x.size for x in jax.tree_util.tree_leaves(trainable)),
        weights=tree_bytes((trainable, frozen)), opt=tree_bytes(opt_state),
        args=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes, times=[])
    runs[method] = [compiled, trainable, opt_state, frozen]
  for r in range(args.rounds + 1):  # round 0 warms up
    for method, run in runs.items():
      compiled, trainable, opt_state, frozen = run
      t0 = time.perf_counter()
      trainable, opt_state, loss = compiled(trainable, opt_state, frozen, ids, labels)
      jax.block_until_ready(loss)
      if r:
        rows[method]["times"].append(time.perf_counter() - t0)
      run[1:3] = trainable, opt_state

  mib = lambda b: b / 2**20  # noqa: E731
  full = rows["full"]
  print(f"{n / 1e6:.1f}M parameters (dim {args.dim}, depth {args.depth}), batch "
        f"{args.batch} x {args.seq} tokens, rank {args.rank}, NF4 groups of "
        f"{args.group_size}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, load "
        f"average {os.getloadavg()[0]:.1f}, {args.rounds} interleaved rounds")
  print("| method | trainable | weights MiB | opt state MiB | arguments MiB | vs full | "
        "temporaries MiB | args + temps MiB | vs full | step s (median) | vs lora |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for method, r in rows.items():
    total = r["args"] + r["temp"]
    t = (f"{np.median(r['times']):.3f} | "
         f"{np.median(r['times']) / np.median(rows['lora']['times']):.2f}x"
         if args.rounds else "- | -")
    print(f"| {method} | {r['trainable']:,} | {mib(r['weights']):.1f} | {mib(r['opt']):.1f} "
          f"| {mib(r['args']):.1f} | {r['args'] / full['args']:.3f}x | {mib(r['temp']):.1f} "
          f"| {mib(total):.1f} | {total / (full['args'] + full['temp']):.3f}x | {t} |")
  return rows


if __name__ == "__main__":
  main()
