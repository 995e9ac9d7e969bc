"""Benchmark jaxq's kernels: quantize_pack / unpack_dequantize (GB/s) and the int8 matmuls
(TOP/s), against a device-to-device copy and XLA's bf16 and int8 dots, in one run.

    python benchmarks/bench_kernels.py                      # GPU: Pallas; CPU: XLA paths
    python benchmarks/bench_kernels.py --sizes 1,16,256 --kn 2048 --square 1024

On a GPU the default sizes are the issue's: 4096^3 and LLM-like shapes (M in 1..4096,
K = N = 4096), quantization of 65536 groups of 256. On the CPU smaller defaults are used and
``auto`` means the XLA reference path (the Pallas interpreter is for testing, not speed).
Prints markdown tables; percentages are of the copy bandwidth (memory roofline) and, where
the device is known, of its dense peak.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxq import kernels as K

# Dense (no sparsity) peak TOP/s by device kind substring: (int8, bf16).
_PEAKS = {"H200": (1979, 989), "H100": (1979, 989), "A100": (624, 312), "L4": (242, 121),
          "A10": (250, 125), "V100": (0, 125), "T4": (130, 65)}


def _time(fn, *args, iters: int, repeats: int = 3) -> float:
  """Median over ``repeats`` of the mean wall time of ``iters`` calls (after a warm-up)."""
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / iters)
  return statistics.median(samples)


def _peak(kind: str):
  for key, v in _PEAKS.items():
    if key in kind:
      return v
  return None


def bench_pack(groups: int, group_size: int, backend: str, iters: int):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(groups, group_size)).astype(np.float32))
  noise = jnp.asarray(rng.random((groups, group_size), np.float32))
  copy = jax.jit(lambda x: -x)  # reads and writes x once: the bandwidth roofline
  t = _time(copy, x, iters=iters)
  copy_gbs = 2 * x.nbytes / t / 1e9
  print(f"\n### quantize_pack / unpack_dequantize, x: f32[{groups}, {group_size}], "
        f"backend={backend}\n")
  print("| op | bits | time (us) | GB/s | % of copy |")
  print("|---|---|---|---|---|")
  print(f"| device copy (-x) | - | {t * 1e6:.1f} | {copy_gbs:.1f} | 100 |")
  for bits in (1, 2, 4, 8):
    for stochastic in (False, True):
      qp = jax.jit(lambda x, n: K.quantize_pack(x, bits, n, backend=backend))
      n = noise if stochastic else None
      t = _time(qp, x, n, iters=iters)
      packed, lo, scale = qp(x, n)
      moved = x.nbytes * (2 if stochastic else 1) + packed.nbytes + lo.nbytes + scale.nbytes
      name = "quantize_pack" + (" +noise" if stochastic else "")
      print(f"| {name} | {bits} | {t * 1e6:.1f} | {moved / t / 1e9:.1f} | "
            f"{100 * moved / t / 1e9 / copy_gbs:.0f} |")
    ud = jax.jit(lambda p, lo, s: K.unpack_dequantize(p, lo, s, bits, backend=backend))
    t = _time(ud, packed, lo, scale, iters=iters)
    moved = x.nbytes + packed.nbytes + lo.nbytes + scale.nbytes
    print(f"| unpack_dequantize | {bits} | {t * 1e6:.1f} | {moved / t / 1e9:.1f} | "
          f"{100 * moved / t / 1e9 / copy_gbs:.0f} |")


def bench_matmul(shapes, backend: str, iters: int, peak):
  rng = np.random.default_rng(0)
  dims = (((1,), (0,)), ((), ()))
  xla_bf16 = jax.jit(lambda a, b: lax.dot_general(a, b, dims,
                                                  preferred_element_type=jnp.float32)
                     .astype(jnp.bfloat16))
  xla_i8 = jax.jit(lambda a, b: lax.dot_general(a, b, dims, preferred_element_type=jnp.int32))
  mm = jax.jit(lambda a, b, sa, sb: K.int8_matmul(a, b, sa, sb, out_dtype=jnp.bfloat16,
                                                  backend=backend))
  dyn = jax.jit(lambda x, b, sb: K.int8_matmul_dynamic(x, b, sb, out_dtype=jnp.bfloat16,
                                                       backend=backend))
  i4 = jax.jit(lambda a, b, sa, sb: K.int4_matmul(a, b, sa, sb, out_dtype=jnp.bfloat16,
                                                  backend=backend))
  print(f"\n### matmuls, TOP/s (2*M*N*K / time), backend={backend}"
        + (f", device dense peak int8 {peak[0]} / bf16 {peak[1]} TOP/s" if peak else "") + "\n")
  print("| M | K | N | XLA bf16 dot | XLA int8 dot (int32 out) | int8_matmul (bf16 out) | "
        "int8_matmul_dynamic | int4_matmul (W4A8) |")
  print("|---|---|---|---|---|---|---|---|")
  for m, k, n in shapes:
    a = jnp.asarray(rng.integers(-127, 128, (m, k)).astype(np.int8))
    b = jnp.asarray(rng.integers(-127, 128, (k, n)).astype(np.int8))
    w4 = K.pack_int4(jnp.asarray(rng.integers(-8, 8, (k, n)).astype(np.int8)))
    x = jnp.asarray(rng.normal(size=(m, k)).astype(np.float32)).astype(jnp.bfloat16)
    sa, sb = jnp.ones((m,), jnp.float32), jnp.ones((n,), jnp.float32)
    ops = 2.0 * m * n * k
    cols = []
    for fn, args in ((xla_bf16, (a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))),
                     (xla_i8, (a, b)), (mm, (a, b, sa, sb)), (dyn, (x, b, sb)),
                     (i4, (a, w4, sa, sb))):
      t = _time(fn, *args, iters=iters)
      cols.append(f"{ops / t / 1e12:.3f}")
    print(f"| {m} | {k} | {n} | " + " | ".join(cols) + " |")


def main():
  on_gpu = jax.default_backend() == "gpu"
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--backend", default="auto", choices=K.BACKENDS)
  p.add_argument("--sizes", default="1,16,64,256,1024,4096" if on_gpu else "1,16,128,512",
                 help="comma-separated M values of the LLM-like matmuls (K = N = --kn)")
  p.add_argument("--kn", type=int, default=4096 if on_gpu else 1024)
  p.add_argument("--square", type=int, default=4096 if on_gpu else 512,
                 help="size of the square matmul (0 to skip)")
  p.add_argument("--groups", type=int, default=65536 if on_gpu else 8192)
  p.add_argument("--group-size", type=int, default=256)
  p.add_argument("--iters", type=int, default=20 if on_gpu else 5)
  args = p.parse_args()
  backend = K.resolve_backend(None if args.backend == "auto" else args.backend)
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", str(dev))
  print(f"## bench_kernels: {kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"kernel backend {backend}")
  bench_pack(args.groups, args.group_size, backend, args.iters)
  shapes = ([(args.square,) * 3] if args.square else []) + [
      (int(m), args.kn, args.kn) for m in args.sizes.split(",") if m]
  bench_matmul(shapes, backend, args.iters, _peak(kind) if on_gpu else None)


if __name__ == "__main__":
  main()
