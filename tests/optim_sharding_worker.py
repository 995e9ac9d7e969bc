"""jaxq.optim.adamw on 8 simulated CPU devices vs one device; prints one JSON object.

Started by ``tests/test_optim_lowbit.py`` in a subprocess (the device count is fixed when
JAX starts). For 8-bit and 4-bit states: the params are laid out on a 4x2 ("data",
"model") mesh (kernels split over "model", :func:`jaxq.sharding.param_shardings`), the
optimizer state with :func:`jaxq.sharding.opt_state_shardings`; the same gradients go
through the jitted update sharded and on one device, and the worker reports the largest
update / parameter differences, the fraction of differing state codes, and the
PartitionSpec of every state leaf.

Run by hand: ``python tests/optim_sharding_worker.py``.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxq import optim, sharding  # noqa: E402
from jaxq.params import key_name  # noqa: E402

STEPS = 4


def _params():
  keys = jax.random.split(jax.random.key(0), 3)
  return {"row": {"kernel": jax.random.normal(keys[0], (32, 512))},  # row-aligned blocks
          "flat": {"kernel": jax.random.normal(keys[1], (64, 100))},  # blocks cross rows
          "small": {"bias": jax.random.normal(keys[2], (512,))}}  # float moments


def _run(tx, params, grads, shardings):
  state = tx.init(params)
  if shardings is not None:
    params_sh, state_sh = shardings
    params = jax.device_put(params, params_sh)
    state = jax.device_put(state, state_sh)
    grads = [jax.device_put(g, params_sh) for g in grads]
    step = jax.jit(lambda g, s, p: tx.update(g, s, p),
                   out_shardings=(params_sh, state_sh))
  else:
    step = jax.jit(tx.update)
  updates = []
  for g in grads:
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
    updates.append(u)
  return updates, params, state


def scenario(bits: int) -> dict:
  params = _params()
  grads = [jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.key(10 + i), p.shape),
                        params) for i in range(STEPS)]
  tx = optim.adamw(optax.linear_schedule(1e-2, 1e-3, STEPS), weight_decay=0.1,
                   state_bits=bits)
  mesh = sharding.make_mesh("data=4,model=2")
  params_sh = sharding.param_shardings(params, mesh)
  state_sh = sharding.opt_state_shardings(tx, params, params_sh)
  u1, p1, s1 = _run(tx, params, grads, None)
  u8, p8, s8 = _run(tx, params, grads, (params_sh, state_sh))
  diff = lambda a, b: max(float(jnp.max(jnp.abs(x - y)))  # noqa: E731
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  codes = [(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(s1),
                                                          jax.tree.leaves(s8))
           if a.dtype == np.uint8]
  specs = {"/".join(key_name(k) for k in path): str(leaf.sharding.spec)
           for path, leaf in jax.tree_util.tree_leaves_with_path(s8)}
  return {"update_diff": max(diff(a, b) for a, b in zip(u1, u8)),
          "param_diff": diff(p1, p8),
          "code_mismatch": float(np.mean(np.concatenate([(a != b).ravel()
                                                         for a, b in codes]))),
          "state_specs": specs,
          "devices": len({d for leaf in jax.tree.leaves(s8) for d in leaf.devices()})}


def main():
  print("JSON:" + json.dumps({f"bits{b}": scenario(b) for b in (8, 4)}))


if __name__ == "__main__":
  main()
