"""Compile cost of the jaxq flow on a MobileNetV2-like Linen model (CPU).

Reports, for W8A8 rules on every Conv/Dense (per-channel int8 weights, static per-tensor
int8 activations), the seconds to:

* compile the QAT train step (``jax.jit(value_and_grad(loss)).lower().compile()``), and
  the number of fusions and ``is-finite`` ops in its optimized HLO;
* ``jaxq.calibrate`` on 2 batches, a first call and a second call with the same shapes
  (a second call that compiles again shows up as a second time close to the first);
* ``jaxq.convert`` (the weights quantized to int8 QArrays);
* compile the serving function, with its fusion / ``is-finite`` counts.

The numbers are wall-clock seconds on a shared CPU: compare "before" and "after" from
runs made side by side. "Before" runs the same script against another checkout:

  PYTHONPATH=. python benchmarks/bench_compile.py               # this checkout
  PYTHONPATH=/path/to/main python benchmarks/bench_compile.py   # e.g. main's code
"""

from __future__ import annotations

import argparse
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxq
from jaxq.spec import QuantSpec, Rule

# MobileNetV2 (Sandler et al. 2018): (expansion t, channels c, repeats n, stride s).
_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1))


def _c(ch: int, width: float) -> int:
  return max(8, int(round(ch * width / 8)) * 8)


class InvertedResidual(nn.Module):
  expand: int
  out: int
  stride: int

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
    cin = x.shape[-1]
    y = x
    if self.expand != 1:
      y = nn.relu6(bn()(nn.Conv(cin * self.expand, (1, 1), use_bias=False)(y)))
    ch = y.shape[-1]
    y = nn.Conv(ch, (3, 3), strides=self.stride, feature_group_count=ch, use_bias=False)(y)
    y = nn.relu6(bn()(y))
    y = bn()(nn.Conv(self.out, (1, 1), use_bias=False)(y))
    return x + y if self.stride == 1 and cin == self.out else y


class MobileNetV2(nn.Module):
  width: float = 0.5
  classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(_c(32, self.width), (3, 3), strides=2, use_bias=False)(x)
    x = nn.relu6(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for t, c, n, s in _BLOCKS:
      for i in range(n):
        x = InvertedResidual(t, _c(c, self.width), s if i == 0 else 1)(x, train)
    x = nn.Conv(_c(1280, self.width), (1, 1), use_bias=False)(x)
    x = nn.relu6(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    return nn.Dense(self.classes)(x.mean(axis=(1, 2)))


def _hlo_counts(compiled) -> tuple[int, int]:
  text = compiled.as_text()
  return len(re.findall(r" fusion\(", text)), len(re.findall(r"is-finite\(", text))


def _timed(fn):
  t = time.perf_counter()
  out = fn()
  jax.block_until_ready(jax.tree_util.tree_leaves(out))
  return out, time.perf_counter() - t


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--width", type=float, default=0.5)
  ap.add_argument("--size", type=int, default=32)
  ap.add_argument("--batch", type=int, default=8)
  a = ap.parse_args()

  model = MobileNetV2(width=a.width)
  x = jax.random.normal(jax.random.key(0), (a.batch, a.size, a.size, 3))
  y = jnp.zeros((a.batch,), jnp.int32)
  variables = jax.jit(lambda k: model.init(k, x))(jax.random.key(1))
  rules = [Rule(".*", weight=QuantSpec(8), act=QuantSpec(8, granularity="tensor"))]
  qmodel = jaxq.quantize_model(model, rules)
  tx = optax.sgd(1e-3)

  def train_step(v, opt, xb, yb):
    def loss(p):
      logits, st = qmodel.apply({**v, "params": p}, xb, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), st
    (l, st), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
    upd, opt = tx.update(g, opt, v["params"])
    return {**v, **st, "params": optax.apply_updates(v["params"], upd)}, opt, l

  opt = tx.init(variables["params"])
  t = time.perf_counter()
  qat = jax.jit(train_step).lower(variables, opt, x, y).compile()
  t_qat = time.perf_counter() - t
  qat_fusions, qat_finite = _hlo_counts(qat)

  batches = [x, x * 0.5]
  cv, t_cal1 = _timed(lambda: jaxq.calibrate(qmodel, variables, batches, train=False))
  _, t_cal2 = _timed(lambda: jaxq.calibrate(qmodel, variables, batches, train=False))
  (sm, sv), t_conv = _timed(lambda: jaxq.convert(qmodel, cv))
  t = time.perf_counter()
  serve = jax.jit(lambda v, xb: sm.apply(v, xb, train=False)).lower(sv, x).compile()
  t_serve = time.perf_counter() - t
  serve_fusions, serve_finite = _hlo_counts(serve)

  n_convs = sum(1 for k in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
                if "kernel" in jax.tree_util.keystr(k[0]))
  print(f"jaxq from {jaxq.__file__}")
  print(f"MobileNetV2 width {a.width}, {a.size}x{a.size}, batch {a.batch}, "
        f"{n_convs} kernels, W8A8")
  print("| stage | seconds | fusions | is-finite |")
  print("|---|---:|---:|---:|")
  print(f"| QAT train step compile | {t_qat:.1f} | {qat_fusions} | {qat_finite} |")
  print(f"| calibrate, 1st call | {t_cal1:.1f} | | |")
  print(f"| calibrate, 2nd call (same shapes) | {t_cal2:.1f} | | |")
  print(f"| convert | {t_conv:.1f} | | |")
  print(f"| serving compile | {t_serve:.1f} | {serve_fusions} | {serve_finite} |")


if __name__ == "__main__":
  main()
