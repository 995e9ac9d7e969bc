"""Cross-layer equalization on a MobileNetV2-like net: per-tensor W8 (and W8A8) error.

The net: a stem conv, inverted residual blocks (1x1 expand -> BN -> ReLU -> 3x3
depthwise -> BN -> ReLU -> 1x1 project -> BN, residual where shapes allow), a 1x1 conv,
mean pooling and a Dense, all Conv+BN without conv bias (as torchvision's MobileNetV2). The
weights are random (no downloads); a pretrained net's hallmark, per-channel weight ranges
spanning orders of magnitude after BatchNorm folding (Nagel et al. 2019, fig. 2), is made
by rescaling each CLE pair's channels by factors log-uniform in ``[1 / spread, 1]``
(compensated in the next layer, so the float function is unchanged). Then
``fold_batchnorm -> find_equalization_pairs -> equalize``, and the relative L2 error of
the output against the float net, with symmetric int8 weights per tensor (before and after
CLE) and per channel (the reference CLE tries to approach), weights only and with
per-tensor asymmetric uint8 activations at every Conv/Dense input (dynamic min-max).

  PYTHONPATH=. python benchmarks/exp_cle.py [--seeds 5] [--spreads 1,10,100,1000]
"""

from __future__ import annotations

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxq
from jaxq import fold

# (expansion t, channels c, repeats n, first stride s): MobileNetV2's table, scaled down.
BLOCKS = ((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 3, 2), (6, 32, 2, 2), (6, 48, 2, 1))


class InvertedResidual(nn.Module):
  out: int
  expand: int
  stride: int

  @nn.compact
  def __call__(self, x, train=False):
    bn = functools.partial(nn.BatchNorm, use_running_average=not train)
    h = x
    if self.expand != 1:
      h = nn.relu(bn()(nn.Conv(x.shape[-1] * self.expand, (1, 1), use_bias=False)(h)))
    c = h.shape[-1]
    h = nn.relu(bn()(nn.Conv(c, (3, 3), self.stride, feature_group_count=c,
                             use_bias=False)(h)))
    h = bn()(nn.Conv(self.out, (1, 1), use_bias=False)(h))
    return x + h if self.stride == 1 and x.shape[-1] == self.out else h


class MobileNetLike(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    bn = functools.partial(nn.BatchNorm, use_running_average=not train)
    x = nn.relu(bn()(nn.Conv(16, (3, 3), 2, use_bias=False)(x)))
    for t, c, n, s in BLOCKS:
      for i in range(n):
        x = InvertedResidual(c, t, s if i == 0 else 1)(x)
    x = nn.relu(bn()(nn.Conv(128, (1, 1), use_bias=False)(x)))
    return nn.Dense(10)(x.mean((1, 2)))


def random_variables(model, x, r):
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)

  def draw(path, a):
    name = path[-1].key
    if name == "kernel":
      return r.normal(size=a.shape) * np.sqrt(2.0 / np.prod(a.shape[:-1]))
    if name in ("scale", "var"):
      return r.uniform(0.5, 2.0, a.shape)
    return r.normal(size=a.shape) * 0.1

  v = jax.tree_util.tree_map_with_path(lambda p, a: np.asarray(draw(p, a), np.float32),
                                       shapes)
  return v["params"], v["batch_stats"]


def _at(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def unbalance(params, pairs, spread, r):
  """Channel ``i`` of each pair's first layer (and its biases) times ``c_i``, the weights of
  the second layer reading it divided by ``c_i``: the same function (ReLU between)."""
  out = jax.tree.map(lambda a: np.array(a, np.float64), params)
  for first, second, biases in pairs:
    k1 = _at(out, first)["kernel"]
    channels = k1.shape[-1]
    c = np.exp(r.uniform(-np.log(spread), 0.0, channels))
    _at(out, first)["kernel"] = k1 * c
    for owner in biases:
      _at(out, owner)["bias"] = _at(out, owner)["bias"] * c
    k2 = _at(out, second)["kernel"]
    per, groups = k2.shape[-2], channels // k2.shape[-2]
    m = np.repeat((1 / c).reshape(groups, per).T, k2.shape[-1] // groups, axis=1)
    _at(out, second)["kernel"] = k2 * m
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), out)


