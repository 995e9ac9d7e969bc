"""GPTQ / AWQ / SmoothQuant at the op level (jaxq.gptq, jaxq.smoothing) on the CPU.

  python benchmarks/bench_gptq.py [--size 4096] [--acc-size 1024]

1. Time: GPTQ on one size x size layer from 128 calibration tokens x 16 batches:
   Hessian accumulation (jitted running update), the host float64 inverse Cholesky,
   the rounding loop (jitted, float32); and how far a float32 Cholesky factor is off.
2. Layer-output error on held-back tokens (relative ||y_hat - y||^2 / ||y||^2) of RTN,
   GPTQ, AWQ and GPTQ+AWQ for W4 group-32 and W3 per-channel (weight-only), and of
   no smoothing / SmoothQuant (alpha 0.5, auto) for W8A8 per-tensor on a layer with
   injected outlier channels.
3. GPTQ's error against the number of calibration tokens and the damping.

Synthetic layers: correlated tokens ``x = (z A) * c`` (random mixing ``A``, log-normal
channel magnitudes ``c``, as real activations are correlated and uneven), Gaussian
kernels. Calibration, AWQ/SmoothQuant choice and test tokens are disjoint.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits

from jaxq import gptq
from jaxq import smoothing
from jaxq.qarray import dequantize, quantize
from jaxq.spec import QuantSpec

W4G32 = QuantSpec(4, granularity="group", group_size=32, symmetric=False)
W3 = QuantSpec(3, symmetric=False)
W8T = QuantSpec(8, granularity="tensor")
A8T = QuantSpec(8, granularity="tensor")


def tokens(rng, m, k, mix, mags):
  return ((rng.normal(size=(m, k)) @ mix) * mags).astype(np.float32)


def layer(seed, k, n, outliers=()):
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)
  mags = rng.lognormal(0.0, 0.7, size=k)
  for c, f in outliers:
    mags[c] *= f
  w = (rng.normal(size=(k, n)) / np.sqrt(k)).astype(np.float32)
  return rng, mix, mags, w


def rel_err(x, w, w_hat):
  y = x @ w
  return float(np.sum((x @ w_hat - y) ** 2) / np.sum(y ** 2))


def hessian_of(x, batch=128):
  update = jax.jit(gptq.hessian_update)
  st = gptq.hessian_init(x.shape[1])
  for i in range(0, x.shape[0], batch):
    st = update(st, jnp.asarray(x[i:i + batch]))
  return np.asarray(gptq.hessian(st))


def rtn(w, spec):
  return np.asarray(dequantize(quantize(jnp.asarray(w), spec)))


def gptq_w(w, h, spec, **kw):
  return np.asarray(dequantize(gptq.gptq_quantize(jnp.asarray(w), h, spec, **kw)))


def timing(size):
  print(f"## 1. time: GPTQ on one {size} x {size} layer, 128 tokens x 16 batches")
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(size, size)).astype(np.float32) / np.sqrt(size))
  mix = rng.normal(size=(size, size)).astype(np.float32) / np.sqrt(size) + np.eye(size)
  batches = [jnp.asarray(rng.normal(size=(128, size)).astype(np.float32) @ mix)
             for _ in range(16)]
  update = jax.jit(gptq.hessian_update)
  jax.block_until_ready(update(gptq.hessian_init(size), batches[0]))  # compile
  t = time.perf_counter()
  st = gptq.hessian_init(size)
  for b in batches:
    st = update(st, b)
  h = jax.block_until_ready(gptq.hessian(st))
  print(f"hessian accumulation (16 jitted updates): {time.perf_counter() - t:.2f} s")
  hd, _, perm = gptq.prepare_hessian(h)
  hp = hd[np.ix_(perm, perm)]
  for threads in (None, 1):
    with threadpool_limits(threads):
      t = time.perf_counter()
      u = gptq.inverse_hessian_cholesky(hp)
      print(f"host float64 inverse Cholesky (OpenBLAS threads: "
            f"{threads or 'default'}): {time.perf_counter() - t:.2f} s")
  with threadpool_limits(1):
    u32 = np.linalg.cholesky(np.linalg.inv(hp.astype(np.float32))).T
  print(f"float32 factor (inv + chol in float32) vs float64: max |dU| / max |U| = "
        f"{np.max(np.abs(u32 - u)) / np.max(np.abs(u)):.2e}")
  for spec, name in ((QuantSpec(4), "W4 per-channel"), (W4G32, "W4 group-32")):
    for act_order in (True, False):
      with threadpool_limits(1):  # host LAPACK; see the note in RESULTS.md
        times = []
        for _ in range(2):  # first call compiles
          t = time.perf_counter()
          jax.block_until_ready(gptq.gptq_quantize(w, h, spec, act_order=act_order).values)
          times.append(time.perf_counter() - t)
      print(f"gptq_quantize {name}, act_order={act_order}: first call (compiles) "
            f"{times[0]:.1f} s, second call {times[1]:.1f} s")


def accuracy(k):
  print(f"\n## 2. held-back layer-output error, {k} x {k} layer, weight-only, {4 * k} "
        "calibration tokens")
  rng, mix, mags, w = layer(1, k, k)
  x_cal = tokens(rng, 4 * k, k, mix, mags)  # GPTQ Hessian; AWQ fits on the first half
  x_test = tokens(rng, 2048, k, mix, mags)
  h = hessian_of(x_cal)
  x_fit, x_eval = smoothing.split_tokens(jnp.asarray(x_cal), holdout=0.5)
  print("| weights | RTN | GPTQ | AWQ | GPTQ+AWQ | AWQ alpha |")
  print("|---|---|---|---|---|---|")
  for spec, name in ((W4G32, "W4 g32 asym"), (W3, "W3 per-channel asym")):
    choice = smoothing.search_awq(x_fit, x_eval, w, spec)
    s = np.asarray(choice.scale)[:, None]
    e_rtn = rel_err(x_test, w, rtn(w, spec))
    e_gptq = rel_err(x_test, w, gptq_w(w, h, spec))
    e_awq = rel_err(x_test, w, rtn(s * w, spec) / s)
    hs = np.asarray(smoothing.smooth_hessian(h, choice.scale))
    e_both = rel_err(x_test, w, gptq_w(s * w, hs, spec) / s)
    print(f"| {name} | {e_rtn:.2e} | {e_gptq:.2e} | {e_awq:.2e} | {e_both:.2e} | "
          f"{choice.alpha if choice.alpha is None else round(choice.alpha, 3)} |")

  print(f"\n## 2b. W8A8 per-tensor (static activations), {k} x {k} layer with 4 outlier "
        "channels 20-100x")
  outliers = ((3, 100.0), (k // 8, 60.0), (k // 3, 40.0), (k - 5, 20.0))
  rng, mix, mags, w = layer(2, k, k, outliers=outliers)
  x_cal = tokens(rng, 1024, k, mix, mags)
  x_test = tokens(rng, 2048, k, mix, mags)
  x_fit, x_eval = smoothing.split_tokens(jnp.asarray(x_cal), holdout=0.5)
  choice = smoothing.search_smoothquant(x_fit, x_eval, w, W8T, A8T)
  absmax = smoothing.stats_update(smoothing.stats_init(k), x_fit).absmax
  err = lambda s: float(smoothing.scaled_output_error(x_fit, x_test, w, s, W8T, A8T))
  print("| smoothing | test error |")
  print("|---|---|")
  print(f"| none | {err(jnp.ones(k)):.2e} |")
  print(f"| SmoothQuant alpha=0.5 | {err(smoothing.smoothquant_scales(absmax, w, 0.5)):.2e} |")
  print(f"| auto (alpha={choice.alpha}) | {err(choice.scale):.2e} |")


def calibration_sweep(k):
  print(f"\n## 3. GPTQ W4 g32 / W3 error vs calibration tokens and damping ({k} x {k})")
  rng, mix, mags, w = layer(3, k, k)
  x_all = tokens(rng, 4096, k, mix, mags)
  x_test = tokens(rng, 2048, k, mix, mags)
  for spec, name in ((W4G32, "W4 g32"), (W3, "W3")):
    print(f"\n{name}: RTN {rel_err(x_test, w, rtn(w, spec)):.2e}")
    print("| tokens | damping 0.001 | 0.01 | 0.1 | 0.3 |")
    print("|---|---|---|---|---|")
    for m in (16, 64, 256, 1024, 4096):
      h = hessian_of(x_all[:m])
      row = [rel_err(x_test, w, gptq_w(w, h, spec, damping=d))
             for d in (0.001, 0.01, 0.1, 0.3)]
      print(f"| {m} | " + " | ".join(f"{e:.2e}" for e in row) + " |")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=4096)
  parser.add_argument("--acc-size", type=int, default=1024)
  parser.add_argument("--skip-timing", action="store_true")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, scipy {scipy.__version__}")
  if not args.skip_timing:
    timing(args.size)
  accuracy(args.acc_size)
  calibration_sweep(args.acc_size)


if __name__ == "__main__":
  main()
