"""Fine-tune a pretrained transformer three ways: full, LoRA and QLoRA (NF4 base).

    python examples/qlora_finetune.py                     # a minute or two on a CPU
    python examples/qlora_finetune.py --rank 4 --plot /tmp/curves.png

1. Pretrain a small transformer classifier in float, in this run, on scikit-learn's 8x8
   digits (each image a sequence of 8 row tokens).
2. The shifted task: the same digits rotated by 90 degrees. The pretrained model is
   near chance on it, but its pixel and stroke features still help.
3. Fine-tune on the shifted task with
   * full fine-tuning: optax.adamw on every parameter;
   * LoRA (Hu et al. 2021): ``jaxq.quantize_model`` gives every Dense layer an adapter,
     ``W + (alpha / r) A B``; only A and B train (``jaxq.lora.trainable``);
   * QLoRA (Dettmers et al. 2023): the same, with the transformer blocks' kernels
     frozen as NF4 QArrays (``jaxq.lora.freeze``: 4-bit codes and a float32 absmax per
     group of 64), so the train state holds no float copy of them.

Prints accuracy, trainable parameters, train-state bytes (parameters and optimizer
state, summed over the actual pytrees) and step time side by side, and saves the loss
curves to ``--plot``.
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
from tqdm import tqdm

import jaxq
from jaxq import lora

METHODS = ("full", "lora", "qlora")


class Block(nn.Module):
  """Pre-LayerNorm transformer block: self-attention, then a GELU MLP."""
  heads: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(nn.Dense(3 * d, name="qkv")(nn.LayerNorm()(x)), 3, axis=-1)
    split_heads = lambda z: z.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
    att = jax.nn.dot_product_attention(split_heads(q), split_heads(k), split_heads(v))
    x = x + nn.Dense(d, name="out")(att.reshape(b, t, d))
    h = nn.gelu(nn.Dense(2 * d, name="fc1")(nn.LayerNorm()(x)))
    return x + nn.Dense(d, name="fc2")(h)


class Classifier(nn.Module):
  """Row tokens -> learned positions -> blocks -> mean-pooled linear head."""
  dim: int = 64
  depth: int = 2
  heads: int = 4

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.dim, name="embed")(x)
    x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:])
    for i in range(self.depth):
      x = Block(self.heads, name=f"block{i}")(x)
    return nn.Dense(10, name="head")(nn.LayerNorm()(x).mean(axis=1))


def load_digits(seed: int):
  """Standardised digits ``(N, 8, 8)`` and labels, split 75 / 25 at random."""
  from sklearn.datasets import load_digits as sk_digits  # pylint: disable=import-outside-toplevel
  x, y = sk_digits(return_X_y=True)
  x = ((x - x.mean()) / x.std()).reshape(-1, 8, 8).astype(np.float32)
  order = np.random.default_rng(seed).permutation(len(x))
  train, test = np.split(order, [len(x) * 3 // 4])
  return (x[train], y[train]), (x[test], y[test])


def rotate(data):
  """The shifted task: each image rotated by 90 degrees, the same labels."""
  return np.ascontiguousarray(np.rot90(data[0], axes=(1, 2))), data[1]


def tree_size(tree) -> int:
  return sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree))


def tree_bytes(tree) -> int:
  """Bytes of every array in ``tree`` (a QArray counts its packed codes and scales)."""
  return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree))


@functools.partial(jax.jit, static_argnums=0)
def predict(apply, params, x):
  return jnp.argmax(apply(params, x), axis=-1)


def accuracy(apply, params, data) -> float:
  return 100.0 * np.mean(np.asarray(predict(apply, params, data[0])) == data[1])


def train(name, apply, params, tx, data, steps, args):
  """``steps`` of ``tx`` on ``params`` (whatever ``apply`` differentiates: the model's
  params or the adapters alone) on random batches of ``data`` (the same batches for
  every call). Returns the params, optimizer state, losses and seconds per step (after
  the compiled first step)."""

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

  @jax.jit
  def step(p, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss

  rng = np.random.default_rng(args.seed)
  state, losses = jax.jit(tx.init)(params), []
  for i in tqdm(range(steps), desc=name, leave=False, disable=args.quiet):
    batch = rng.choice(len(data[1]), args.batch_size, replace=False)
    params, state, loss = step(params, state, data[0][batch], data[1][batch])
    losses.append(float(loss))  # waits for the step
    if i == 0:
      start = time.perf_counter()
  return params, state, losses, (time.perf_counter() - start) / max(steps - 1, 1)


def finetune(method, model, pretrained, data, args):
  """One fine-tuning method from the pretrained params: ``(apply, params, opt state,
  trainable count, losses, seconds per step)``, ``params`` as ``apply`` takes them."""
  if method == "full":
    apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    params, state, losses, sec = train(method, apply, pretrained, optax.adamw(args.lr),
                                       data, args.steps, args)
    return apply, params, state, tree_size(params), losses, sec
  adapter = jaxq.LoRA(args.rank, alpha=2.0 * args.rank)
  blocks, rest = r"block\d+/(qkv|out|fc1|fc2)", "embed|head"
  nf4 = jaxq.QuantSpec(bits=4, scheme="nf4", granularity="group", group_size=args.group_size)
  qmodel = jaxq.quantize_model(model, [
      jaxq.Rule(blocks, weight=nf4 if method == "qlora" else None, lora=adapter),
      jaxq.Rule(rest, weight=None, lora=adapter)])  # small layers: float base
  apply = lambda p, x: qmodel.apply({"params": p}, x)  # noqa: E731
  params = jax.jit(lambda p: jaxq.flax.init_quant_params(  # adds A, and B = 0
      qmodel, {"params": p}, data[0][:1],
      rngs={"params": jax.random.key(args.seed + 1)})["params"])(pretrained)
  trainable = tree_size(lora.split(params)[0])
  if method == "lora":  # AdamW on the adapters, zero updates elsewhere
    tx = optax.multi_transform({True: optax.adamw(args.lora_lr), False: optax.set_to_zero()},
                               lora.trainable(params))
    params, state, losses, sec = train(method, apply, params, tx, data, args.steps, args)
    return apply, params, state, trainable, losses, sec
  # QLoRA: NF4 QArray kernels (integer leaves): differentiate the adapters alone.
  adapters, frozen = lora.split(jax.jit(lambda p: lora.freeze(qmodel, p))(params))
  apply_adapters = lambda ad, x: apply(lora.combine(ad, frozen), x)  # noqa: E731
  adapters, state, losses, sec = train(method, apply_adapters, adapters,
                                       optax.adamw(args.lora_lr), data, args.steps, args)
  return apply, lora.combine(adapters, frozen), state, trainable, losses, sec


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--pretrain-steps", type=int, default=600)
  p.add_argument("--steps", type=int, default=400, help="fine-tuning steps per method")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--lr", type=float, default=1e-3, help="pretraining and full fine-tuning")
  p.add_argument("--lora-lr", type=float, default=5e-3)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--group-size", type=int, default=64, help="NF4 absmax group size")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--plot", default="/tmp/qlora_finetune.png")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  args = p.parse_args(argv)
  digits, digits_test = load_digits(args.seed)
  shifted, shifted_test = rotate(digits), rotate(digits_test)

  model = Classifier(args.dim, args.depth)
  apply = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  init = jax.jit(lambda x: model.init(jax.random.key(args.seed), x)["params"])
  pretrained, *_ = train("pretrain", apply, init(digits[0][:1]), optax.adamw(args.lr), digits,
                         args.pretrain_steps, args)
  results = {"pretrained": {"params": pretrained,
                            "digits": accuracy(apply, pretrained, digits_test),
                            "accuracy": accuracy(apply, pretrained, shifted_test)}}
  for method in METHODS:
    apply, params, state, trainable, losses, sec = finetune(method, model, pretrained,
                                                            shifted, args)
    results[method] = dict(accuracy=accuracy(apply, params, shifted_test), params=params,
                           trainable=trainable, state_bytes=tree_bytes((params, state)),
                           step_seconds=sec, losses=losses)
  report(results, args.plot)
  return results


def report(results, plot_path):
  """The side-by-side table, and the loss curves saved to ``plot_path``."""
  pre = results["pretrained"]
  print(f"pretrained: {pre['digits']:.1f}% on digits, {pre['accuracy']:.1f}% on the "
        "rotated digits")
  print(f"{'method':8}{'accuracy %':>12}{'trainable':>12}{'state bytes':>14}{'step ms':>10}")
  for m in METHODS:
    r = results[m]
    print(f"{m:8}{r['accuracy']:12.1f}{r['trainable']:12,d}{r['state_bytes']:14,d}"
          f"{1e3 * r['step_seconds']:10.1f}")
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  for m in METHODS:
    ax.plot(results[m]["losses"], label=m)
  ax.set(xlabel="fine-tuning step", ylabel="train loss", yscale="log",
         title="Fine-tuning on rotated digits")
  ax.legend()
  fig.savefig(plot_path, dpi=100)
  plt.close(fig)
  print(f"loss curves: {plot_path}")


if __name__ == "__main__":
  main()
