"""W4 serving of one Dense contraction through the kernels that
:func:`jaxq.layer.serve.quantized_contraction` now runs (``int4_matmul`` for per-channel
W4A8, ``int4_matmul_grouped`` for group-32 W4A8 and weight-only W4) vs dequantize +
float matmul (what it ran before), and symmetric dynamic W8A8 through
``int8_matmul_dynamic`` vs quantize-then-``int8_matmul`` (serving takes the first on
Pallas backends, the second on XLA).

Each pair is timed interleaved in one run (median of ``--iters`` jitted calls per
variant, alternating), so the ratio survives a shared machine's noise; absolute times
do not. On the CPU both sides run XLA (``jaxq.kernels`` "xla" backend: the kernels'
jnp references); the GPU (Pallas) ratio is not measured here.

  PYTHONPATH=. python benchmarks/bench_serve_int4.py [--k 1024] [--n 1024] [--iters 20]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import kernels
from jaxq import quantizer
from jaxq.layer import serve
from jaxq.layer.views import dot_general_contraction
from jaxq.qarray import dequantize, quantize
from jaxq.spec import QuantSpec

A8 = QuantSpec(8, granularity="tensor")
_DIMS = (((1,), (0,)), ((), ()))


def _op(x, w):
  return dot_general_contraction(x, w, _DIMS, lambda l, r: jax.lax.dot_general(l, r, _DIMS),
                                 "layer")


def _served(aspec):
  return jax.jit(lambda x, w, qw, act: serve.quantized_contraction(
      _op(x, w), "layer", aspec, qw, act))


@jax.jit
def _dequant(x, qw, act):
  """The previous <= 4-bit serving path: (fake-quantized) input @ dequantized kernel."""
  if act is not None:
    x = quantizer.fake_quantize(x, A8, scale=act["scale"], zero_point=act["zero_point"])
  return x @ dequantize(qw)


@jax.jit
def _quantize_then_int8(x, qw):
  """Per-token codes in XLA, then ``int8_matmul`` (serving's XLA-backend path)."""
  view = A8.replace(granularity="channel", axis=0)
  sx, _ = quantizer.compute_qparams(x, view, group_axis=1)
  xq = jnp.clip(jnp.round(x / sx), -128, 127).astype(jnp.int8)
  return kernels.int8_matmul(xq, qw.int_values(), sx[:, 0], qw.scale.reshape(-1))


def _interleaved(fns, iters):
  for f in fns:
    jax.block_until_ready(f())
  times = [[] for _ in fns]
  for _ in range(iters):
    for i, f in enumerate(fns):
      t = time.perf_counter()
      jax.block_until_ready(f())
      times[i].append(time.perf_counter() - t)
  return [float(np.median(t)) * 1e3 for t in times]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--k", type=int, default=1024)
  ap.add_argument("--n", type=int, default=1024)
  ap.add_argument("--iters", type=int, default=20)
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(args.k, args.n)) / np.sqrt(args.k), jnp.float32)
  q4 = quantize(w, QuantSpec(4))
  q4g = quantize(w, QuantSpec(4, granularity="group", group_size=32))
  q8 = quantize(w, QuantSpec(8))
  print(f"backend {jax.default_backend()}, K={args.k}, N={args.n}; kernel bytes: float "
        f"{w.nbytes}, W4 {q4.nbytes}, W4 g32 {q4g.nbytes}, W8 {q8.nbytes}")
  print("| variant | M | kernel ms | reference ms | reference / kernel |")
  print("|---|---|---|---|---|")
  b_q, b_scale = q8.int_values(), q8.scale.reshape(-1)
  w8dyn = jax.jit(lambda x: kernels.int8_matmul_dynamic(x, b_q, b_scale))
  variants = (("W4A8 per-channel: int4_matmul vs dequantize", q4, A8),
              ("W4A8 g32: int4_matmul_grouped vs dequantize", q4g, A8),
              ("W4 g32 weight-only: int4_matmul_grouped vs dequantize", q4g, None))
  for m in (1, 16, 256):
    x = jnp.asarray(rng.normal(size=(m, args.k)), jnp.float32)
    s, z = quantizer.compute_qparams(x, A8)
    act = {"scale": s, "zero_point": z}
    fns = []
    for _, q, aspec in variants:
      a = act if aspec is not None else None
      fns += [functools.partial(_served(aspec), x, w, q, a),
              functools.partial(_dequant, x, q, a)]
    fns += [lambda: w8dyn(x), lambda: _quantize_then_int8(x, q8)]
    t = _interleaved(fns, args.iters)
    names = [v[0] for v in variants] + [
        "W8A8 dynamic: int8_matmul_dynamic vs codes + int8_matmul"]
    for i, name in enumerate(names):
      print(f"| {name} | {m} | {t[2 * i]:.3f} | {t[2 * i + 1]:.3f} | "
            f"{t[2 * i + 1] / t[2 * i]:.2f}x |")


if __name__ == "__main__":
  main()
