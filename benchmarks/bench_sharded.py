"""Sharded training: step time and per-device memory, one device vs a device mesh.

Trains a small Linen ViT on random 8x8 images with optax Adam, float and W8A8 QAT
(``jaxq.quantize_model``, int8 forward matmuls), on one device and on a
("data", "model") mesh (batch over "data", kernels over "model", optimizer state
following the params). Reports, per configuration:

* ``step_ms``: median wall time of a jitted train step (after compilation);
* ``state_MiB/dev``: bytes of params + optimizer state actually resident on device 0;
* ``temp_MiB/dev``, ``args_MiB/dev``: XLA's ``memory_analysis()`` of the compiled step
  (per device: an SPMD program is compiled once per device).

On a CPU host the devices are simulated (``--xla_force_host_platform_device_count``):
they share the host's cores, so the mesh cannot be faster there; the memory columns are
the meaningful ones. On a GPU/TPU host the real devices are used.

  python benchmarks/bench_sharded.py [--mesh data=4,model=2] [--dim 128] [--batch 256]
"""

from __future__ import annotations

import argparse
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxq  # noqa: E402
from jaxq import sharding  # noqa: E402
from jaxq.spec import QuantSpec, Rule  # noqa: E402
from _models import TinyViT, cross_entropy  # noqa: E402

MiB = 2.0**20


def _state_bytes_dev0(tree) -> int:
  dev = jax.devices()[0]
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    for sh in leaf.addressable_shards:
      if sh.device == dev:
        total += sh.data.nbytes
  return total


def bench(model, quantized: bool, mesh, batch: int, steps: int):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=(batch,)), jnp.int32)
  m = model
  if quantized:
    m = jaxq.quantize_model(model, Rule(path=".*", weight=QuantSpec(),
                                        act=QuantSpec(granularity="tensor")))
  params = m.init(jax.random.key(0), x[:2])["params"]
  tx = optax.adam(1e-3)

  def step(state, xb, yb):
    p, opt = state
    loss, g = jax.value_and_grad(lambda p: cross_entropy(m.apply({"params": p}, xb), yb))(p)
    upd, opt = tx.update(g, opt, p)
    return (optax.apply_updates(p, upd), opt), loss

  if mesh is None:
    dev = jax.devices()[0]
    state = jax.device_put((params, tx.init(params)), dev)
    xb, yb = jax.device_put((x, y), dev)
    fn = jax.jit(step, donate_argnums=0)
  else:
    psh = sharding.param_shardings(params, mesh)
    p_s = jax.device_put(params, psh)
    osh = sharding.opt_state_shardings(tx, params, psh)
    state = (p_s, jax.jit(tx.init, out_shardings=osh)(p_s))
    xb = jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
    yb = jax.device_put(y, sharding.batch_sharding(mesh, 1))
    fn = jax.jit(step, out_shardings=((psh, osh), None), donate_argnums=0)
  compiled = fn.lower(state, xb, yb).compile()
  ma = compiled.memory_analysis()
  state, loss = fn(state, xb, yb)
  loss.block_until_ready()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, loss = fn(state, xb, yb)
    loss.block_until_ready()
    times.append(time.perf_counter() - t0)
  return {
      "step_ms": 1e3 * float(np.median(times)),
      "state_MiB/dev": _state_bytes_dev0(state) / MiB,
      "args_MiB/dev": getattr(ma, "argument_size_in_bytes", 0) / MiB,
      "temp_MiB/dev": getattr(ma, "temp_size_in_bytes", 0) / MiB,
      "loss": float(loss),
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--mesh", default="data=4,model=2")
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--depth", type=int, default=2)
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--steps", type=int, default=10)
  args = ap.parse_args()
  model = TinyViT(dim=args.dim, depth=args.depth, heads=4, mlp=4 * args.dim)
  mesh = sharding.make_mesh(args.mesh, devices=jax.devices()[
      :int(np.prod(list(sharding.parse_mesh(args.mesh).values())))])
  print(f"# {jax.device_count()} x {jax.devices()[0].device_kind}; TinyViT dim={args.dim} "
        f"depth={args.depth}, batch {args.batch}, adam; mesh {dict(mesh.shape)}")
  cols = ["step_ms", "state_MiB/dev", "args_MiB/dev", "temp_MiB/dev", "loss"]
  print(f"{'config':<18}" + "".join(f"{c:>15}" for c in cols))
  for quantized in (False, True):
    for name, msh in (("1 device", None), (args.mesh, mesh)):
      r = bench(model, quantized, msh, args.batch, args.steps)
      label = f"{'W8A8' if quantized else 'float'} {name}"
      print(f"{label:<18}" + "".join(f"{r[c]:>15.3f}" for c in cols), flush=True)


if __name__ == "__main__":
  main()
