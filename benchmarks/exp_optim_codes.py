"""Which codes for the 8-bit / 4-bit AdamW moments? Trajectory distance to optax.adamw.

    python benchmarks/exp_optim_codes.py [--steps 200] [--seeds 2]

For every (first-moment code, second-moment code) pair of each width, trains two small
problems for ``--steps`` steps with :func:`jaxq.optim.adamw` and with ``optax.adamw``
from the same initialisation and batches, and prints (mean over seeds):

* ``traj``: ``||theta_T - theta_T^ref|| / ||theta_T^ref - theta_0||``, the distance to
  the float-state trajectory relative to the distance it travelled;
* ``loss``: final full-batch training loss / optax.adamw's.

Problems: an MLP 64-256-256-10 on sklearn's digits (kernels of 16K and 64K entries, blocks
row-aligned) and a tanh teacher-student regression 96-320-320-8 (blocks crossing rows).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxq.optim import adamw, codes  # noqa: E402

CANDIDATES = {
    8: ([codes.linear(8, signed=True), codes.exponent(8, 3, signed=True),
         codes.exponent(8, 4, signed=True)],
        [codes.linear(8, signed=False), codes.exponent(8, 3, signed=False),
         codes.exponent(8, 4, signed=False), codes.exponent(8, 5, signed=False)]),
    4: ([codes.linear(4, signed=True), codes.exponent(4, 2, signed=True),
         codes.exponent(4, 3, signed=True)],
        [codes.linear(4, signed=False), codes.exponent(4, 2, signed=False),
         codes.exponent(4, 3, signed=False), codes.exponent(4, 4, signed=False)]),
}


def mlp_init(key, sizes):
  keys = jax.random.split(key, len(sizes) - 1)
  return [{"w": jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), "b": jnp.zeros(b)}
          for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def mlp_apply(params, x, act):
  for layer in params[:-1]:
    x = act(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def digits_problem(seed):
  data = load_digits()
  x = jnp.asarray(data.data / 16.0, jnp.float32)
  y = jnp.asarray(data.target)

  def loss(params, idx):
    logits = mlp_apply(params, x[idx], jax.nn.relu)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

  return mlp_init(jax.random.key(seed), [64, 256, 256, 10]), loss, len(y), 3e-3


def regression_problem(seed):
  k_teacher, k_x, k_init = jax.random.split(jax.random.key(100 + seed), 3)
  teacher = mlp_init(k_teacher, [96, 64, 8])
  x = jax.random.normal(k_x, (2048, 96))
  y = mlp_apply(teacher, x, jnp.tanh)

  def loss(params, idx):
    return jnp.mean((mlp_apply(params, x[idx], jnp.tanh) - y[idx]) ** 2)

  return mlp_init(k_init, [96, 320, 320, 8]), loss, len(x), 1e-3


def train(tx, params, loss, n, steps, seed):
  order = np.random.default_rng(seed).integers(0, n, size=(steps, 64))

  @jax.jit
  def step(params, state, idx):
    grads = jax.grad(loss)(params, idx)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for idx in order:
    params, state = step(params, state, idx)
  return params, float(loss(params, jnp.arange(n)))


def distance(a, b):
  return float(optax.tree.norm(jax.tree.map(jnp.subtract, a, b)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--seeds", type=int, default=2)
  args = p.parse_args(argv)
  refs = {}
  for bits, (firsts, seconds) in CANDIDATES.items():
    for first, second in itertools.product(firsts, seconds):
      row = {"bits": bits, "m": first.name, "r": second.name}
      for name, problem in (("digits", digits_problem), ("regression", regression_problem)):
        traj, ratio = [], []
        for seed in range(args.seeds):
          p0, loss, n, lr = problem(seed)
          if (name, seed) not in refs:
            refs[name, seed] = train(optax.adamw(lr), p0, loss, n, args.steps, seed)
          ref, ref_loss = refs[name, seed]
          tx = adamw(lr, state_bits=bits, first_code=first, second_code=second)
          got, got_loss = train(tx, p0, loss, n, args.steps, seed)
          traj.append(distance(got, ref) / distance(ref, p0))
          ratio.append(got_loss / ref_loss)
        row[f"{name}_traj"], row[f"{name}_loss"] = np.mean(traj), np.mean(ratio)
      print(f"| {bits} | {row['m']} | {row['r']} | {row['digits_traj']:.3f} | "
            f"{row['digits_loss']:.3f} | {row['regression_traj']:.3f} | "
            f"{row['regression_loss']:.3f} |", flush=True)


if __name__ == "__main__":
  main()
