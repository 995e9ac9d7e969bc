"""W8A8 quantization-aware training on a device mesh, checked against one device.

    python examples/sharded.py                      # 8 simulated CPU devices, 4 x 2 mesh
    python examples/sharded.py --mesh data=8

Without accelerators, XLA can split the CPU into devices
(``--xla_force_host_platform_device_count``; set below before JAX starts). The batch is
split over the mesh axis "data", kernels over "model" (output features); optimizer
moments follow their parameters (``jaxq.sharding``). ``jax.jit`` runs the same program on
the mesh: jaxq's observers see the global batch, the int8 matmuls run per shard, and the
losses equal the one-device run's to float rounding. See docs/scaling.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402  (JAX reads XLA_FLAGS once, when it starts)
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import jaxq  # noqa: E402
import jaxq.sharding  # noqa: E402

RULES = [jaxq.Rule(".*", weight=jaxq.QuantSpec(8),
                   act=jaxq.QuantSpec(8, granularity="tensor", calibration="ema"))]


class MLP(nn.Module):
  hidden: int = 256

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(16)(x)  # 10 classes, padded to divide the "model" axis


def make_train_step(model, tx):
  def train_step(variables, opt_state, x, y):
    def loss_fn(params):
      logits, stats = model.apply({**variables, "params": params}, x, mutable=["quant_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    return {"params": optax.apply_updates(variables["params"], updates), **stats}, opt_state, loss
  return train_step


def run(model, tx, variables, batches, mesh=None) -> list[float]:
  """The losses of training ``variables`` on ``batches``, on ``mesh`` or one device."""
  train_step = make_train_step(model, tx)
  if mesh is None:
    step, opt_state = jax.jit(train_step), tx.init(variables["params"])
  else:
    replicated = NamedSharding(mesh, PartitionSpec())
    param_sh = jaxq.sharding.param_shardings(variables["params"], mesh)  # kernels: "model"
    var_sh = {"params": param_sh, "quant_stats": jax.tree.map(lambda _: replicated,
                                                              variables["quant_stats"])}
    opt_sh = jaxq.sharding.opt_state_shardings(tx, variables["params"], param_sh)
    variables = jax.device_put(variables, var_sh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(variables["params"])
    step = jax.jit(train_step, out_shardings=(var_sh, opt_sh, replicated))
    batches = [tuple(jax.device_put(a, jaxq.sharding.batch_sharding(mesh, a.ndim)) for a in b)
               for b in batches]
  losses = []
  for x, y in batches:
    variables, opt_state, loss = step(variables, opt_state, x, y)
    losses.append(float(loss))
  if mesh is not None:
    kernel = variables["params"]["Dense_0"]["kernel"]
    print(f"Dense_0 kernel {kernel.shape}: {kernel.sharding.spec}, "
          f"per device {kernel.addressable_shards[0].data.shape}")
  return losses


def main(argv: Sequence[str] | None = None) -> dict:
  """Returns the losses on the mesh and on one device, and the mesh's shape."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--mesh", default="data=4,model=2")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--batch-size", type=int, default=128)
  args = p.parse_args(argv)

  mesh = jaxq.sharding.make_mesh(args.mesh)
  d = load_digits()
  x = ((d.data - d.data.mean()) / d.data.std()).astype(np.float32)
  rng = np.random.default_rng(0)
  batches = [(x[idx], d.target[idx].astype(np.int32))
             for idx in (rng.choice(len(x), args.batch_size, replace=False)
                         for _ in range(args.steps))]
  model = jaxq.quantize_model(MLP(), RULES)
  # Weights from the float model, observers from the first batch.
  variables = jaxq.flax.init_quant_params(
      model, MLP().init(jax.random.key(0), x[:1]), batches[0][0])
  tx = optax.adamw(1e-3)
  sharded = run(model, tx, variables, batches, mesh)
  single = run(model, tx, variables, batches)
  diff = max(abs(a - b) / abs(b) for a, b in zip(sharded, single))
  print(f"mesh {dict(mesh.shape)} on {jax.device_count()} devices: loss "
        f"{sharded[0]:.4f} -> {sharded[-1]:.4f}; max relative difference from one device "
        f"{diff:.1e}")
  return {"mesh": dict(mesh.shape), "sharded_losses": sharded, "single_losses": single}


if __name__ == "__main__":
  main(sys.argv[1:])
