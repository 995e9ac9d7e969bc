"""Optimizer state bytes and step time: jaxq.optim.adamw (8-bit / 4-bit) vs optax.adamw.

A ~25M-parameter model: ``--layers`` Dense kernels of ``--width x 4*--width`` and
``4*--width x --width`` (a transformer MLP stack) with biases. One "step" is the jitted
optimizer update plus ``optax.apply_updates`` (gradients given; params and state
donated, as in a train step, unless ``--no-donate``). All optimizers run in ONE process, interleaved round-robin (machine load
affects them alike); the median time of each is printed with its ratio to optax.adamw.

  python benchmarks/bench_optim.py [--width 1024] [--layers 3] [--rounds 15]
  python benchmarks/bench_optim.py --no-donate
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxq import optim


def make_params(width: int, layers: int):
  key = jax.random.key(0)
  params = {}
  for i in range(layers):
    k1, k2, key = jax.random.split(key, 3)
    params[f"block{i}"] = {
        "up": {"kernel": jax.random.normal(k1, (width, 4 * width)) * 0.02,
               "bias": jnp.zeros(4 * width)},
        "down": {"kernel": jax.random.normal(k2, (4 * width, width)) * 0.02,
                 "bias": jnp.zeros(width)}}
  return params


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--width", type=int, default=1024)
  p.add_argument("--layers", type=int, default=3)
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--donate", action=argparse.BooleanOptionalAction, default=True,
                 help="donate params and optimizer state to the jitted step")
  args = p.parse_args(argv)
  params = make_params(args.width, args.layers)
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape) * 1e-3,
                       params)
  n = sum(x.size for x in jax.tree.leaves(params))
  txs = {"optax.adamw": optax.adamw(1e-3),
         "jaxq adamw 8-bit": optim.adamw(1e-3, state_bits=8),
         "jaxq adamw 4-bit": optim.adamw(1e-3, state_bits=4)}
  runs = {}
  for name, tx in txs.items():
    def step(params, state, grads, tx=tx):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    fn = jax.jit(step, donate_argnums=(0, 1) if args.donate else ())
    p_copy = jax.tree.map(jnp.copy, params)
    state = tx.init(p_copy)
    p_copy, state = fn(p_copy, state, grads)  # compile + warm up
    jax.block_until_ready(state)
    runs[name] = [fn, p_copy, state, [], tree_bytes(state)]
  for _ in range(args.rounds):
    for name, run in runs.items():
      fn, p_copy, state = run[:3]
      t0 = time.perf_counter()
      p_copy, state = fn(p_copy, state, grads)
      jax.block_until_ready((p_copy, state))
      run[3].append(time.perf_counter() - t0)
      run[1], run[2] = p_copy, state
  base_t = np.median(runs["optax.adamw"][3])
  base_b = runs["optax.adamw"][4]
  print(f"{n / 1e6:.1f}M parameters, {args.rounds} interleaved rounds, "
        f"{'donated' if args.donate else 'not donated'}, {jax.devices()[0].platform}")
  print("| optimizer | state (MiB) | vs optax | step (ms, median) | vs optax |")
  print("|---|---:|---:|---:|---:|")
  for name, run in runs.items():
    t = np.median(run[3])
    print(f"| {name} | {run[4] / 2**20:.1f} | {run[4] / base_b:.3f}x | {t * 1e3:.1f} | "
          f"{t / base_t:.2f}x |")


if __name__ == "__main__":
  main()