def int8_weights(params, per_channel):
  def q(path, a):
    if path[-1].key != "kernel":
      return a
    w = np.asarray(a, np.float64)
    axes = tuple(range(w.ndim - 1)) if per_channel else None
    s = np.maximum(np.abs(w).max(axis=axes, keepdims=per_channel), 1e-30) / 127.0
    return jnp.asarray(np.clip(np.round(w / s), -127, 127) * s, jnp.float32)

  return jax.tree_util.tree_map_with_path(q, params)


def _act_quant_interceptor(next_fun, args, kwargs, context):
  """Per-tensor asymmetric uint8 fake quantization of every Conv/Dense input."""
  if context.method_name == "__call__" and isinstance(context.module, (nn.Conv, nn.Dense)):
    x = args[0]
    lo, hi = jnp.minimum(x.min(), 0.0), jnp.maximum(x.max(), 0.0)
    scale = jnp.maximum(hi - lo, 1e-12) / 255.0
    zero_point = jnp.round(-lo / scale)
    args = (jaxq.fake_quant(x, scale, zero_point, 0, 255),) + tuple(args[1:])
  return next_fun(*args, **kwargs)


def rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--spreads", default="1,10,100,1000")
  parser.add_argument("--batch", type=int, default=32)
  args = parser.parse_args()

  model = MobileNetLike()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, 32, 32, 3)), jnp.float32)
  bn_pairs = fold.find_conv_bn_pairs(model, x)
  folded = fold.FoldedBatchNorm(model, tuple(bn for _, bn in bn_pairs))

  def run(p, s, x):
    return folded.apply({"params": p, "batch_stats": s}, x)

  def run_a8(p, s, x):
    with nn.intercept_methods(_act_quant_interceptor):
      return run(p, s, x)

  run_w, run_wa = jax.jit(run), jax.jit(run_a8)
  cols = ["float, old equalize", "float after CLE", "W8 tensor", "W8 tensor + CLE",
          "W8 channel", "W8 channel + CLE", "W8A8 tensor", "W8A8 tensor + CLE",
          "W8A8 channel", "W8A8 channel + CLE"]
  print(f"{len(bn_pairs)} Conv+BN folded; relative L2 error of the output vs float, mean "
        f"(std) over {args.seeds} seeds")
  print("| spread | pairs (old) | " + " | ".join(cols) + " |")
  print("|---" * (len(cols) + 2) + "|")
  for spread in [float(v) for v in args.spreads.split(",")]:
    rows = []
    for seed in range(args.seeds):
      r = np.random.default_rng(1000 + seed)
      params, stats = random_variables(model, x, r)
      fparams, fstats = fold.fold_batchnorm(params, stats, bn_pairs)
      pairs = fold.find_equalization_pairs(lambda p, x: run(p, fstats, x), fparams, x)
      fparams = unbalance(fparams, pairs, spread, r)
      eparams = fold.equalize(fparams, pairs)
      y = run_w(fparams, fstats, x)
      # What equalize did before: pairs with a depthwise second layer were refused, the
      # folded BatchNorm shifts of the others were left unscaled.
      old = [(p.first, p.second) for p in pairs
             if _at(fparams, p.second)["kernel"].shape[-2] > 1]
      t = functools.partial(int8_weights, per_channel=False)
      c = functools.partial(int8_weights, per_channel=True)
      rows.append([
          rel_l2(run_w(fold.equalize(fparams, old), fstats, x), y),
          rel_l2(run_w(eparams, fstats, x), y),
          rel_l2(run_w(t(fparams), fstats, x), y), rel_l2(run_w(t(eparams), fstats, x), y),
          rel_l2(run_w(c(fparams), fstats, x), y), rel_l2(run_w(c(eparams), fstats, x), y),
          rel_l2(run_wa(t(fparams), fstats, x), y), rel_l2(run_wa(t(eparams), fstats, x), y),
          rel_l2(run_wa(c(fparams), fstats, x), y), rel_l2(run_wa(c(eparams), fstats, x), y)])
    mean, std = np.mean(rows, 0), np.std(rows, 0)
    cells = [f"{m:.1e}" if i == 1 else f"{m:.4f} ({s:.4f})"
             for i, (m, s) in enumerate(zip(mean, std))]
    print(f"| {spread:g} | {len(pairs)} ({len(old)}) | " + " | ".join(cells) + " |",
          flush=True)


if __name__ == "__main__":
  main()
