"""W4 serving of one Dense contraction: ``int4_matmul`` (int4 x int8, what
:func:`jaxq.layer.serve.quantized_contraction` runs for a 4-bit per-channel weight with
an 8-bit activation) vs dequantize + float matmul (what it ran before), and symmetric
dynamic W8A8 through ``int8_matmul_dynamic`` vs quantize-then-``int8_matmul`` (serving
takes the first on Pallas backends, the second on XLA).

Each pair is timed interleaved in one run (median of ``--iters`` jitted calls per
variant, alternating), so the ratio survives a shared machine's noise; absolute times
do not. On the CPU both sides run XLA (``jaxq.kernels`` "xla" backend: the kernels'
jnp references); the GPU (Pallas) ratio is not measured here.

  PYTHONPATH=. python benchmarks/bench_serve_int4.py [--k 1024] [--n 1024] [--iters 20]
"""

from __future__ import annotations

import argparse
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
def _dequant_w4a8(x, qw, act):
  """The previous W4 serving path: fake-quantized input @ dequantized float kernel."""
  xq = quantizer.fake_quantize(x, A8, scale=act["scale"], zero_point=act["zero_point"])
  return xq @ dequantize(qw)


@jax.jit
def _quantize_then_int8(x, qw):
  """The previous dynamic W8A8 path: per-token codes in XLA, then ``int8_matmul``."""
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
  q8 = quantize(w, QuantSpec(8))
  print(f"backend {jax.default_backend()}, K={args.k}, N={args.n}; kernel bytes: float "
        f"{w.nbytes}, W4 {q4.nbytes}, W8 {q8.nbytes}")
  print("| M | W4A8 int4_matmul ms | W4A8 dequantize + matmul ms | ratio | "
        "W8A8-dyn int8_matmul_dynamic ms | W8A8-dyn quantize + int8_matmul ms | ratio |")
  print("|---|---|---|---|---|---|---|")
  w4a8 = _served(A8)
  b_q, b_scale = q8.int_values(), q8.scale.reshape(-1)
  w8dyn = jax.jit(lambda x: kernels.int8_matmul_dynamic(x, b_q, b_scale))
  for m in (1, 16, 256):
    x = jnp.asarray(rng.normal(size=(m, args.k)), jnp.float32)
    s, z = quantizer.compute_qparams(x, A8)
    act = {"scale": s, "zero_point": z}
    t = _interleaved([lambda: w4a8(x, w, q4, act), lambda: _dequant_w4a8(x, q4, act),
                      lambda: w8dyn(x), lambda: _quantize_then_int8(x, q8)],
                     args.iters)
    print(f"| {m} | {t[0]:.3f} | {t[1]:.3f} | {t[1] / t[0]:.2f}x | {t[2]:.3f} | "
          f"{t[3]:.3f} | {t[3] / t[2]:.2f}x |")


if __name__ == "__main__":
  main()
